"""Quantisation-aware training: the forward sees a tensor rounded as the released model's formats round it, the
backward passes the gradient straight through (the full-precision tensor keeps learning below the grid).

Two kinds of rounding (dsv4-spec.md §5, item 9):

* routed expert weights in a checkpoint format (``model.expert_qat``): ``fp4`` (the instruct release) or ``fp8``
  (the Base release), so an export in that format serves what training computed;
* the attention's activations as the released inference code rounds them (``model.attention_qat``): the KV's
  non-RoPE dims in FP8 (64-value groups, power-of-two scales; window and compressed entries alike, what FP8 KV
  caches hold), and the indexer's queries and keys Hadamard-rotated, then FP4 (32-value groups).
"""

from __future__ import annotations

import torch

from ...components.quantization import (FP4_GROUP, fake_quantize_activation_fp4, fake_quantize_activation_fp8,
                                        fake_quantize_fp4, fake_quantize_fp8)
from .args import DeepseekV4ModelArgs
from .fused import compiled_on_cuda

KV_GROUP = 64  # the released code's FP8 group on the KV's non-RoPE dims


def _round_kv(kv: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """``kv [..., d]`` with its first ``d - rope_dim`` dims rounded to FP8; the RoPE dims keep full precision."""
    nope = kv.shape[-1] - rope_dim
    return torch.cat([fake_quantize_activation_fp8(kv[..., :nope], KV_GROUP), kv[..., nope:]], dim=-1)


# on CUDA each rounding is a few compiled kernels, not a dozen passes over the tensor
ROUNDINGS = {
    "fp4": compiled_on_cuda(fake_quantize_fp4),
    "fp8": compiled_on_cuda(fake_quantize_fp8),
    "kv_fp8": compiled_on_cuda(_round_kv),
    "indexer_fp4": compiled_on_cuda(fake_quantize_activation_fp4),
}
EXPERT_QAT = {fmt: ROUNDINGS[fmt] for fmt in ("fp4", "fp8")}  # checkpoint formats of routed experts


class FakeQuantized(torch.autograd.Function):
    """Forward: ``ROUNDINGS[fmt](x, *args)``; backward: the gradient unchanged (straight-through estimator)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, fmt: str, *args) -> torch.Tensor:
        ctx.n_args = len(args)
        return ROUNDINGS[fmt](x, *args)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None, *([None] * ctx.n_args)


def hadamard(dim: int, device: torch.device | None = None) -> torch.Tensor:
    """The ``dim x dim`` (a power of two) Sylvester-Hadamard matrix scaled by ``dim^-0.5`` (orthogonal and
    symmetric), fp32: ``fast_hadamard_transform``'s rotation, natural order."""
    h = torch.ones(1, 1, device=device)
    while h.shape[0] < dim:
        h = torch.cat([torch.cat([h, h], dim=1), torch.cat([h, -h], dim=1)], dim=0)
    return h * dim**-0.5


def kv_qat(kv: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """The KV (window or compressed entries) as the released attention reads it."""
    return FakeQuantized.apply(kv, "kv_fp8", rope_dim)


def indexer_qat(x: torch.Tensor) -> torch.Tensor:
    """The indexer's queries ``[..., D]`` or keys as the released indexer scores them: rotated (in fp32, the result
    in ``x``'s dtype, as the rotation kernel's), then FP4. The rotation leaves every ``q . k`` as it was; it
    spreads outliers over the 32-value groups before the rounding."""
    rotated = (x.float() @ hadamard(x.shape[-1], x.device)).to(x.dtype)
    return FakeQuantized.apply(rotated, "indexer_fp4")


def attention_qat_mismatch(args: DeepseekV4ModelArgs) -> str | None:
    """Why ``args``' attention cannot be rounded as the released one is (None: it can)."""
    nope = args.head_dim - args.qk_rope_head_dim
    if nope % KV_GROUP:
        return f"head_dim - qk_rope_head_dim = {nope} must be a multiple of {KV_GROUP}, the KV's FP8 group"
    width = args.index_head_dim
    if width & (width - 1) or width % FP4_GROUP:
        return (f"index_head_dim = {width} must be a power of two (the indexer's Hadamard rotation) and a multiple "
                f"of {FP4_GROUP} (its FP4 group)")
    return None
