"""The released checkpoint's weight formats (dsv4-spec.md §4.3), exactly.

* FP8 E4M3 with one scale per 128x128 block (edge blocks partial), the scale stored as E8M0 (a power of
  two, ``2^(byte - 127)``) or as float32: ``W[r, c] = float(Wq[r, c]) * S[r // 128, c // 128]``.
* FP4 E2M1 routed experts: two values per int8 byte (low nibble = even column), one E8M0 scale per row and
  32 columns: ``W[r, c] = TABLE[nibble(r, c)] * S[r, c // 32]``.

The quantisers produce exactly what the dequantisers invert (power-of-two scales, as the released files); the
``fake_quantize_*`` functions give the dequantised result directly, for quantisation-aware training. The
``fake_quantize_activation_*`` functions are the released inference kernels' in-place activation rounding
(``act_quant`` / ``fp4_act_quant`` with power-of-two scales), which the attention's KV and indexer see.
"""

from __future__ import annotations

import torch

# exports: fp8 (the Base release: the released FP8 matrices and the routed experts in FP8); fp4 (the instruct
# release: the same with the routed experts in FP4)
QUANTIZE_FORMATS = ("fp8", "fp4")
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
    """fp32 ``[..., rows, cols]`` from packed ``[..., rows, cols / 2]`` and scales ``[..., rows, cols / 32]``."""
    *lead, rows, half = packed.shape
    cols = half * 2
    if tuple(scale.shape) != (*lead, rows, cols // group):
        raise ValueError(f"FP4 scale shape {tuple(scale.shape)} does not match packed weight "
                         f"{tuple(packed.shape)} (expected {(*lead, rows, cols // group)})")
    bytes_ = packed.view(torch.uint8).int()
    codes = torch.stack([bytes_ & 0xF, bytes_ >> 4], dim=-1).reshape(*lead, rows, cols)  # low nibble: even column
    values = FP4_TABLE.to(packed.device)[codes].view(*lead, rows, cols // group, group)
    return (values * scale_values(scale)[..., None]).view(*lead, rows, cols)


def _pow2_ceil(ratio: torch.Tensor) -> torch.Tensor:
    """``2^ceil(log2(ratio))``, exactly: ``log2`` may round a ratio just above a power of two down onto it, the
    correction catches that (the kernels' ``fast_round_scale`` reads the ceiling off the exponent bits)."""
    scale = torch.exp2(torch.ceil(torch.log2(ratio)))
    return torch.where(scale < ratio, scale * 2, scale)


def _pow2_scale(amax: torch.Tensor, limit: float) -> torch.Tensor:
    """Smallest power of two s with amax / s <= limit, at least E8M0's smallest, 2^-127."""
    return _pow2_ceil((amax / limit).clamp(min=2.0**-127))


def _exact(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` in a dtype that holds every step of the rounding exactly: scaling by powers of two and
    rounding to a grid of at most 4 significant bits lose nothing in bf16 (fp32's exponent range), so bf16
    and fp32 weights are rounded as they are (no fp32 copy of a bf16 model's experts); others in fp32."""
    return weight if weight.dtype in (torch.bfloat16, torch.float32) else weight.float()


def _fp8_blocks(weight: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values / their block's scale ``[..., br, block, bc, block]``, fp32 scales ``[..., br, bc]``) of
    ``[..., rows, cols]``, edge blocks partial (zero padding never raises a block's maximum)."""
    weight = _exact(weight)
    *lead, rows, cols = weight.shape
    br, bc = -(-rows // block), -(-cols // block)
    padded = weight.new_zeros(*lead, br * block, bc * block)
    padded[..., :rows, :cols] = weight
    blocks = padded.view(*lead, br, block, bc, block)
    scale = _pow2_scale(blocks.abs().amax(dim=(-3, -1)).float(), FP8_MAX)
    return blocks / scale[..., :, None, :, None].to(blocks.dtype), scale


def _unblock(blocks: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    *lead, br, block, bc, _ = blocks.shape
    return blocks.reshape(*lead, br * block, bc * block)[..., :rows, :cols]


def quantize_fp8(weight: torch.Tensor, block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn weight, float8_e8m0fnu block scales)."""
    values, scale = _fp8_blocks(weight, block)
    return _unblock(values, *weight.shape[-2:]).to(torch.float8_e4m3fn), scale.to(torch.float8_e8m0fnu)


def fake_quantize_fp8(weight: torch.Tensor, block: int = FP8_BLOCK) -> torch.Tensor:
    """``dequantize_fp8(*quantize_fp8(w))`` for ``[..., rows, cols]`` (each trailing matrix on its own), in
    ``weight``'s dtype."""
    values, scale = _fp8_blocks(weight, block)
    rounded = values.to(torch.float8_e4m3fn).to(values.dtype) * scale[..., :, None, :, None].to(values.dtype)
    return _unblock(rounded, *weight.shape[-2:]).to(weight.dtype)


def _fp4_values(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(E2M1 grid values ``[..., rows, cols / group, group]``, fp32 scales ``[..., rows, cols / group]``): each
    row's 32-column group scaled by the smallest power of two that brings its maximum to 6, then rounded to the
    nearest grid value, ties to the even code (IEEE round-to-nearest-even, as hardware conversions do). The
    grid's spacing is 0.5 below 2, 1 below 4 and 2 up to 6, so that rounding is ``torch.round`` (half to
    even) of the value over its spacing."""
    *lead, rows, cols = weight.shape
    if cols % group:
        raise ValueError(f"FP4 quantisation needs a column count divisible by {group}, got {cols}")
    grouped = _exact(weight).reshape(*lead, rows, cols // group, group)
    scale = _pow2_scale(grouped.abs().amax(dim=-1).float(), FP4_MAX)
    return _round_e2m1(grouped / scale[..., None].to(grouped.dtype)), scale


def _round_e2m1(scaled: torch.Tensor) -> torch.Tensor:
    """Values within +-6 rounded to the nearest E2M1 grid value, ties to the even code."""
    magnitude = scaled.abs()
    spacing = torch.where(magnitude < 2, 0.5, torch.where(magnitude < 4, 1.0, 2.0))
    return torch.copysign(torch.round(magnitude / spacing) * spacing, scaled)


def quantize_fp4(weight: torch.Tensor, group: int = FP4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 packed weight [..., rows, cols/2], float8_e8m0fnu scales [..., rows, cols/32]); round to nearest
    even."""
    values, scale = _fp4_values(weight, group)
    *lead, rows, cols = weight.shape
    values = values.reshape(*lead, rows, cols)
    magnitude = values.abs()
    # grid value -> code: 0..2 in steps of 0.5 are codes 0..4, 3 and 4 are 5 and 6, 6 is 7; bit 3 the sign
    codes = torch.where(magnitude <= 2, magnitude * 2, torch.where(magnitude <= 4, magnitude + 2, 7.0))
    codes = codes.to(torch.uint8) | (torch.signbit(values).to(torch.uint8) << 3)
    pairs = codes.view(*lead, rows, cols // 2, 2)
    packed = (pairs[..., 0] | (pairs[..., 1] << 4)).view(torch.int8)
    return packed, scale.to(torch.float8_e8m0fnu)


def fake_quantize_fp4(weight: torch.Tensor, group: int = FP4_GROUP) -> torch.Tensor:
    """``dequantize_fp4(*quantize_fp4(w))`` for ``[..., rows, cols]``, in ``weight``'s dtype (exact in bf16:
    a grid value times a power of two has at most 2 significant bits)."""
    values, scale = _fp4_values(weight, group)
    return (values * scale[..., None].to(values.dtype)).reshape(weight.shape).to(weight.dtype)


def fake_quantize_activation_fp8(x: torch.Tensor, group: int) -> torch.Tensor:
    """The released kernels' ``act_quant(x, group, "ue8m0", inplace=True)``: each ``group`` values along the last
    dim scaled by the smallest power of two that brings their largest magnitude (at least 1e-4) to 448 or
    below (the ratio taken with fp32's 1/448, as the kernels), cast to E4M3 and back; fp32 math, in ``x``'s
    dtype."""
    groups = x.float().unflatten(-1, (-1, group))
    scale = _pow2_ceil(groups.abs().amax(dim=-1, keepdim=True).clamp(min=1e-4) * (1 / FP8_MAX))
    rounded = (groups / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * scale
    return rounded.flatten(-2).to(x.dtype)


def fake_quantize_activation_fp4(x: torch.Tensor, group: int = FP4_GROUP) -> torch.Tensor:
    """The released kernels' ``fp4_act_quant(x, group, inplace=True)``: as the FP4 weight rounding along the last
    dim, the scale at least 2^-126; fp32 math, in ``x``'s dtype."""
    groups = x.float().unflatten(-1, (-1, group))
    scale = _pow2_ceil((groups.abs().amax(dim=-1, keepdim=True) * (1 / FP4_MAX)).clamp(min=2.0**-126))
    return (_round_e2m1(groups / scale) * scale).flatten(-2).to(x.dtype)
