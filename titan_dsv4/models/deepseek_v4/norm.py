"""RMSNorm with fp32 math and an fp32 weight, as the released model runs its norms; the fp32 upcast."""

from __future__ import annotations

import torch
from torch import nn


def fp32(x: torch.Tensor) -> torch.Tensor:
    """At least fp32: bf16/fp16 are upcast, fp64 (gradient checks) is kept."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = fp32(x)
        xf = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps)
        return (fp32(self.weight) * xf).to(x.dtype)


def rms_normalise(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Weightless RMS normalisation over the last axis (the per-head query norm)."""
    return x * torch.rsqrt(fp32(x).square().mean(-1, keepdim=True) + eps).to(x.dtype)
