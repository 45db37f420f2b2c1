"""Muon as DeepSeek-V4 was trained with it: orthogonalized momentum for the matrices, AdamW for the rest.

Per independent matrix ``W [n, m]`` (an expert's, a group's of the grouped output projection, or a whole
weight; ``DeepseekV4Model.matrix_parameters``), with momentum ``mu``, update RMS ``gamma``:

    M = mu * M + G;   O = NS(mu * M + G) * sqrt(max(n, m)) * gamma;   W = W * (1 - lr * wd) - lr * O

``NS`` is the hybrid Newton-Schulz iteration: 8 quintic steps with (3.4445, -4.7750, 2.0315) bring every
singular value near 1 quickly, 2 more with (2, -1.5, 0.5) settle them at 1 (that polynomial has p(1) = 1,
p'(1) = 0). An orthogonal ``n x m`` matrix has RMS ``1 / sqrt(max(n, m))``, so ``O`` has RMS ``gamma``: near
AdamW's typical update, which lets Muon reuse AdamW's learning rate and weight decay (0.18 in DeepSeek-V4).

Sharding: the Newton-Schulz iteration needs whole matrices. A routed-experts tensor is sharded by expert
(EP and FSDP both split dim 0), so each rank orthogonalizes the experts it holds. The other FSDP-sharded
weights are dealt out over their FSDP group: each is orthogonalized once, by one rank, which an all-to-all
gives every rank's rows of it and another all-to-all takes the result's rows back from (in bf16 on GPUs).
Weights kept whole (the mHC projections) are the same on every rank after their gradient all-reduce.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard

from ..distributed.utils import local_shard

HYBRID_NEWTON_SCHULZ = ((3.4445, -4.7750, 2.0315),) * 8 + ((2.0, -1.5, 0.5),) * 2
# Whole weights whose matrices have one shape are stacked up to this many elements (a larger weight, e.g. a
# layer's routed experts, stands alone), and orthogonalized in slices of about as many: small matrices take
# few GEMMs, the transient memory stays a few times the largest weight, and CPUs do not spend more on fresh
# memory than batching saves (192 x 256^2 took 2.7 s at once, 1.6 s in slices of 4).
BATCH_ELEMENTS = 2**18


def hybrid_newton_schulz(matrices: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """The orthogonal polar factor ``U V^T`` of each matrix ``[..., n, m]`` (approximately: directions with
    singular values below ~1e-3 of the Frobenius norm are not fully brought to 1), in ``matrices``' dtype."""
    x = matrices
    tall = x.shape[-2] > x.shape[-1]
    if tall:  # iterate on the smaller Gram matrix
        x = x.mT
    x = (x / (torch.linalg.matrix_norm(x, keepdim=True) + eps)).reshape(-1, *x.shape[-2:])
    for a, b, c in HYBRID_NEWTON_SCHULZ:
        gram = torch.bmm(x, x.mT)
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)  # a x + (b G + c G^2) x
    x = x.view(matrices.mT.shape if tall else matrices.shape)
    return x.mT if tall else x


def newton_schulz_flops(n: int, m: int) -> float:
    """FLOPs of ``hybrid_newton_schulz`` on one ``n x m`` matrix (per step: X X^T, its square, and the
    product with X, on the smaller side)."""
    n, m = min(n, m), max(n, m)
    return len(HYBRID_NEWTON_SCHULZ) * (4.0 * n * n * m + 2.0 * n ** 3)


class Muon(torch.optim.AdamW):
    """Muon for the parameter groups marked ``muon`` (with ``matrices``: per parameter, how many independent
    matrices it stacks along dim 0, and ``momentum``, ``update_rms``), AdamW (the base class) for the others.

    The state of a Muon parameter is ``momentum_buffer``, sharded as the parameter is."""

    @torch.no_grad()
    def step(self, closure=None):
        groups = self.param_groups
        self.param_groups = [g for g in groups if not g.get("muon")]
        try:
            loss = super().step(closure)
        finally:
            self.param_groups = groups
        for group in groups:
            if group.get("muon"):
                self._muon_step(group)
        return loss

    def _muon_step(self, group: dict) -> None:
        mu, updates = group["momentum"], []
        for p, count in zip(group["params"], group["matrices"]):
            if p.grad is None:
                continue
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            grad, buf = local_shard(p.grad), local_shard(state["momentum_buffer"])
            buf.mul_(mu).add_(grad)
            updates.append((p, count, grad.add(buf, alpha=mu)))
        for (p, count, _), direction in zip(updates, orthogonalized(updates)):
            n, m = matrix_shape(p, count)
            param = local_shard(p)
            param.mul_(1.0 - group["lr"] * group["weight_decay"])
            param.add_(direction.to(param.dtype), alpha=-group["lr"] * group["update_rms"] * math.sqrt(max(n, m)))


Update = tuple[torch.Tensor, int, torch.Tensor]  # parameter, matrices stacked along dim 0, this rank's part


