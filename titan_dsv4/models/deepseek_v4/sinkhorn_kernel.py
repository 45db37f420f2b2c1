"""mHC's Sinkhorn for GPUs (Triton): softmax, ``+ eps`` and all ``2 * iters - 1`` normalisations of a
token's ``n x n`` mixing matrix in registers, one kernel forward and one backward.

Compiled by inductor, the 20-iteration chain was 121 kernels per mHC site (each normalisation's sum over a
4-long axis is a reduction kernel of its own), launched 14 times per step of the benchmark model. Between
forward and backward only the logits are kept (64 bytes per token), not every iterate and its sums as the
torch path keeps (~80 bytes per token per normalisation: ~1 GiB per 4k tokens through Flash's 43 layers
without activation checkpointing). The backward kernel runs the forward again, writing each step's input to a
workspace that lives for that kernel only (~2.5 KB per token, L2-sized at a microbatch), then walks it back.

Runs on CUDA when Triton is installed, and on CPU under Triton's interpreter (the tests).
"""

from __future__ import annotations

import torch

from .attention_kernel import available, triton

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _tile(pid, tokens, N: tl.constexpr, BLOCK: tl.constexpr):
        """The offsets ``[BLOCK, N, N]`` of this program's tokens' matrices and which tokens exist."""
        token = pid * BLOCK + tl.arange(0, BLOCK)
        j = tl.arange(0, N)
        offsets = token[:, None, None] * (N * N) + j[None, :, None] * N + j[None, None, :]
        return offsets, (token < tokens)[:, None, None]

    @triton.jit
    def _softmax(x):
        """Over the last axis (``k``); in fp32."""
        e = tl.exp(x - tl.max(x, axis=2)[:, :, None])
        return e / tl.sum(e, axis=2)[:, :, None]

    @triton.jit
    def _sums(x, columns):
        """Each entry's column sum (over ``j``) or row sum (over ``k``), broadcast back to ``[BLOCK, N, N]``."""
        return tl.where(columns, tl.sum(x, axis=1)[:, None, :], tl.sum(x, axis=2)[:, :, None])

    # do_not_specialize: Triton makes an int argument equal to 1 a constant, which has no ``.to``; a single
    # token (or one normalisation) must run the same code
    @triton.jit(do_not_specialize=["tokens", "steps"])
    def _forward_kernel(logits_ptr, out_ptr, tokens, steps, eps, N: tl.constexpr, BLOCK: tl.constexpr):
        offsets, ok = _tile(tl.program_id(0), tokens, N, BLOCK)
        x = _softmax(tl.load(logits_ptr + offsets, mask=ok, other=0.0)) + eps
        for step in range(steps):  # even steps normalise columns, odd ones rows
            x = x / (_sums(x, step % 2 == 0) + eps)
        tl.store(out_ptr + offsets, x, mask=ok)

    @triton.jit(do_not_specialize=["tokens", "steps"])
    def _backward_kernel(logits_ptr, grad_ptr, grad_logits_ptr, work_ptr, tokens, steps, eps,
                         N: tl.constexpr, BLOCK: tl.constexpr):
        offsets, ok = _tile(tl.program_id(0), tokens, N, BLOCK)
        plane = tokens.to(tl.int64) * (N * N)  # one iterate of every token in the workspace
        probs = _softmax(tl.load(logits_ptr + offsets, mask=ok, other=0.0))
        x = probs + eps
        for step in range(steps):  # the forward again, each step's input to the workspace
            tl.store(work_ptr + step * plane + offsets, x, mask=ok)
            x = x / (_sums(x, step % 2 == 0) + eps)
        tl.debug_barrier()
        g = tl.load(grad_ptr + offsets, mask=ok, other=0.0)
        for back in range(steps):
            step = steps - 1 - back
            x = tl.load(work_ptr + step * plane + offsets, mask=ok, other=1.0)
            columns = step % 2 == 0
            denom = _sums(x, columns) + eps
            # y = x / (sum(x) + eps): dx = (g - sum(g * y)) / (sum(x) + eps)
            g = (g - _sums(g * (x / denom), columns)) / denom
        g = probs * (g - tl.sum(g * probs, axis=2)[:, :, None])
        tl.store(grad_logits_ptr + offsets, g, mask=ok)


BLOCK = 32  # tokens per program: 8192 tokens are 256 programs (an H100 has 132 SMs)
NUM_WARPS = 2


def _launch(kernel, logits: torch.Tensor, *tensors: torch.Tensor, iters: int, eps: float) -> None:
    n = logits.shape[-1]
    tokens = logits.numel() // (n * n)
    kernel[(triton.cdiv(tokens, BLOCK),)](logits, *tensors, tokens, 2 * iters - 1, eps, N=n, BLOCK=BLOCK,
                                          num_warps=NUM_WARPS)


@torch.library.custom_op("titan_dsv4::sinkhorn", mutates_args=())
def _sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    out = torch.empty_like(logits)
    _launch(_forward_kernel, logits, out, iters=iters, eps=eps)
    return out


@_sinkhorn.register_fake
def _(logits, iters, eps):
    return torch.empty_like(logits)


@torch.library.custom_op("titan_dsv4::sinkhorn_backward", mutates_args=())
def _sinkhorn_backward(grad: torch.Tensor, logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    grad_logits = torch.empty_like(logits)
    work = logits.new_empty((2 * iters - 1, *logits.shape))  # every step's input, for this kernel only
    _launch(_backward_kernel, logits, grad.contiguous(), grad_logits, work, iters=iters, eps=eps)
    return grad_logits


@_sinkhorn_backward.register_fake
def _(grad, logits, iters, eps):
    return torch.empty_like(logits)


def _setup_context(ctx, inputs, output) -> None:
    logits, ctx.iters, ctx.eps = inputs
    ctx.save_for_backward(logits)


def _backward(ctx, grad):
    return _sinkhorn_backward(grad, ctx.saved_tensors[0], ctx.iters, ctx.eps), None, None


_sinkhorn.register_autograd(_backward, setup_context=_setup_context)


def supports(device: torch.device, n: int) -> bool:
    """Triton runs on ``device`` (as for the attention kernel) and ``n`` streams are a power of two (a
    Triton tile side)."""
    return available(device) and n & (n - 1) == 0


def sinkhorn(comb_logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """``comb_logits [..., n, n]``: softmax over the last axis, ``+ eps``, then ``iters`` column and
    ``iters - 1`` row normalisations (column first, each ``x / (sum + eps)``), in fp32."""
    return _sinkhorn(comb_logits.float().contiguous(), iters, eps)
