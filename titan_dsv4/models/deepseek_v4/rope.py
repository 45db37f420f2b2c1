"""Interleaved partial RoPE with the two DeepSeek-V4 bases.

Sliding-window layers (and MTP) use ``rope_theta`` without scaling; compressed layers (CSA/HCA, their
compressors and the indexer) use ``compress_rope_theta`` with YaRN frequency interpolation and no mscale.
Rotations are computed in fp32 on the fly from the positions, so nothing is a buffer that a bf16 cast,
FSDP or a checkpoint could corrupt.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .fused import compiled_on_cuda


def rope_inv_freq(dim: int, theta: float, yarn: dict[str, Any] | None = None) -> torch.Tensor:
    """Inverse frequencies for ``dim`` rotated channels (``dim // 2`` pairs), YaRN-interpolated if given."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if yarn is None:
        return inv_freq.float()
    factor = float(yarn["factor"])
    original = float(yarn["original_max_position_embeddings"])
    beta_fast = float(yarn.get("beta_fast") or 32)
    beta_slow = float(yarn.get("beta_slow") or 1)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    smooth = 1 - ramp
    return (inv_freq / factor * (1 - smooth) + inv_freq * smooth).float()


def rope_rotation(positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Unit rotations by ``position * freq`` as (cos, sin) pairs: ``[*positions.shape, dim // 2, 2]`` (fp32).
    Real, not complex: inductor generates no code for complex tensors (a complex rotation left every
    compiled RoPE to eager kernels, each a pass over the queries and keys)."""
    angles = positions.float().unsqueeze(-1) * inv_freq.to(positions.device)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


@compiled_on_cuda
def apply_rope(x: torch.Tensor, rotation: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotate the trailing ``2 * rotation.shape[-2]`` channels of ``x`` in interleaved pairs (2i, 2i+1), the
    pair as the complex number ``x[2i] + i x[2i+1]`` times ``cos + i sin``, in fp32 (or ``x``'s fp64).

    ``x`` is ``[B, S, ..., D]`` and ``rotation`` ``[B, S, D_rope/2, 2]`` (broadcast over the middle axes).
    ``inverse`` applies the conjugate rotation, used to un-rotate attention outputs (V == K). On CUDA it is
    compiled into one kernel (eagerly, its fp32 arithmetic and concatenation are a dozen passes).
    """
    half = rotation.shape[-2]
    rotation = rotation.reshape(*rotation.shape[:2], *([1] * (x.dim() + 1 - rotation.dim())), half, 2)
    cos, sin = rotation.unbind(-1)
    if inverse:
        sin = -sin
    nope, rope = x[..., : -2 * half], x[..., -2 * half:]
    real, imag = rope.to(torch.promote_types(rope.dtype, torch.float32)).unflatten(-1, (half, 2)).unbind(-1)
    rotated = torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1).flatten(-2)
    return torch.cat([nope, rotated.to(x.dtype)], dim=-1)