def orthogonalized(updates: list[Update]) -> list[torch.Tensor]:
    """``hybrid_newton_schulz`` of every update, each returned as this rank's part (bf16 tensor-core GEMMs on
    GPUs, fp32 elsewhere). Whole matrices here (stacked experts, weights kept whole) are done in place; the
    rows of FSDP-sharded ones are dealt out, largest first, in rounds of one matrix per rank of the group."""
    out: list[torch.Tensor | None] = [None] * len(updates)
    rounds: dict[int, tuple[dist.ProcessGroup, list[int]]] = {}
    batches: dict[tuple, list[int]] = {}  # whole weights by matrix shape: stacked runs, orthogonalized in slices
    for i, (p, count, local) in enumerate(updates):
        if p.ndim == 3 or not isinstance(p, DTensor):
            batches.setdefault((matrix_shape(p, count), local.device), []).append(i)
        else:
            group = _row_group(p)
            rounds.setdefault(id(group), (group, []))[1].append(i)
    for (shape, _), indices in batches.items():
        for run in _runs(indices, lambda i: updates[i][2].numel()):
            locals_ = [updates[i][2] for i in run]
            stacked = torch.cat([t.to(_ns_dtype(t)).reshape(-1, *shape) for t in locals_])
            done, step = torch.empty_like(stacked), max(1, BATCH_ELEMENTS // math.prod(shape))
            for first in range(0, len(stacked), step):
                done[first:first + step] = hybrid_newton_schulz(stacked[first:first + step])
            for i, t, piece in zip(run, locals_, done.split([t.numel() // math.prod(shape) for t in locals_])):
                out[i] = piece.view_as(t)
    for group, indices in rounds.values():
        indices.sort(key=lambda i: -updates[i][0].numel())  # stable: the same order on every rank
        for first in range(0, len(indices), group.size()):
            chunk = indices[first:first + group.size()]
            for i, result in zip(chunk, _orthogonalized_round([updates[i] for i in chunk], group)):
                out[i] = result
    return out


def _runs(indices: list[int], numel) -> Iterator[list[int]]:
    """Consecutive runs of ``indices`` of at most ``BATCH_ELEMENTS`` elements, or one index each when larger."""
    run, total = [], 0
    for i in indices:
        if run and total + numel(i) > BATCH_ELEMENTS:
            yield run
            run, total = [], 0
        run.append(i)
        total += numel(i)
    if run:
        yield run


def _orthogonalized_round(updates: list[Update], group: dist.ProcessGroup) -> list[torch.Tensor]:
    """Rank j of ``group`` orthogonalizes ``updates[j]``: one all-to-all brings it every rank's rows of it,
    another returns each rank its rows of the result."""
    size, me, dtype = group.size(), group.rank(), _ns_dtype(updates[0][2])
    rows = [[_shard_rows(p.shape[0], size, r) for r in range(size)] for p, _, _ in updates]
    widths = [p.shape[-1] for p, _, _ in updates]
    pad = [0] * (size - len(updates))
    to_owners = [rows[j][me] * widths[j] for j in range(len(updates))] + pad
    owned = me < len(updates)
    from_ranks = [rows[me][r] * widths[me] for r in range(size)] if owned else [0] * size
    sent = torch.cat([local.to(dtype).reshape(-1) for _, _, local in updates])
    whole = sent.new_empty(sum(from_ranks))
    dist.all_to_all_single(whole, sent, from_ranks, to_owners, group=group)
    result = whole
    if owned:  # the ranks' rows in rank order are the matrix's rows in order (FSDP's dim-0 chunks)
        count = updates[me][1]
        result = hybrid_newton_schulz(whole.view(count, -1, widths[me])).reshape(-1)
    back = sent.new_empty(sum(to_owners))
    dist.all_to_all_single(back, result, to_owners, from_ranks, group=group)
    return [piece.view(rows[j][me], widths[j]) for j, piece in enumerate(back.split(to_owners[:len(updates)]))]


def _row_group(p: DTensor) -> dist.ProcessGroup:
    """The process group over which ``p``'s rows are sharded (FSDP's; HSDP's replicas repeat the work)."""
    sharded = [dim for dim, placement in enumerate(p.placements) if not isinstance(placement, Replicate)]
    if len(sharded) != 1 or p.placements[sharded[0]] != Shard(0):
        raise ValueError(f"Muon: a matrix must be whole or sharded by rows over one mesh dimension (FSDP), "
                         f"not {p.placements}")
    return p.device_mesh.get_group(sharded[0])


def _shard_rows(n: int, shards: int, rank: int) -> int:
    """Rows of an ``n``-row tensor on ``rank`` of ``shards`` (``torch.chunk``'s split, as FSDP2 and DTensor)."""
    size = -(-n // shards)
    return max(0, min(size, n - rank * size))


def _ns_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.bfloat16 if t.is_cuda else torch.float32


def matrix_shape(p: torch.Tensor, count: int) -> tuple[int, int]:
    """The shape of each of the ``count`` independent matrices ``p`` stacks along dim 0."""
    return (p.shape[-2], p.shape[-1]) if p.ndim == 3 else (p.shape[0] // count, p.shape[-1])
