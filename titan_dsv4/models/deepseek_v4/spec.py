"""Registers DeepSeek-V4 with the model registry."""

from __future__ import annotations

from ...components.loss import MTPLoss
from ...config.job_config import JobConfig
from ...distributed.pipeline import build_pipeline
from ...protocols.train_spec import TrainSpec, register_train_spec
from .args import DeepseekV4ModelArgs
from .flavors import FLAVORS
from .model import DeepseekV4Model
from .parallelize import parallelize_deepseek_v4
from .state_dict_adapter import DeepseekV4StateDictAdapter


def build_loss_fn(job_config: JobConfig, model_args: DeepseekV4ModelArgs) -> MTPLoss:
    loss = MTPLoss(model_args.num_nextn_predict_layers, job_config.mtp.loss_scaling_factor)
    if job_config.compile.enable and "loss" in job_config.compile.components:
        loss.compile(job_config.compile.backend)
    return loss


register_train_spec(TrainSpec(
    name="deepseek_v4",
    model_cls=DeepseekV4Model,
    model_args=FLAVORS,
    parallelize_fn=parallelize_deepseek_v4,
    pipelining_fn=build_pipeline,
    build_loss_fn=build_loss_fn,
    state_dict_adapter=DeepseekV4StateDictAdapter,
))
