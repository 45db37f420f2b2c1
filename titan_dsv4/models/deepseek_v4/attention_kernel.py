"""Fused attention core for GPUs (Triton): the sliding window and each query's compressed entries with the
sink, scores kept on chip.

The blocked torch path writes every fp32 score, probability and their gradients to memory between its
GEMMs and the softmax (54 GB per benchmark step; dsv4-spec.md §5.4: sink softmax in fp32). Here one program takes
one query and a block of its heads (one shared K=V head: all heads of a query see the same keys), walks its
window's raw keys, then its compressed entries through a per-query index list (``-1``: none), with an
online softmax whose denominator starts at the sink. Scores and softmax are fp32 from bf16 operands, the
probabilities enter the value GEMM as bf16, as in the torch path. Backward recomputes the scores from the
saved log-sum-exp; the query gradient is each program's own, the key/value gradient (K == V: one tensor)
is added atomically in fp32.

Runs on CUDA when Triton is installed, and on CPU under Triton's interpreter (``TRITON_INTERPRET=1``, set
before Triton is imported), which is how the tests prove it equal to the torch path.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # an optional extra: the torch path serves without it
    triton = None

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def available(device: torch.device) -> bool:
    """Triton is installed and, on CUDA, the GPU has bf16 tensor cores (sm_80 and later)."""
    if triton is None:
        return False
    # get_device_properties, not get_device_capability: torch.compile folds the former to a constant, and
    # this runs inside compiled blocks
    return device.type != "cuda" or torch.cuda.get_device_properties(device).major >= 8


if triton is not None:

    @triton.jit
    def bf16_dot(a, b, UPCAST: tl.constexpr):
        # the interpreter multiplies bf16 bit patterns (triton-lang/triton#11584); bf16 x bf16 products are
        # exact in fp32, so fp32 operands give the same sums. fp32 inputs stay fp32 (not TF32) on GPUs.
        if UPCAST or a.dtype == tl.float32:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        return tl.dot(a, b)

    @triton.jit
    def _program_rows(H, s_qb, s_qs, s_qh, s_lb, s_ls, D: tl.constexpr, BLOCK_H: tl.constexpr):
        """This program's query ``t``, batch row ``b``, heads ``h`` (and which exist), the int64 offset of
        its query in the tensors laid out as q (out, dout, dq: Pro's 128 x 512 per token passes 2^31 at 32k
        tokens), its ``[BLOCK_H, D]`` rows from there, and its ``[BLOCK_H]`` offsets in lse/delta."""
        t = tl.program_id(0)
        b = tl.program_id(1)
        h = tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H)
        query = b.to(tl.int64) * s_qb + t.to(tl.int64) * s_qs
        return t, b, h, h < H, query, h[:, None] * s_qh + tl.arange(0, D)[None, :], b * s_lb + t * s_ls + h

    @triton.jit
    def _key_tile(kv_ptr, ent_ptr, idx_ptr, doc_ptr, b, t, doc_t, tile, E, WINDOW,
                  s_kvb, s_kvs, s_eb, s_ep, s_ib, s_is, s_db,
                  D: tl.constexpr, BLOCK_N: tl.constexpr, N_WINDOW_TILES: tl.constexpr):
        """Pointers ``[BLOCK_N, D]`` to the keys of ``tile`` (window tiles first, then entry tiles) and
        which are seen."""
        n = tl.arange(0, BLOCK_N)
        d = tl.arange(0, D)
        if tile < N_WINDOW_TILES:
            j = t - WINDOW + 1 + tile * BLOCK_N + n
            ok = (j >= 0) & (j <= t)
            ok = ok & (tl.load(doc_ptr + b * s_db + j, mask=ok, other=-1) == doc_t)
            ptrs = kv_ptr + b * s_kvb + j[:, None] * s_kvs + d[None, :]
            rows = j
        else:
            e = (tile - N_WINDOW_TILES) * BLOCK_N + n
            rows = tl.load(idx_ptr + b * s_ib + t * s_is + e, mask=e < E, other=-1)
            ok = rows >= 0
            ptrs = ent_ptr + b * s_eb + rows[:, None] * s_ep + d[None, :]
        return ptrs, ok, rows

    @triton.jit
    def _tile_range(idx_ptr, b, t, E, WINDOW, s_ib, s_is, BLOCK_N: tl.constexpr, N_WINDOW_TILES: tl.constexpr,
                    ENTRY_SLOTS: tl.constexpr):
        """The tiles query ``t`` walks: from its first window tile holding a position >= 0 to its last listed
        entry's tile. Loop bounds rather than a per-tile skip: a load under a branch is not software-pipelined
        (its keys would arrive one tile at a time), and a tile of masked keys adds exactly nothing."""
        first = tl.maximum(WINDOW - 1 - t, 0) // BLOCK_N
        slots = tl.arange(0, ENTRY_SLOTS)
        listed = tl.load(idx_ptr + b * s_ib + t * s_is + slots, mask=slots < E, other=-1)
        return first, N_WINDOW_TILES + tl.cdiv(tl.max(tl.where(listed >= 0, slots + 1, 0)), BLOCK_N)

    @triton.jit
    def _tile_probabilities(q, ptrs, ok, h_ok, lse, scale, UPCAST: tl.constexpr):
        """A key tile and its final probabilities ``[BLOCK_H, BLOCK_N]`` (from the softmax's log-sum-exp)."""
        k = tl.load(ptrs, mask=ok[:, None], other=0.0)
        s = bf16_dot(q, tl.trans(k), UPCAST) * scale
        return k, tl.where(ok[None, :] & h_ok[:, None], tl.exp(s - lse[:, None]), 0.0)

    @triton.jit
    def _forward_kernel(q_ptr, kv_ptr, ent_ptr, idx_ptr, doc_ptr, sink_ptr, out_ptr, lse_ptr, mass_ptr,
                        H, E, WINDOW, scale,
                        s_qb, s_qs, s_qh, s_kvb, s_kvs, s_eb, s_ep, s_ib, s_is, s_db, s_lb, s_ls,
                        D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
                        N_WINDOW_TILES: tl.constexpr, ENTRY_SLOTS: tl.constexpr, UPCAST: tl.constexpr,
                        MASS: tl.constexpr):
        """``out`` (fp32) and ``lse``; with ``MASS`` also each listed entry's probability summed over heads
        into ``mass`` (laid out as the index list, zeroed by the caller)."""
        t, b, h, h_ok, query, rows_q, rows_l = _program_rows(H, s_qb, s_qs, s_qh, s_lb, s_ls, D, BLOCK_H)
        q = tl.load(q_ptr + query + rows_q, mask=h_ok[:, None], other=0.0)
        doc_t = tl.load(doc_ptr + b * s_db + t)
        # the sink starts the running max and denominator: it joins the softmax without a value
        m = tl.load(sink_ptr + h, mask=h_ok, other=0.0).to(tl.float32)
        denom = tl.full([BLOCK_H], 1.0, tl.float32)
        acc = tl.zeros([BLOCK_H, D], tl.float32)
        first, last = _tile_range(idx_ptr, b, t, E, WINDOW, s_ib, s_is, BLOCK_N, N_WINDOW_TILES, ENTRY_SLOTS)
        for tile in range(first, last):
            ptrs, ok, _ = _key_tile(kv_ptr, ent_ptr, idx_ptr, doc_ptr, b, t, doc_t, tile, E, WINDOW,
                                    s_kvb, s_kvs, s_eb, s_ep, s_ib, s_is, s_db, D, BLOCK_N, N_WINDOW_TILES)
            k = tl.load(ptrs, mask=ok[:, None], other=0.0)
            s = bf16_dot(q, tl.trans(k), UPCAST) * scale
            s = tl.where(ok[None, :], s, float("-inf"))
            # no key seen (another document, an unused slot): m stays (the sink made it finite), alpha = 1, p = 0
            m_new = tl.maximum(m, tl.max(s, axis=1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new[:, None])
            denom = denom * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + bf16_dot(p.to(k.dtype), k, UPCAST)
            m = m_new
        # the offsets written out again (``rows_q`` kept through the loop costs 64 registers per thread on sm_90)
        tl.store(out_ptr + query + h[:, None] * s_qh + tl.arange(0, D)[None, :], acc / denom[:, None],
                 mask=h_ok[:, None])
        lse = m + tl.log(denom)
        tl.store(lse_ptr + rows_l, lse, mask=h_ok)
        if MASS:  # a second pass over the entries, now that the denominator is known
            for tile in range(N_WINDOW_TILES, last):
                ptrs, ok, _ = _key_tile(kv_ptr, ent_ptr, idx_ptr, doc_ptr, b, t, doc_t, tile, E, WINDOW,
                                        s_kvb, s_kvs, s_eb, s_ep, s_ib, s_is, s_db, D, BLOCK_N, N_WINDOW_TILES)
                k, p = _tile_probabilities(q, ptrs, ok, h_ok, lse, scale, UPCAST)
                e = (tile - N_WINDOW_TILES) * BLOCK_N + tl.arange(0, BLOCK_N)
                tl.atomic_add(mass_ptr + b * s_ib + t * s_is + e, tl.sum(p, axis=0), mask=ok,  # head blocks
                              sem="relaxed")

    @triton.jit
    def _backward_kernel(q_ptr, kv_ptr, ent_ptr, idx_ptr, doc_ptr, lse_ptr, delta_ptr, dout_ptr,
                         dq_ptr, dkv_ptr, dent_ptr,
                         H, E, WINDOW, scale,
                         s_qb, s_qs, s_qh, s_kvb, s_kvs, s_eb, s_ep, s_ib, s_is, s_db, s_lb, s_ls,
                         D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
                         N_WINDOW_TILES: tl.constexpr, ENTRY_SLOTS: tl.constexpr, UPCAST: tl.constexpr):
        t, b, h, h_ok, query, rows_q, rows_l = _program_rows(H, s_qb, s_qs, s_qh, s_lb, s_ls, D, BLOCK_H)
        d = tl.arange(0, D)
        q = tl.load(q_ptr + query + rows_q, mask=h_ok[:, None], other=0.0)
        dout = tl.load(dout_ptr + query + rows_q, mask=h_ok[:, None], other=0.0)
        lse = tl.load(lse_ptr + rows_l, mask=h_ok, other=0.0)
        delta = tl.load(delta_ptr + rows_l, mask=h_ok, other=0.0)
        doc_t = tl.load(doc_ptr + b * s_db + t)
        dq = tl.zeros([BLOCK_H, D], tl.float32)
        first, last = _tile_range(idx_ptr, b, t, E, WINDOW, s_ib, s_is, BLOCK_N, N_WINDOW_TILES, ENTRY_SLOTS)
        for tile in range(first, last):
            ptrs, ok, rows = _key_tile(kv_ptr, ent_ptr, idx_ptr, doc_ptr, b, t, doc_t, tile, E, WINDOW,
                                       s_kvb, s_kvs, s_eb, s_ep, s_ib, s_is, s_db, D, BLOCK_N, N_WINDOW_TILES)
            k, p = _tile_probabilities(q, ptrs, ok, h_ok, lse, scale, UPCAST)  # p = 0 where no key is seen
            dp = bf16_dot(dout, tl.trans(k), UPCAST)
            ds = (p * (dp - delta[:, None])).to(k.dtype)  # enters the GEMMs as bf16, as in the torch path
            dq += bf16_dot(ds, k, UPCAST)
            # K == V: the key and value gradients of these rows, summed
            dk = bf16_dot(tl.trans(ds), q, UPCAST) * scale + bf16_dot(tl.trans(p.to(k.dtype)), dout, UPCAST)
            if tile < N_WINDOW_TILES:
                dptrs = dkv_ptr + b * s_kvb + rows[:, None] * s_kvs + d[None, :]
            else:
                dptrs = dent_ptr + b * s_eb + rows[:, None] * s_ep + d[None, :]
            # relaxed: nothing reads these sums before the kernel ends; Triton's default (acq_rel) fences device
            # memory before every atomic instruction and invalidates L1 after it (8 per tile)
            tl.atomic_add(dptrs, dk, mask=ok[:, None], sem="relaxed")
        tl.store(dq_ptr + query + h[:, None] * s_qh + tl.arange(0, D)[None, :],
                 (dq * scale).to(dq_ptr.dtype.element_ty), mask=h_ok[:, None])


BLOCK_N = 16  # keys per tile
NUM_WARPS = 8
NUM_STAGES = 2  # key tiles in flight: the next one loads while this one computes (3 spilled the backward)


def launch_config(heads: int, head_dim: int, window: int, entries: int) -> dict[str, int]:
    """The kernels' compile-time sizes. Heads per program: a power of two of at least 16 (``tl.dot``'s
    smallest tile) and at most 32, so that a 512-d query, its output gradient and the fp32 accumulators
    fit the registers of 8 warps (sm_90, Triton 3.8, ``scripts/compile_kernels.py``: forward 148
    registers per thread, backward 255, no spill)."""
    if head_dim & (head_dim - 1):
        raise ValueError(f"the fused attention kernel needs a power-of-two head_dim, got {head_dim}")
    return dict(D=head_dim, BLOCK_H=min(32, max(16, triton.next_power_of_2(heads))), BLOCK_N=BLOCK_N,
                N_WINDOW_TILES=triton.cdiv(window, BLOCK_N), ENTRY_SLOTS=triton.next_power_of_2(max(entries, 1)),
                num_warps=NUM_WARPS, num_stages=NUM_STAGES)


def _launch(kernel, q, kv, entries, entry_index, doc_ids, window: int, *tensors: torch.Tensor, **flags) -> None:
    """One program per (query, batch row, block of heads). ``q`` and the ``[B, S, H, D]`` tensors among
    ``tensors`` are contiguous (they share ``q``'s strides), as are the ``[B, S, H]`` ones and the
    ``[B, S, E]`` ones (the index list's)."""
    batch, seq, heads, dim = q.shape
    config = launch_config(heads, dim, window, entry_index.shape[-1])
    kernel[(seq, batch, triton.cdiv(heads, config["BLOCK_H"]))](
        q, kv, entries, entry_index, doc_ids, *tensors, heads, entry_index.shape[-1], window, dim**-0.5,
        q.stride(0), q.stride(1), q.stride(2), kv.stride(0), kv.stride(1), entries.stride(0),
        entries.stride(1), entry_index.stride(0), entry_index.stride(1), doc_ids.stride(0), seq * heads, heads,
        UPCAST=INTERPRETED, **config, **flags,
    )


@torch.library.custom_op("titan_dsv4::fused_attention", mutates_args=())
def _fused_attention(q: torch.Tensor, kv: torch.Tensor, entries: torch.Tensor, entry_index: torch.Tensor,
                     doc_ids: torch.Tensor, sink: torch.Tensor, window: int,
                     entry_mass: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, seq, heads, _ = q.shape
    # fp32: backward's delta = dO . O cancels; from a bf16 O the sink's gradient was 6x less accurate
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.empty(batch, seq, heads, dtype=torch.float32, device=q.device)
    mass = torch.zeros(entry_index.shape if entry_mass else (0,), dtype=torch.float32, device=q.device)
    _launch(_forward_kernel, q, kv, entries, entry_index, doc_ids, window, sink.float().contiguous(), out, lse,
            mass if entry_mass else lse, MASS=entry_mass)  # (lse: a pointer never written without MASS)
    return out, lse, mass


@_fused_attention.register_fake
def _(q, kv, entries, entry_index, doc_ids, sink, window, entry_mass):
    mass = q.new_empty(entry_index.shape if entry_mass else (0,), dtype=torch.float32)
    return q.new_empty(q.shape, dtype=torch.float32), q.new_empty(q.shape[:3], dtype=torch.float32), mass


@torch.library.custom_op("titan_dsv4::fused_attention_backward", mutates_args=())
def _fused_attention_backward(grad_out: torch.Tensor, q: torch.Tensor, kv: torch.Tensor, entries: torch.Tensor,
                              entry_index: torch.Tensor, doc_ids: torch.Tensor, lse: torch.Tensor,
                              delta: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``q``, ``kv`` and ``entries``; ``grad_out`` in ``q``'s dtype (the kernel's GEMM operand)."""
    grad_q = torch.empty_like(q)
    grad_kv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
    grad_entries = torch.zeros(entries.shape, dtype=torch.float32, device=entries.device)
    _launch(_backward_kernel, q, kv, entries, entry_index, doc_ids, window, lse, delta, grad_out.contiguous(),
            grad_q, grad_kv, grad_entries)
    return grad_q, grad_kv.to(kv.dtype), grad_entries.to(entries.dtype)


@_fused_attention_backward.register_fake
def _(grad_out, q, kv, entries, entry_index, doc_ids, lse, delta, window):
    return torch.empty_like(q), torch.empty_like(kv), torch.empty_like(entries)


def _setup_context(ctx, inputs, output) -> None:
    q, kv, entries, entry_index, doc_ids, sink, window, _ = inputs
    out, lse, mass = output
    ctx.mark_non_differentiable(lse, mass)
    ctx.save_for_backward(q, kv, entries, entry_index, doc_ids, sink, out, lse)
    ctx.window = window


def _backward(ctx, grad_out, _grad_lse, _grad_mass):
    """The per-row ``delta = sum_j p_j dp_j = dO . O`` and the cast of ``dO`` to the GEMMs' dtype are torch ops
    here, outside the opaque kernel: compiled, they fuse with the ops that made ``dO``. ``dO`` arrives fp32
    (the output's dtype) holding bf16 values in bf16 models: the cast loses nothing, and the kernel's GEMMs
    take operands of one dtype."""
    q, kv, entries, entry_index, doc_ids, sink, out, lse = ctx.saved_tensors
    delta = (grad_out.float() * out).sum(-1)
    grad_q, grad_kv, grad_entries = _fused_attention_backward(grad_out.to(q.dtype), q, kv, entries, entry_index,
                                                              doc_ids, lse, delta, ctx.window)
    # the sink's probability exp(sink - lse) only shrinks the others': d/dsink = -p_sink * delta
    grad_sink = -(torch.exp(sink.float() - lse) * delta).sum(dim=(0, 1)).to(sink.dtype)
    return grad_q, grad_kv, grad_entries, None, None, grad_sink, None, None


_fused_attention.register_autograd(_backward, setup_context=_setup_context)


def fused_attention(q: torch.Tensor, kv: torch.Tensor, entries: torch.Tensor, entry_index: torch.Tensor,
                    doc_ids: torch.Tensor, sink: torch.Tensor, window: int,
                    entry_mass: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``out [B, S, H, D]`` of queries ``q`` over their window of ``kv`` ``[B, S, D]`` (same document) and
    their listed ``entries`` ``[B, P, D]`` (``entry_index`` ``[B, S, E]``, ``-1``: none), with the per-head
    ``sink`` in every denominator; with ``entry_mass`` also the probability of each listed entry summed over
    heads ``[B, S, E]`` (fp32, no gradient: the indexer's KL target), else None."""
    out, _, mass = _fused_attention(q.contiguous(), kv.contiguous(), entries.contiguous(),
                                    entry_index.to(torch.int32).contiguous(), doc_ids.to(torch.int32).contiguous(),
                                    sink, window, entry_mass)
    return out.to(q.dtype), (mass if entry_mass else None)
