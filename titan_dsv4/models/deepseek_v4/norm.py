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
        """``weight · x / sqrt(mean(x²) + eps)`` in fp32: ``torch.rms_norm`` on the upcast input is one fused
        kernel each way on CUDA (eagerly ~8 forward and ~10 backward kernels, each through fp32 copies of
        the tokens) and, elsewhere, the same ops as that formula written out, bit for bit."""
        return torch.rms_norm(fp32(x), (x.shape[-1],), fp32(self.weight), self.eps).to(x.dtype)


def rms_normalise(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Weightless RMS normalisation over the last axis (the per-head query norm)."""
    return x * torch.rsqrt(fp32(x).square().mean(-1, keepdim=True) + eps).to(x.dtype)
