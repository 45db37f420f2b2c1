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
    return MTPLoss()  # the cross-entropy itself runs fused with the LM head, in the model (head_loss.py)


register_train_spec(TrainSpec(
    name="deepseek_v4",
    model_cls=DeepseekV4Model,
    model_args=FLAVORS,
    parallelize_fn=parallelize_deepseek_v4,
    pipelining_fn=build_pipeline,
    build_loss_fn=build_loss_fn,
    state_dict_adapter=DeepseekV4StateDictAdapter,
))
