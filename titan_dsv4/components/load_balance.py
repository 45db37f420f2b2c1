"""Aux-loss-free expert balancing (DeepSeek-V3/V4): after each optimizer step every learned-routing MoE
(MTP blocks included) moves its selection bias by ``speed * sign(mean_load - load)``, the loads summed over
all microbatches and data-parallel ranks. Hash-routed layers have no bias and are left alone.

The same loads give the balance a run reports: each learned-routing MoE's max violation (MaxVio, Wang et
al. 2024, "Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts"), ``max load / mean load - 1``
over the step's global batch: 0 when every expert got the same number of tokens, ``E / k - 1`` when the
top-k always picks the same experts. Hash layers are not reported: their token -> expert table is fixed, so
nothing training does changes their balance."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..distributed.utils import all_reduce_sum
from ..models.deepseek_v4.args import DeepseekV4ModelArgs
from ..models.deepseek_v4.init import canonical_fqn


def routers(model_parts: list[nn.Module]) -> list[tuple[str, nn.Module]]:
    """``(name of its MoE, router)`` for the modules that own an ``expert_load`` buffer (a checkpoint
    wrapper around one forwards it); the name as the bare model spells it: ``layers.3``, ``mtp.0``."""
    return [(canonical_fqn(name).removesuffix(".ffn.gate"), module) for part in model_parts
            for name, module in part.named_modules() if "expert_load" in module._buffers]


@torch.no_grad()
def update_expert_bias(model_parts: list[nn.Module], speed: float,
                       group: dist.ProcessGroup | None) -> dict[str, torch.Tensor]:
    """Move the biases, reset the load counters; returns each learned-routing MoE's max violation
    (a 0-d tensor, still on the device) by name. ``group``: the ranks holding the same stage (data and
    context parallel), whose loads add up."""
    found = routers(model_parts)
    if not found:
        return {}
    loads = all_reduce_sum(torch.stack([router.expert_load for _, router in found]), group)
    for (_, router), load in zip(found, loads):
        if speed > 0 and hasattr(router, "bias"):
            router.bias += speed * torch.sign(load.mean() - load)
        router.expert_load.zero_()
    violations = max_violation(loads)
    return {name: violation for (name, router), violation in zip(found, violations) if not router.hashed}


def max_violation(loads: torch.Tensor) -> torch.Tensor:
    """``max load / mean load - 1`` of each row of ``loads`` ``[..., experts]``; 0 for a row without
    tokens."""
    mean = loads.mean(dim=-1)
    return torch.where(mean > 0, loads.amax(dim=-1) / mean.clamp(min=torch.finfo(loads.dtype).tiny) - 1, 0.0)


def learned_routing_moes(args: DeepseekV4ModelArgs) -> list[str]:
    """Every learned-routing MoE of the model in order: the decoder layers after the hash-routed ones,
    then the MTP depths."""
    return ([f"layers.{i}" for i in range(args.num_hash_layers, args.num_hidden_layers)]
            + [f"mtp.{d}" for d in range(args.num_nextn_predict_layers)])


def gather_max_violations(violations: dict[str, torch.Tensor], names: list[str],
                          pp_group: dist.ProcessGroup | None, device: torch.device) -> dict[str, float]:
    """Every MoE's max violation, in model order, from the pipeline stage that holds it (data-parallel
    ranks already agree: their loads were summed)."""
    values = torch.zeros(len(names), dtype=torch.float32, device=device)
    held = [i for i, name in enumerate(names) if name in violations]
    if held:  # one copy for all of this stage's MoEs, not one per MoE
        values[held] = torch.stack([violations[names[i]] for i in held]).to(values)
    return dict(zip(names, all_reduce_sum(values, pp_group).tolist()))
