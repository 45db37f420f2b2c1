"""AdamW (or Muon for the matrices) over every model part, and torchtitan's warmup -> stable -> decay
learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from ..config.job_config import LRScheduler as LRConfig
from ..config.job_config import Optimizer as OptimizerConfig
from .muon import Muon

DECAY_TYPES = ("linear", "sqrt", "cosine")


def unique_trainable_parameters(model_parts: list[nn.Module]) -> list[nn.Parameter]:
    """Trainable parameters of all parts, each once (stages on one rank may share a module)."""
    seen, out = set(), []
    for part in model_parts:
        for p in part.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def build_optimizer(params: list[nn.Parameter], cfg: OptimizerConfig,
                    matrices: dict[int, int]) -> torch.optim.Optimizer:
    """AdamW, or Muon for the weights in ``matrices`` (``id`` -> independent matrices stacked along dim 0,
    from ``matrix_parameters``) and AdamW for the rest."""
    impl = {"foreach": dict(foreach=True), "fused": dict(fused=True), "for-loop": dict(foreach=False)}
    muon = [p for p in params if id(p) in matrices] if cfg.name == "Muon" else []
    adamw = [p for p in params if id(p) not in matrices] if muon else params
    # foreach/fused kernels cannot mix FSDP's DTensors with the plain tensors kept whole beside them; both
    # groups always exist (one may be empty) so that a checkpoint resumes under any other layout
    groups = [{"params": [p for p in adamw if isinstance(p, DTensor)]},
              {"params": [p for p in adamw if not isinstance(p, DTensor)]}]
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay,
                  **impl[cfg.implementation])
    if cfg.name != "Muon":
        return torch.optim.AdamW(groups, **kwargs)
    groups.append({"params": muon, "muon": True, "matrices": [matrices[id(p)] for p in muon],
                   "momentum": cfg.muon_momentum, "update_rms": cfg.muon_update_rms})
    return Muon(groups, **kwargs)


def empty_state(group: dict, p: torch.Tensor) -> dict[str, torch.Tensor]:
    """The optimizer state of ``p`` in ``group`` as its first step creates it (what a checkpoint loads into)."""
    if group.get("muon"):
        return {"momentum_buffer": torch.zeros_like(p)}
    on_device = group.get("fused") or group.get("capturable")
    return {"step": torch.zeros((), dtype=torch.float32, device=p.device if on_device else "cpu"),
            "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}


def lr_multiplier(step: int, total_steps: int, cfg: LRConfig) -> float:
    """Multiplier of the base lr at 0-based ``step``: linear warmup, constant, then decay to min_lr_factor."""
    warmup = min(cfg.warmup_steps, total_steps)
    decay_steps = (round(total_steps * cfg.decay_ratio) if cfg.decay_ratio is not None
                   else total_steps - warmup)
    stable_end = total_steps - decay_steps
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if step < stable_end or decay_steps <= 0:
        return 1.0
    progress = min(1.0, (step - stable_end) / decay_steps)
    if cfg.decay_type == "linear":
        factor = 1.0 - progress
    elif cfg.decay_type == "sqrt":
        factor = 1.0 - math.sqrt(progress)
    else:
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_factor + (1.0 - cfg.min_lr_factor) * factor


def build_lr_scheduler(optimizer: torch.optim.Optimizer, total_steps: int,
                       cfg: LRConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, total_steps, cfg))
