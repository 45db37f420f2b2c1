"""The released checkpoint's weight formats (dsv4-spec.md §4.3), exactly.

* FP8 E4M3 with one scale per 128x128 block (edge blocks partial), the scale stored as E8M0 (a power of
  two, ``2^(byte - 127)``) or as float32: ``W[r, c] = float(Wq[r, c]) * S[r // 128, c // 128]``.
* FP4 E2M1 routed experts: two values per int8 byte (low nibble = even column), one E8M0 scale per row and
  32 columns: ``W[r, c] = TABLE[nibble(r, c)] * S[r, c // 32]``.

The quantisers produce exactly what the dequantisers invert (power-of-two scales, as the released files).
"""

from __future__ import annotations

import torch

FP8_BLOCK = 128
FP4_GROUP = 32
FP8_MAX = 448.0
FP4_MAX = 6.0
FP4_TABLE = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def scale_values(scale: torch.Tensor) -> torch.Tensor:
    """float32 multipliers from an E8M0 (float8_e8m0fnu or raw uint8 bytes) or float scale tensor."""
    if scale.dtype == torch.uint8:
        return torch.exp2(scale.float() - 127)
    return scale.float()


def dequantize_fp8(weight: torch.Tensor, scale: torch.Tensor, block: int = FP8_BLOCK) -> torch.Tensor:
    rows, cols = weight.shape
    expected = (-(-rows // block), -(-cols // block))
    if tuple(scale.shape) != expected:
        raise ValueError(f"FP8 scale shape {tuple(scale.shape)} does not match weight {tuple(weight.shape)} "
                         f"(expected {expected} for {block}x{block} blocks)")
    s = scale_values(scale).repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]
    return weight.float() * s


def dequantize_fp4(packed: torch.Tensor, scale: torch.Tensor, group: int = FP4_GROUP) -> torch.Tensor:
    rows, half = packed.shape
    cols = half * 2
    if tuple(scale.shape) != (rows, cols // group):
        raise ValueError(f"FP4 scale shape {tuple(scale.shape)} does not match packed weight "
                         f"{tuple(packed.shape)} (expected {(rows, cols // group)})")
    bytes_ = packed.view(torch.uint8).long()
    codes = torch.stack([bytes_ & 0xF, bytes_ >> 4], dim=-1).reshape(rows, cols)  # low nibble: even column
    return FP4_TABLE[codes] * scale_values(scale).repeat_interleave(group, 1)


def _pow2_scale(amax: torch.Tensor, limit: float) -> torch.Tensor:
    """Smallest power of two s with amax / s <= limit (E8M0-representable)."""
    return torch.exp2(torch.ceil(torch.log2(amax.clamp(min=2.0**-126) / limit)))


def quantize_fp8(weight: torch.Tensor, block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn weight, float8_e8m0fnu block scales)."""
    rows, cols = weight.shape
    br, bc = -(-rows // block), -(-cols // block)
    padded = torch.zeros(br * block, bc * block, dtype=torch.float32)
    padded[:rows, :cols] = weight.float()
    blocks = padded.view(br, block, bc, block)
    scale = _pow2_scale(blocks.abs().amax(dim=(1, 3)), FP8_MAX)
    q = (blocks / scale[:, None, :, None]).view(br * block, bc * block)[:rows, :cols]
    return q.to(torch.float8_e4m3fn), scale.to(torch.float8_e8m0fnu)


def quantize_fp4(weight: torch.Tensor, group: int = FP4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 packed weight [rows, cols/2], float8_e8m0fnu scales [rows, cols/32]); round to nearest."""
    rows, cols = weight.shape
    grouped = weight.float().view(rows, cols // group, group)
    scale = _pow2_scale(grouped.abs().amax(dim=-1), FP4_MAX)
    values = (grouped / scale[..., None]).view(rows, cols)
    codes = (values.unsqueeze(-1) - FP4_TABLE).abs().argmin(dim=-1)  # nearest table entry (+0 before -0)
    pairs = codes.view(rows, cols // 2, 2)
    packed = (pairs[..., 0] | (pairs[..., 1] << 4)).to(torch.uint8).view(torch.int8)
    return packed, scale.to(torch.float8_e8m0fnu)
