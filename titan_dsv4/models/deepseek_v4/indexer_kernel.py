"""The lightning indexer's scores for GPUs (Triton): ``Σ_h w_h · relu(q_h · k) · scale`` per (query, entry),
the per-head scores kept on chip.

Written out, the per-head fp32 scores ``[B, S, heads, P]`` are 64x the summed ``[B, S, P]`` (Flash: 64
index heads), written by a GEMM and read back for the sum: 2 GiB per CSA layer at 2 x 4k tokens, and the
reason the torch path scores long sequences in chunks of queries. Here one program takes a tile of entries
and a block of queries: each query's heads against the tile in one ``tl.dot`` (heads padded to 16, ``tl.dot``'s
smallest tile), ReLU, weighting and the head sum in registers, one ``[BLOCK_P]`` row written. Backward (only
while the indexer trains with its KL loss) recomputes the per-head scores in torch, as the torch path's
autograd would have kept them.

Runs on CUDA when Triton is installed, and on CPU under Triton's interpreter (the tests).
"""

from __future__ import annotations

import torch

from .attention_kernel import INTERPRETED, available, triton
from .fp32_linear import matmul_fp32_result

BLOCK_P = 64  # entries per program
BLOCK_Q = 16  # queries per program (each entry tile is loaded once for them)
NUM_WARPS = 4

if triton is not None:  # an optional extra: the torch path serves without it
    import triton.language as tl

    from .attention_kernel import bf16_dot

    @triton.jit
    def _scores_kernel(q_ptr, k_ptr, w_ptr, out_ptr, H, Q, P, scale,
                       s_qb, s_qs, s_qh, s_kb, s_kp, s_wb, s_ws, s_ob, s_os,
                       D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_Q: tl.constexpr,
                       BLOCK_P: tl.constexpr, UPCAST: tl.constexpr):
        b = tl.program_id(2).to(tl.int64)
        p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        p_ok = p < P
        h = tl.arange(0, BLOCK_H)
        h_ok = h < H
        d = tl.arange(0, D)
        k = tl.load(k_ptr + b * s_kb + p.to(tl.int64)[:, None] * s_kp + d[None, :], mask=p_ok[:, None], other=0.0)
        for i in range(BLOCK_Q):
            t = (tl.program_id(1) * BLOCK_Q + i).to(tl.int64)
            q_ok = t < Q
            q = tl.load(q_ptr + b * s_qb + t * s_qs + h[:, None] * s_qh + d[None, :],
                        mask=q_ok & h_ok[:, None], other=0.0)
            w = tl.load(w_ptr + b * s_wb + t * s_ws + h, mask=q_ok & h_ok, other=0.0)
            s = tl.maximum(bf16_dot(q, tl.trans(k), UPCAST), 0.0) * scale  # [BLOCK_H, BLOCK_P]
            tl.store(out_ptr + b * s_ob + t * s_os + p, tl.sum(s * w[:, None], axis=0), mask=q_ok & p_ok)


def launch_config(heads: int, head_dim: int) -> dict[str, int]:
    """The kernel's compile-time sizes for ``heads`` index heads of ``head_dim``."""
    return dict(D=head_dim, BLOCK_H=max(16, triton.next_power_of_2(heads)), BLOCK_Q=BLOCK_Q, BLOCK_P=BLOCK_P,
                num_warps=NUM_WARPS)


def supports(device: torch.device, head_dim: int) -> bool:
    """Triton runs on ``device`` and ``head_dim`` is a power of two of at least 16 (a ``tl.dot`` side)."""
    return available(device) and head_dim >= 16 and head_dim & (head_dim - 1) == 0


@torch.library.custom_op("titan_dsv4::index_scores", mutates_args=())
def _index_scores(q: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor, scale: float) -> torch.Tensor:
    batch, queries, heads, dim = q.shape
    entries = keys.shape[1]
    out = torch.empty(batch, queries, entries, dtype=torch.float32, device=q.device)
    config = launch_config(heads, dim)
    grid = (triton.cdiv(entries, BLOCK_P), triton.cdiv(queries, BLOCK_Q), batch)
    _scores_kernel[grid](q, keys, weights, out, heads, queries, entries, scale,
                         q.stride(0), q.stride(1), q.stride(2), keys.stride(0), keys.stride(1),
                         weights.stride(0), weights.stride(1), out.stride(0), out.stride(1),
                         UPCAST=INTERPRETED, **config)
    return out


@_index_scores.register_fake
def _(q, keys, weights, scale):
    return q.new_empty((*q.shape[:2], keys.shape[1]), dtype=torch.float32)


def _setup_context(ctx, inputs, output) -> None:
    q, keys, weights, scale = inputs
    ctx.save_for_backward(q, keys, weights)
    ctx.scale = scale


def _backward(ctx, grad: torch.Tensor):
    """The per-head scores again (fp32 from the bf16 operands), then the gradients as the torch path's
    autograd gives them: the scores' gradient enters the q/keys GEMMs rounded to the operands' dtype."""
    q, keys, weights = ctx.saved_tensors
    batch, queries, heads, dim = q.shape
    scores = matmul_fp32_result(q.reshape(batch, queries * heads, dim), keys.transpose(1, 2))
    scores = scores.view(batch, queries, heads, -1)
    grad = grad.unsqueeze(2)  # [B, Q, 1, P]
    grad_weights = (grad * scores.relu()).sum(-1) * ctx.scale
    grad_scores = (grad * weights.unsqueeze(-1) * ctx.scale).masked_fill(scores <= 0, 0.0).to(q.dtype)
    grad_scores = grad_scores.view(batch, queries * heads, -1)
    grad_q = (grad_scores @ keys).view(q.shape)
    grad_keys = grad_scores.transpose(1, 2) @ q.reshape(batch, queries * heads, dim)
    return grad_q, grad_keys, grad_weights, None


_index_scores.register_autograd(_backward, setup_context=_setup_context)


def index_scores(q: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor, scale: float) -> torch.Tensor:
    """``[B, Q, P]`` fp32: ``Σ_h weights[b, t, h] · relu(q[b, t, h] · keys[b, p]) · scale`` for queries
    ``q [B, Q, H, D]``, entries ``keys [B, P, D]`` and ``weights [B, Q, H]`` (fp32). Operands of different
    dtypes meet in the wider one, as the torch path's product does."""
    dtype = torch.promote_types(q.dtype, keys.dtype)
    return _index_scores(q.to(dtype).contiguous(), keys.to(dtype).contiguous(), weights.float().contiguous(),
                         scale)
