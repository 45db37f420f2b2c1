"""Aux-loss-free expert balancing (DeepSeek-V3/V4): after each optimizer step every learned-routing MoE
(MTP blocks included) moves its selection bias by ``speed * sign(mean_load - load)``, the loads summed over
all microbatches and data-parallel ranks. Hash-routed layers have no bias and are left alone."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..distributed.utils import all_reduce_sum


def routers(model_parts: list[nn.Module]) -> list[nn.Module]:
    """The modules that own an ``expert_load`` buffer (a checkpoint wrapper around one forwards it)."""
    return [m for part in model_parts for m in part.modules() if "expert_load" in m._buffers]


@torch.no_grad()
def update_expert_bias(model_parts: list[nn.Module], speed: float, dp_group: dist.ProcessGroup | None) -> None:
    found = routers(model_parts)
    if not found:
        return
    loads = torch.stack([r.expert_load for r in found])
    loads = all_reduce_sum(loads, dp_group)
    for router, load in zip(found, loads):
        if speed > 0 and hasattr(router, "bias"):
            router.bias += speed * torch.sign(load.mean() - load)
        router.expert_load.zero_()
