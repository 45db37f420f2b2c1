"""Manifold-constrained hyper-connections (mHC): the residual stream is ``hc_mult`` parallel copies.

Every mixing coefficient is computed in fp32 from the flattened streams (dsv4-spec.md §2.2):
``pre = sigmoid + eps`` collapses the streams into the sub-layer input, ``post = 2 * sigmoid`` spreads the
sub-layer output back, and ``comb`` (softmax + eps, then Sinkhorn) mixes the residual streams. The residual
update uses ``comb`` **transposed** (``X'_k = post_k * o + sum_j comb[j, k] * X_j``), the orientation bug that
hit three frameworks.
"""

from __future__ import annotations

import torch
from torch import nn

from . import sinkhorn_kernel
from .fp32_linear import fp32_linear
from .fused import compiled_on_cuda
from .gpu_paths import takes_triton_kernels
from .norm import fp32


def _flat_mix(x: torch.Tensor, fn: torch.Tensor, eps: float) -> torch.Tensor:
    """``rms_normalise(flatten(x)) @ fn.T`` in fp32; ``x`` is ``[B, S, n, H]``.

    As the reference computes it: the product of the raw streams, scaled by their rms afterwards. No
    normalised fp32 copy of the streams exists (it was kept for backward: 2x the streams' bytes per site),
    and on GPUs the product runs from the bf16 streams on tensor cores (``fp32_linear``)."""
    flat = x.flatten(2)
    dtype = torch.promote_types(x.dtype, torch.float32)
    norm = torch.linalg.vector_norm(flat, dim=-1, keepdim=True, dtype=dtype)
    return fp32_linear(flat, fn) * torch.rsqrt(norm.square() / flat.shape[-1] + eps)


class _Sinkhorn(torch.autograd.Function):
    """Softmax over the last axis, ``+ eps``, then alternate column/row normalisation (column first).

    Hand-written backward: each normalisation ``y = x / (sum(x) + eps)`` has the gradient
    ``(g - sum(g * y)) / (sum(x) + eps)``, four small ops instead of autograd's chain of division,
    broadcast and sum nodes (the 20-iteration Sinkhorn was the largest cost of a CPU step).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
        # work on [n, n, tokens]: the row/column sums become adds of contiguous vectors
        shape = logits.shape
        x = logits.reshape(-1, shape[-2], shape[-1]).permute(1, 2, 0).contiguous()
        probs = torch.softmax(x, dim=1)
        comb = probs + eps
        saved, dims = [probs], []
        for dim in [0] + [1, 0] * (iters - 1):  # 0: column sums (over j), 1: row sums (over k)
            denom = comb.sum(dim=dim, keepdim=True).add_(eps)
            comb = comb / denom
            saved += [comb, denom]
            dims.append(dim)
        ctx.dims, ctx.shape = dims, shape
        ctx.save_for_backward(*saved)
        return comb.permute(2, 0, 1).reshape(shape).contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        probs, *rest = ctx.saved_tensors
        shape = ctx.shape
        grad = grad.reshape(-1, shape[-2], shape[-1]).permute(1, 2, 0).contiguous()
        for i in reversed(range(len(ctx.dims))):
            y, denom = rest[2 * i], rest[2 * i + 1]
            grad = (grad - (grad * y).sum(dim=ctx.dims[i], keepdim=True)) / denom
        grad = probs * (grad - (grad * probs).sum(dim=1, keepdim=True))  # softmax
        return grad.permute(2, 0, 1).reshape(shape), None, None


def sinkhorn(comb_logits: torch.Tensor, iters: int, eps: float, kernel: bool = False) -> torch.Tensor:
    """Softmax over the last axis, then alternate column/row normalisation (column first). ``kernel``: one
    Triton kernel each way (``sinkhorn_kernel.py``)."""
    if kernel:
        return sinkhorn_kernel.sinkhorn(comb_logits, iters, eps)
    return _Sinkhorn.apply(comb_logits, iters, eps)


@compiled_on_cuda
def hc_pre(x: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, n: int, iters: int,
           hc_eps: float, norm_eps: float, triton_sinkhorn: bool = False
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The mixing coefficients of one mHC site and the collapsed sub-layer input (all fp32 math)."""
    mixes = _flat_mix(x, fn, norm_eps)
    base, scale = fp32(base), fp32(scale)
    pre_w, post_w, comb_w = mixes.split([n, n, n * n], dim=-1)
    pre_b, post_b, comb_b = base.split([n, n, n * n])
    pre = torch.sigmoid(pre_w * scale[0] + pre_b) + hc_eps
    post = 2 * torch.sigmoid(post_w * scale[1] + post_b)
    comb = sinkhorn((comb_w * scale[2] + comb_b).unflatten(-1, (n, n)), iters, hc_eps, triton_sinkhorn)
    collapsed = (pre.unsqueeze(-1) * fp32(x)).sum(dim=2).to(x.dtype)
    return collapsed, post, comb


