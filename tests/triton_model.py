"""A tiny bf16 model with every Triton kernel on (on CPU, Triton's interpreter runs them) and a batch."""

from __future__ import annotations

import dataclasses

import torch

from titan_dsv4.components.loss import build_targets
from titan_dsv4.models.deepseek_v4 import FLAVORS, DeepseekV4Model
from titan_dsv4.models.deepseek_v4.parallelize import cast_to_compute_dtypes


def bf16_model_with_triton_kernels(compress_ratios: list[int], indexer_loss_scale: float = 0.0):
    """The debug model with 2 decoder layers + MTP of the given kinds, 2 Sinkhorn iterations, in the dtypes
    FSDP's bf16 mixed precision computes with (``cast_to_compute_dtypes``: the grouped expert GEMMs need
    bf16); returns ``(model, ids [1, 24], targets)``."""
    args = dataclasses.replace(FLAVORS["debugmodel"], num_hidden_layers=2, compress_ratios=compress_ratios,
                               hc_sinkhorn_iters=2)
    ids = torch.randint(0, args.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    targets = build_targets(ids.roll(-1, 1), torch.arange(24).expand(1, 24), args.num_nextn_predict_layers)
    model = DeepseekV4Model(args)
    model.init_weights(0)
    model.train()
    cast_to_compute_dtypes(model)
    model.set_attention_kernel("triton")
    model.set_sinkhorn_kernel("triton")
    model.set_mtp_loss_scale(0.3)
    model.set_indexer_loss_scale(indexer_loss_scale)
    return model, ids, targets
