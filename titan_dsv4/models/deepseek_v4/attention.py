"""DeepSeek-V4 attention: sliding window + compressed entries (CSA with lightning indexer, or HCA), sinks.

One shared 512-d K=V head, per-head weightless RMS on queries, interleaved RoPE on the trailing dims,
inverse RoPE on the output, and a grouped low-rank output projection (dsv4-spec.md §2.4-2.7).

Scores are computed for query blocks, all blocks in one batched matmul: a block of ``b`` queries sees the
``b + window`` raw keys ending at its last query, so a sliding-window layer never forms ``[S, S]``. The
compressed entries are either scored densely under the visibility mask (HCA; CSA while few entries exist)
or, for CSA once entries outnumber the indexer's top-k 4:1, gathered per query so only the chosen ones
are touched. ``query_block=None`` (one block: every raw key) is the dense reference; ``auto`` picks
128-query blocks on GPUs and for sequences longer than 256 (faster on CPU too). The sink joins every
softmax's denominator. On CUDA the core is instead the fused Triton kernel of ``attention_kernel.py``
(scores kept on chip; while the indexer trains it also sums each chosen entry's probability over heads, the
KL's target). All paths are the same math and are tested equal.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from . import attention_kernel, indexer_kernel
from .args import CSA_RATIO, DeepseekV4ModelArgs
from .fp32_linear import fp32_linear, fp32_matmul, matmul_fp32_result
from .gpu_paths import takes_gpu_path, takes_triton_kernels
from .norm import RMSNorm, fp32, rms_normalise
from .qat import indexer_qat, kv_qat
from .rope import apply_rope, rope_rotation
from .running_stats import recomputing
from .sequence_shard import SequenceShard

AUTO_BLOCK = 128  # query block used by ``auto`` on GPUs and for sequences longer than 2 blocks
GATHER_RATIO = 4  # CSA gathers its chosen entries once there are this many entries per chosen one
SCORE_BUDGET = 2**28  # fp32 score elements of one query chunk (1 GiB): bounds the transient memory


@dataclass
class AttentionContext:
    """Per-batch tensors every layer needs; built once per forward by the model. Under context parallelism
    (``shard``) they cover the shard extended by its halo, the sequence every attention runs on."""

    positions: torch.Tensor  # [B, S] position inside the document
    doc_ids: torch.Tensor  # [B, S]
    inv_freq: dict[str, torch.Tensor]  # "main" / "compress" -> [rope_dim / 2]
    rotation: dict[str, torch.Tensor]  # RoPE (cos, sin) at ``positions`` (rope.py)
    shard: SequenceShard | None = None


@dataclass
class CompressedEntries:
    kv: torch.Tensor  # [B, P, d]
    end: torch.Tensor  # [B, P] index of the last token of each entry's window
    doc: torch.Tensor  # [B, P] document of the entry
    valid: torch.Tensor  # [B, P] bool (rows have different entry counts; padding is invalid)

    def visible(self, query_index: torch.Tensor, query_doc: torch.Tensor) -> torch.Tensor:
        """``[B, Q, P]``: the entry's window lies in the query's document, at or before the query."""
        return (
            self.valid[:, None, :]
            & (self.end[:, None, :] <= query_index[None, :, None])
            & (self.doc[:, None, :] == query_doc[:, :, None])
        )


def every_shards_entries(entries: CompressedEntries, shard: SequenceShard, local: int) -> CompressedEntries:
    """The entries of the whole sequence, in order, from those pooled on this shard's extended sequence (its
    ``local`` tokens after the halo): each shard contributes the entries whose window ends in it (those ending
    in its halo are the previous shard's). ``end`` stays in this shard's coordinates (negative before its
    halo); later shards' entries are invisible to its queries by their ``end``."""
    origin = shard.index * local - shard.halo  # whole-sequence index of this shard's first (halo) token
    own = entries.valid & (entries.end >= shard.halo)
    meta = shard.gather(torch.stack([entries.end + origin, entries.doc, own.long()], dim=-1))
    return CompressedEntries(kv=shard.gather_with_grad(entries.kv), end=meta[..., 0] - origin, doc=meta[..., 1],
                             valid=meta[..., 2].bool())


def _gather_entries(kv: torch.Tensor, top: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Each query's chosen entries: ``kv`` ``[B, P, d]``, ``top`` ``[B, Q, k]`` -> ``shape`` (``[B, n, s, k,
    d]``, the queries' blocks)."""
    return kv[torch.arange(kv.shape[0], device=kv.device)[:, None, None], top].view(shape)


def _scatter_entries(grad: torch.Tensor, kv: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """The gradient of ``kv`` from that of its gathered copy (summed over the queries that chose an entry)."""
    batch, entries, d = kv.shape
    rows = (top + entries * torch.arange(batch, device=kv.device)[:, None, None]).flatten()
    grad_kv = torch.zeros(batch * entries, d, dtype=grad.dtype, device=grad.device)
    return grad_kv.index_add_(0, rows, grad.reshape(-1, d)).view(batch, entries, d).to(kv.dtype)


class _GatheredEntryProduct(torch.autograd.Function):
    """``queries x entries -> scores`` (``scores=True``) or ``probs x entries -> out`` with each query's chosen
    entries gathered again in backward instead of kept: kept, they are ``[B, S, topk, 512]`` (32 GiB per CSA
    layer at 64k tokens, at any activation-checkpointing setting)."""

    @staticmethod
    def forward(ctx, operand: torch.Tensor, kv: torch.Tensor, top: torch.Tensor, shape: torch.Size,
                scores: bool) -> torch.Tensor:
        ctx.save_for_backward(operand, kv, top)
        ctx.shape, ctx.scores = shape, scores
        keys = _gather_entries(kv, top, shape)  # [B, n, s, k, d]
        if scores:  # operand: queries [B, n, s, h, d] -> fp32 [B, n, h, s, k]
            return matmul_fp32_result(operand, keys.transpose(-1, -2)).transpose(2, 3)
        return torch.einsum("bnhqk,bnqkd->bnqhd", operand, keys)  # operand: probs -> [B, n, s, h, d]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        operand, kv, top = ctx.saved_tensors
        keys = _gather_entries(kv, top, ctx.shape)
        grad = grad.to(kv.dtype)  # the fp32 scores' gradient enters bf16 GEMMs (as with fp32_matmul)
        if ctx.scores:
            grad_operand = torch.einsum("bnhqk,bnqkd->bnqhd", grad, keys).to(operand.dtype)
            grad_keys = torch.einsum("bnhqk,bnqhd->bnqkd", grad, operand)
        else:
            grad_operand = torch.einsum("bnqhd,bnqkd->bnhqk", grad, keys).to(operand.dtype)
            grad_keys = torch.einsum("bnhqk,bnqhd->bnqkd", operand, grad)
        grad_kv = _scatter_entries(grad_keys, kv, top) if ctx.needs_input_grad[1] else None
        return grad_operand, grad_kv, None, None, None


class Compressor(nn.Module):
    """Pools every ``ratio`` tokens of a document into one RMS-normed, RoPE'd entry (fp32 math).

    With ``overlap`` (ratio 4, CSA) each entry pools 2·ratio tokens: the previous window through channels
    ``[:d]`` and the current one through ``[d:]``, so the projections are ``2d`` wide.
    """

    def __init__(self, hidden_size: int, head_dim: int, ratio: int, overlap: bool, norm_eps: float):
        super().__init__()
        self.head_dim, self.ratio, self.overlap = head_dim, ratio, overlap
        width = (2 if overlap else 1) * head_dim
        self.wkv = nn.Linear(hidden_size, width, bias=False)
        self.wgate = nn.Linear(hidden_size, width, bias=False)
        self.ape = nn.Parameter(torch.empty(ratio, width, dtype=torch.float32))
        self.norm = RMSNorm(head_dim, norm_eps)

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> CompressedEntries:
        batch, seq, _ = x.shape
        m, d = self.ratio, self.head_dim
        pos, doc = ctx.positions, ctx.doc_ids
        index = torch.arange(seq, device=x.device)
        start = (index - (m - 1)).clamp(min=0)
        is_end = (pos % m == m - 1) & (index >= m - 1) & (doc.gather(1, start.expand(batch, -1)) == doc)
        counts = is_end.sum(dim=1)
        num = seq // m  # the most entries a row can have (disjoint windows): a static shape, no host sync
        # stable sort puts each row's window ends first, in order
        order = torch.sort((~is_end).to(torch.int8), dim=1, stable=True).indices[:, :num]
        valid = torch.arange(num, device=x.device)[None, :] < counts[:, None]
        end = torch.where(valid, order, torch.full_like(order, m - 1))

        kv = fp32_linear(x, self.wkv.weight)
        gate = fp32_linear(x, self.wgate.weight)
        slots = end[:, :, None] - (m - 1) + torch.arange(m, device=x.device)  # [B, P, m]
        kv_w = _gather_tokens(kv, slots)
        gate_w = _gather_tokens(gate, slots) + fp32(self.ape)
        if self.overlap:
            prev = slots - m
            has_prev = (prev[:, :, 0] >= 0) & valid
            has_prev &= doc.gather(1, prev[:, :, 0].clamp(min=0)) == doc.gather(1, end)
            kv_p = _gather_tokens(kv, prev.clamp(min=0))[..., :d]
            gate_p = _gather_tokens(gate, prev.clamp(min=0))[..., :d] + fp32(self.ape)[:, :d]
            kv_p = torch.where(has_prev[..., None, None], kv_p, torch.zeros_like(kv_p))
            gate_p = torch.where(has_prev[..., None, None], gate_p, torch.full_like(gate_p, float("-inf")))
            kv_w = torch.cat([kv_p, kv_w[..., d:]], dim=2)
            gate_w = torch.cat([gate_p, gate_w[..., d:]], dim=2)
        pooled = (kv_w * gate_w.softmax(dim=2)).sum(dim=2)  # per-channel softmax over the window's tokens
        pooled = self.norm(pooled.to(x.dtype))
        entry_pos = pos.gather(1, end) - (m - 1)
        pooled = apply_rope(pooled, rope_rotation(entry_pos, ctx.inv_freq["compress"]))
        return CompressedEntries(kv=pooled, end=end, doc=doc.gather(1, end), valid=valid)


def _gather_tokens(x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """``x[b, slots[b, p, j]]`` -> ``[B, P, m, C]``."""
    batch, num, m = slots.shape
    flat = slots.reshape(batch, num * m, 1).expand(-1, -1, x.shape[-1])
    return x.gather(1, flat).view(batch, num, m, x.shape[-1])


def topk_earliest_first(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest fp32 scores along the last axis, exact ties going to the earliest entry.

    ReLU makes exact ties (often at 0) common, and ``torch.topk``'s order among ties depends on the length
    of the axis, so with it a packed row chose different entries alone and in a padded batch. Each score is
    mapped to an order-preserving int32, and the position goes in the low bits of one int64 key.
    """
    bits = (scores.float() + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0: they tie
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()
    position = torch.arange(scores.shape[-1] - 1, -1, -1, device=scores.device)
    return ((ordered << 32) | position).topk(k, dim=-1).indices


def indexer_kl(mass: torch.Tensor, index_scores: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """Per-query ``KL(p || softmax(I))`` over the chosen entries (DeepSeek-V3.2's sparse-stage indexer loss):
    ``p`` is the main attention on those entries summed over heads (``mass``) and L1-normalised (a target,
    no grad).

    ``mass``, ``index_scores``, ``chosen``: ``[B, Q, P]`` -> ``[B, Q]`` (0 where nothing was chosen)."""
    target = mass.detach() * chosen
    target = target / target.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(target.dtype).tiny)
    rows = chosen.any(dim=-1, keepdim=True)
    logits = torch.where(chosen, index_scores, torch.where(rows, float("-inf"), 0.0))
    log_q = torch.where(chosen, logits.log_softmax(dim=-1), 0.0)
    return (torch.xlogy(target, target) - target * log_q).sum(dim=-1)


class _AttachLoss(torch.autograd.Function):
    """Identity on ``out`` whose backward also starts ``loss``'s backward with gradient 1, so an auxiliary
    loss inside any pipeline stage trains its parameters without travelling to the last stage."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        ctx.loss_meta = (loss.shape, loss.dtype, loss.device)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        shape, dtype, device = ctx.loss_meta
        return grad, torch.ones(shape, dtype=dtype, device=device)


def index_scores(q: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor, scale: float) -> torch.Tensor:
    """The lightning indexer's ``Σ_h weights_h · relu(q_h · keys) · scale`` ``[B, Q, P]`` (fp32) in torch, for
    ``q [B, Q, H, D]``, ``keys [B, P, D]``, ``weights [B, Q, H]``; ``indexer_kernel`` is its Triton twin."""
    batch, queries, heads, _ = q.shape
    # a batched product of activations, like the attention scores (op-level activation checkpointing
    # recomputes those and keeps the projections' 2-D GEMMs)
    scores = fp32_matmul(q.flatten(1, 2), keys.transpose(1, 2)).view(batch, queries, heads, -1)
    # a weighted sum over heads, not an einsum: that is a batched GEMM, whose operand (the relu'd scores,
    # the size of the per-head scores) must be written out; compiled, this fuses into one pass
    return (scores.relu() * scale * weights.unsqueeze(-1)).sum(dim=2)


class Indexer(nn.Module):
    """Lightning indexer: scores compressed entries per query and keeps the top ``index_topk``.

    The selection is not differentiable, so its parameters learn nothing from the LM loss: either they are
    frozen (``training.indexer_loss_coeff = 0``, fine-tuning), or ``Attention`` trains them with the KL
    indexer loss (:func:`indexer_kl`) on inputs detached from the main model.
    """

    def __init__(self, args: DeepseekV4ModelArgs):
        super().__init__()
        self.n_heads, self.head_dim, self.topk = args.index_n_heads, args.index_head_dim, args.index_topk
        self.wq_b = nn.Linear(args.q_lora_rank, args.index_n_heads * args.index_head_dim, bias=False)
        self.weights_proj = nn.Linear(args.hidden_size, args.index_n_heads, bias=False)
        self.compressor = Compressor(args.hidden_size, args.index_head_dim, CSA_RATIO, True, args.rms_norm_eps)
        self.qat = False  # queries and keys rotated and rounded to FP4 as the released indexer's (qat.py)
        # sum of the per-query indexer KL since the trainer last read it (for logging; not saved)
        self.register_buffer("kl_sum", torch.zeros((), dtype=torch.float64), persistent=False)

    def keys(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """The compressed keys ``[B, P, D]`` the queries are scored against."""
        keys = self.compressor(x, ctx).kv
        return indexer_qat(keys) if self.qat else keys

    def select(self, x: torch.Tensor, qr: torch.Tensor, rotation: torch.Tensor, keys: torch.Tensor,
               visible: torch.Tensor, kernel: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For the queries ``x``/``qr``: the chosen entries ``[B, Q, k]``, whether each is visible
        ``[B, Q, k]`` (fewer than k may be), and the fp32 index scores ``[B, Q, P]`` (-inf if not visible).
        ``kernel``: scored by the Triton kernel (``indexer_kernel.py``), no per-head scores in memory."""
        batch, q_len, _ = x.shape
        q = apply_rope(self.wq_b(qr).view(batch, q_len, self.n_heads, self.head_dim), rotation)
        if self.qat:
            q = indexer_qat(q)
        weights = fp32(self.weights_proj(x)) * self.n_heads**-0.5
        scores = (indexer_kernel.index_scores if kernel else index_scores)(q, keys, weights, self.head_dim**-0.5)
        scores = scores.masked_fill(~visible, float("-inf"))
        top = topk_earliest_first(scores, min(self.topk, scores.shape[-1]))
        return top, visible.gather(-1, top), scores


@dataclass
class _QueryBlocks:
    """Queries ``q0:q1`` padded to ``n`` blocks of ``size``: their index ``[n, size]`` and document
    ``[B, n, size]`` (-1: padding)."""

    q0: int
    q1: int
    size: int
    n: int
    index: torch.Tensor  # [n, size]
    doc: torch.Tensor  # [B, n, size]

    @classmethod
    def make(cls, doc_ids: torch.Tensor, q0: int, q1: int, size: int) -> "_QueryBlocks":
        n = -(-(q1 - q0) // size)
        index = torch.arange(q0, q0 + n * size, device=doc_ids.device).view(n, size)
        doc = F.pad(doc_ids[:, q0:q1], (0, n * size - (q1 - q0)), value=-1).view(-1, n, size)
        return cls(q0, q1, size, n, index, doc)

    def pad(self, t: torch.Tensor) -> torch.Tensor:
        """``t[:, q0:q1]`` padded along dim 1 and split into ``[B, n, size, ...]``."""
        part = t[:, self.q0:self.q1]
        missing = self.n * self.size - part.shape[1]
        if missing:  # F.pad copies even when nothing is missing (a copy of the queries per layer)
            part = F.pad(part, [0, 0] * (part.dim() - 2) + [0, missing])
        return part.unflatten(1, (self.n, self.size))

    def unpad(self, t: torch.Tensor) -> torch.Tensor:
        """``[B, n, size, ...]`` -> ``[B, q1 - q0, ...]``."""
        return t.flatten(1, 2)[:, : self.q1 - self.q0]


class Attention(nn.Module):
    def __init__(self, args: DeepseekV4ModelArgs, layer_id: int):
        super().__init__()
        self.n_heads, self.head_dim = args.num_attention_heads, args.head_dim
        self.o_groups, self.window, self.eps = args.o_groups, args.sliding_window, args.rms_norm_eps
        self.rope_dim = args.qk_rope_head_dim
        self.qat = False  # the KV (window and entries) rounded to FP8 as the released attention's (qat.py)
        self.kind = args.layer_kind(layer_id)
        self.rope_kind = "main" if self.kind == "sliding" else "compress"
        self.query_block: int | str | None = "auto"
        # CSA: attend only to the gathered chosen entries (True), to all under a mask (False), None: by count
        self.gather_entries: bool | None = None
        # the core: "auto" (the fused Triton kernel of attention_kernel.py on CUDA when Triton is installed and
        # torch's deterministic algorithms are off: its backward adds atomically), "triton" (wherever Triton
        # runs: CPU tests, under its interpreter) or "torch"
        self.kernel = "auto"
        h, d = args.hidden_size, args.head_dim
        self.wq_a = nn.Linear(h, args.q_lora_rank, bias=False)
        self.q_norm = RMSNorm(args.q_lora_rank, args.rms_norm_eps)
        self.wq_b = nn.Linear(args.q_lora_rank, self.n_heads * d, bias=False)
        self.wkv = nn.Linear(h, d, bias=False)
        self.kv_norm = RMSNorm(d, args.rms_norm_eps)
        self.wo_a = nn.Linear(self.n_heads * d // self.o_groups, self.o_groups * args.o_lora_rank, bias=False)
        self.wo_b = nn.Linear(self.o_groups * args.o_lora_rank, h, bias=False)
        self.attn_sink = nn.Parameter(torch.empty(self.n_heads, dtype=torch.float32))
        ratio = args.compress_ratios[layer_id]
        self.compressor = (
            Compressor(h, d, ratio, self.kind == "csa", args.rms_norm_eps) if self.kind != "sliding" else None
        )
        self.indexer = Indexer(args) if self.kind == "csa" else None
        # weight of the summed per-token indexer KL in the objective (trainer: coeff / global tokens); 0: off
        self.indexer_loss_scale = 0.0

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        shard = ctx.shard
        if shard is not None:  # context parallelism: run on the shard after the previous shard's halo
            x = shard.extend(x)
        batch, seq, _ = x.shape
        rotation = ctx.rotation[self.rope_kind]
        qr = self.q_norm(self.wq_a(x))
        q = rms_normalise(self.wq_b(qr).view(batch, seq, self.n_heads, self.head_dim), self.eps)
        q = apply_rope(q, rotation)
        kv = apply_rope(self.kv_norm(self.wkv(x)), rotation)  # [B, S, d], K == V
        entries = self.compressor(x, ctx) if self.compressor is not None else None
        if self.qat:
            kv = kv_qat(kv, self.rope_dim)
            if entries is not None:
                entries = replace(entries, kv=kv_qat(entries.kv, self.rope_dim))
        # the indexer sees the activations but never sends gradient into them
        index_keys = self.indexer.keys(x.detach(), ctx) if self.indexer is not None else None
        if shard is not None and entries is not None:
            entries = every_shards_entries(entries, shard, seq - shard.halo)
            if index_keys is not None:  # pooled like the entries: the same windows, in the same order
                index_keys = shard.gather_with_grad(index_keys)
        train_indexer = self.indexer is not None and self.training and self.indexer_loss_scale > 0
        first = 0 if shard is None else shard.halo  # the halo's queries are the previous shard's
        outs, kl = [], []  # kl: per query [B, q]
        if self._fuses(x):  # the kernel computes every query; the halo's are dropped
            out, layer_kl = self._attend_fused(x, qr, q, kv, entries, index_keys, ctx, train_indexer)
            outs.append(out[:, first:])
            if layer_kl is not None:
                kl.append(layer_kl[:, first:])
        else:
            block = self._block_size(x)
            chunk = self._chunk_size(x, block, entries)
            for q0 in range(first, seq, chunk):
                q1 = min(seq, q0 + chunk)
                out, chunk_kl = self._attend(x, qr, q, kv, entries, index_keys, ctx, _QueryBlocks.make(
                    ctx.doc_ids, q0, q1, block), train_indexer)
                outs.append(out)
                if chunk_kl is not None:
                    kl.append(chunk_kl)
        out = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]
        rotation, seq = rotation[:, first:], seq - first

        out = apply_rope(out, rotation, inverse=True)
        grouped = out.reshape(batch, seq, self.o_groups, -1)
        wo_a = self.wo_a.weight.view(self.o_groups, -1, grouped.shape[-1])
        low_rank = torch.einsum("bsgi,goi->bsgo", grouped, wo_a).flatten(2)
        out = self.wo_b(low_rank)
        if kl:
            kl_sum = torch.cat(kl, dim=1).sum()
            if not recomputing():
                self.indexer.kl_sum += kl_sum.detach().to(self.indexer.kl_sum.dtype)
            out = _AttachLoss.apply(out, kl_sum * self.indexer_loss_scale)
        return out

    def _runs_triton(self, x: torch.Tensor) -> bool:
        if self.kernel == "torch" or not attention_kernel.available(x.device):
            return False
        return self.kernel == "triton" or takes_triton_kernels(x)

    def _fuses(self, x: torch.Tensor) -> bool:
        """The fused core: not under torch's deterministic algorithms ("auto"), its backward adds atomically."""
        return self._runs_triton(x) and (self.kernel == "triton" or not torch.are_deterministic_algorithms_enabled())

    def _scores_index_in_triton(self, x: torch.Tensor) -> bool:
        """The indexer's scoring kernel (deterministic: no atomics) wherever the Triton kernels run."""
        return self._runs_triton(x) and indexer_kernel.supports(x.device, self.indexer.head_dim)

    def _attend_fused(self, x, qr, q, kv, entries, index_keys, ctx: AttentionContext,
                      train_indexer: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The fused kernel's output ``[B, S, h, d]`` (each query's window and its listed entries) and, when
        the indexer trains, its per-query KL ``[B, S]``."""
        batch, seq, _ = x.shape
        index_scores = None
        if entries is None:
            listed = kv.new_zeros(batch, 0, kv.shape[-1])
            index = torch.empty(batch, seq, 0, dtype=torch.int32, device=x.device)
        else:
            listed = entries.kv
            index, index_scores = self._entry_index(x, qr, entries, index_keys, ctx)
        train_indexer = train_indexer and index_scores is not None
        out, mass = attention_kernel.fused_attention(q, kv, listed, index, ctx.doc_ids, self.attn_sink,
                                                     self.window, entry_mass=train_indexer)
        return out, (indexer_kl(mass, index_scores, index >= 0) if train_indexer else None)

    def _entry_index(self, x, qr, entries: CompressedEntries, index_keys,
                     ctx: AttentionContext) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[B, S, E]`` int32: the entries each query attends to, ``-1`` for none; CSA: the indexer's top-k
        (E = top-k), HCA: every visible one (E = P). CSA also gives the indexer's scores of its choices
        ``[B, S, E]`` (fp32, for its KL), HCA None."""
        batch, seq, _ = x.shape
        num = entries.kv.shape[1]
        if self.indexer is None or num == 0:
            visible = entries.visible(torch.arange(seq, device=x.device), ctx.doc_ids)
            return torch.where(visible, torch.arange(num, device=x.device, dtype=torch.int32), -1), None
        chunk = max(1, SCORE_BUDGET // (batch * self.indexer.n_heads * num))  # the indexer's fp32 scores
        kernel = self._scores_index_in_triton(x)
        index, scores = [], []
        for q0 in range(0, seq, chunk):
            q1 = min(seq, q0 + chunk)
            visible = entries.visible(torch.arange(q0, q1, device=x.device), ctx.doc_ids[:, q0:q1])
            top, top_ok, chunk_scores = self.indexer.select(x.detach()[:, q0:q1], qr.detach()[:, q0:q1],
                                                            ctx.rotation["compress"][:, q0:q1], index_keys, visible,
                                                            kernel)
            index.append(torch.where(top_ok, top.to(torch.int32), -1))
            scores.append(chunk_scores.gather(-1, top))
        return torch.cat(index, dim=1), torch.cat(scores, dim=1)

    def _block_size(self, x: torch.Tensor) -> int:
        seq = x.shape[1]
        if self.query_block is None:
            return max(seq, 1)
        if self.query_block == "auto":
            return AUTO_BLOCK if (takes_gpu_path(x) or seq > 2 * AUTO_BLOCK) else max(seq, 1)
        return int(self.query_block)

    def _gathers(self, entries: CompressedEntries | None) -> bool:
        if self.indexer is None or entries is None:
            return False
        if self.gather_entries is not None:
            return self.gather_entries
        return entries.kv.shape[1] >= GATHER_RATIO * self.indexer.topk

    def _chunk_size(self, x: torch.Tensor, block: int, entries: CompressedEntries | None) -> int:
        """Queries per chunk (a multiple of ``block``) whose fp32 scores (and gathered keys) stay within
        ``SCORE_BUDGET``."""
        num = 0 if entries is None else entries.kv.shape[1]
        per_query = 0
        if self._gathers(entries):
            num = self.indexer.topk
            per_query = x.shape[0] * num * self.head_dim // 2  # the gathered bf16 keys, in fp32 units
        per_query += x.shape[0] * self.n_heads * (block + self.window + num)
        if self.indexer is not None:
            per_query = max(per_query, x.shape[0] * self.indexer.n_heads * entries.kv.shape[1])
        return block * max(1, SCORE_BUDGET // (per_query * block))

    def _attend(self, x, qr, q, kv, entries, index_keys, ctx, blocks: _QueryBlocks,
                train_indexer: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention output ``[B, q1-q0, h, d]`` for the queries of ``blocks`` and, when the indexer trains,
        its per-query KL ``[B, q1-q0]``."""
        size, window = blocks.size, self.window
        # raw keys of block i: positions start_i - window ... start_i + size - 1, gathered (not ``unfold``'s
        # view: inductor's vectorised CPU code for its backward writes out of bounds, torch 2.13)
        first = blocks.q0 - window
        span = F.pad(kv[:, max(first, 0): blocks.q1], (0, 0, max(-first, 0), blocks.n * size + window
                                                       - (blocks.q1 - first)))
        rows = torch.arange(blocks.n, device=x.device)[:, None] * size + torch.arange(size + window, device=x.device)
        keys = span[:, rows].transpose(-1, -2)  # [B, n, d, K = size + window]
        key_index = first + rows  # [n, K]
        key_doc = F.pad(ctx.doc_ids, (window, blocks.n * size + window), value=-2)[:, window + key_index]  # [B, n, K]
        q_index = blocks.index[..., None]
        allowed = (key_index[:, None, :] <= q_index) & (key_index[:, None, :] > q_index - window)
        allowed = allowed & (key_doc[:, :, None, :] == blocks.doc[..., None])  # [B, n, size, K]
        queries = blocks.pad(q)  # [B, n, size, h, d]
        # fp32 scores [B, n, h, size, K]: never rounded to bf16 (fp32_matmul)
        scores = [fp32_matmul(queries.flatten(2, 3), keys).unflatten(2, (size, -1)).transpose(2, 3)]

        chosen, index_scores, gathered = None, None, None  # gathered: each query's chosen entries [B, Q', k]
        if entries is not None:
            visible = entries.visible(blocks.index.flatten(), blocks.doc.flatten(1))  # [B, Q', P]
            if self.indexer is not None and visible.shape[-1] > 0:
                rotation = blocks.pad(ctx.rotation["compress"]).flatten(1, 2)
                top, top_ok, index_scores = self.indexer.select(
                    blocks.pad(x.detach()).flatten(1, 2), blocks.pad(qr.detach()).flatten(1, 2), rotation,
                    index_keys, visible, self._scores_index_in_triton(x))
                if self._gathers(entries):
                    chosen, index_scores, gathered = top_ok, index_scores.gather(-1, top), top
                else:
                    chosen = torch.zeros_like(visible).scatter_(-1, top, top_ok)
            else:
                chosen = visible
            allowed = torch.cat([allowed, chosen.view(*allowed.shape[:3], -1)], dim=-1)
            if gathered is not None:
                gathered_shape = torch.Size([*queries.shape[:3], gathered.shape[-1], entries.kv.shape[-1]])
                scores.append(_GatheredEntryProduct.apply(queries, entries.kv, gathered, gathered_shape, True))
            else:
                entry_scores = fp32_matmul(queries.flatten(1, 3), entries.kv.transpose(1, 2))  # [B, n*s*h, P]
                scores.append(entry_scores.view(*queries.shape[:4], -1).transpose(2, 3))
        scores = fp32(torch.cat(scores, dim=-1)) * self.head_dim**-0.5
        scores = scores.masked_fill(~allowed[:, :, None], float("-inf"))
        sink = fp32(self.attn_sink).view(1, 1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        probs_fp32 = torch.cat([scores, sink], dim=-1).softmax(dim=-1)[..., :-1]  # sink: denominator only
        probs = probs_fp32.to(kv.dtype)
        out = torch.einsum("bnhqk,bndk->bnqhd", probs[..., : size + window], keys)
        if gathered is not None:
            out = out + _GatheredEntryProduct.apply(probs[..., size + window:], entries.kv, gathered,
                                                    gathered_shape, False)
        elif entries is not None:
            out = out + torch.einsum("bnhqk,bkd->bnqhd", probs[..., size + window:], entries.kv)
        out = blocks.unpad(out)
        if not (train_indexer and index_scores is not None):
            return out, None
        # [B, n, h, size, P] summed over heads -> [B, Q, P] for the KL, padding queries dropped
        mass = blocks.unpad(probs_fp32[..., size + window:].sum(dim=2))
        q_len = blocks.q1 - blocks.q0
        return out, indexer_kl(mass, index_scores[:, :q_len], chosen[:, :q_len])