@compiled_on_cuda
def hc_post(out: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """``X'_k = post_k * out + sum_j comb[j,k] * X_j`` computed in fp32, cast to the stream dtype."""
    # sum_j comb[j, k] * X_j as n broadcast multiply-adds: n is tiny (a batched 4x4 matmul per token is slow),
    # and no [.., n, n, H] product is formed
    residual32 = fp32(residual)
    mixed = post.unsqueeze(-1) * fp32(out).unsqueeze(-2)
    for j in range(residual.shape[-2]):
        mixed = mixed + comb[..., j, :, None] * residual32[..., j, None, :]
    return mixed.to(residual.dtype)


class HyperConnection(nn.Module):
    """One mHC site (before attention or before the MoE) of a block."""

    def __init__(self, hidden_size: int, hc_mult: int, sinkhorn_iters: int, hc_eps: float, norm_eps: float):
        super().__init__()
        self.hc_mult, self.sinkhorn_iters, self.hc_eps, self.norm_eps = hc_mult, sinkhorn_iters, hc_eps, norm_eps
        mix = (2 + hc_mult) * hc_mult
        self.fn = nn.Parameter(torch.empty(mix, hc_mult * hidden_size, dtype=torch.float32))
        self.base = nn.Parameter(torch.empty(mix, dtype=torch.float32))
        self.scale = nn.Parameter(torch.empty(3, dtype=torch.float32))
        # "auto": the Triton Sinkhorn on CUDA (when installed); "torch": the torch Sinkhorn everywhere;
        # "triton": the kernel on any device Triton runs on (CPU: under its interpreter, for tests)
        self.sinkhorn_kernel = "auto"

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The site's pre step (a module call, so FSDP gathers the weights); ``post`` is applied after the
        sub-layer. Returns ``(collapsed [B,S,H] in x.dtype, post [B,S,n] fp32, comb [B,S,n,n] fp32)``."""
        return hc_pre(x, self.fn, self.base, self.scale, self.hc_mult, self.sinkhorn_iters, self.hc_eps,
                      self.norm_eps, self._runs_sinkhorn_kernel(x))

    def _runs_sinkhorn_kernel(self, x: torch.Tensor) -> bool:
        if self.sinkhorn_kernel == "torch" or not sinkhorn_kernel.supports(x.device, self.hc_mult):
            return False
        return self.sinkhorn_kernel == "triton" or takes_triton_kernels(x)

    post = staticmethod(hc_post)


class HyperHead(nn.Module):
    """Final collapse of the streams before the last norm (no Sinkhorn, no post)."""

    def __init__(self, hidden_size: int, hc_mult: int, hc_eps: float, norm_eps: float):
        super().__init__()
        self.hc_eps, self.norm_eps = hc_eps, norm_eps
        self.fn = nn.Parameter(torch.empty(hc_mult, hc_mult * hidden_size, dtype=torch.float32))
        self.base = nn.Parameter(torch.empty(hc_mult, dtype=torch.float32))
        self.scale = nn.Parameter(torch.empty(1, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixes = _flat_mix(x, self.fn, self.norm_eps)
        pre = torch.sigmoid(mixes * fp32(self.scale) + fp32(self.base)) + self.hc_eps
        return (pre.unsqueeze(-1) * fp32(x)).sum(dim=2).to(x.dtype)
