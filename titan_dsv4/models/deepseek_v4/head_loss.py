"""The LM head and its cross-entropy in one pass over chunks of tokens (training).

The fp32 logits ``[tokens, vocab]`` of every depth (2 GiB per 4k tokens of DeepSeek-V4's 129k vocabulary),
the log-softmax saved for their backward and their gradient were the largest tensors of the last pipeline
stage and most of its memory traffic. Here each chunk of tokens runs the head GEMM, the cross-entropy and
the gradient of the objective w.r.t. its logits, then both gradient GEMMs, all in the forward: the objective
``Σ_rows weight · CE`` is linear in the per-token losses, so its gradient is known once the weights are. Only
the gradients of the hidden states and of the head weight are kept; backward scales them by the incoming
gradient (the 1 / global-token-count normalisation). No ``[tokens, vocab]`` tensor outlives its chunk.

On GPUs the products are bf16 tensor-core GEMMs of bf16 parts to the precision of their result (as
``fp32_linear``) and each chunk's element-wise work is compiled: one pass reads the logits for the
log-sum-exp, the target logit and the argmax, one writes the gradient's bf16 parts.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .fp32_linear import bf16_mm, bf16_parts, parts_mm, result_parts, splits_into_bf16_parts
from .fused import compiled_on_cuda
from .mtp import IGNORE_INDEX
from .norm import fp32

CHUNK_ELEMENTS = 2**28  # logits of one chunk of rows: 1 GiB fp32 (+ its gradient's bf16 parts, 0.5 GiB each)


@compiled_on_cuda
def _token_losses(logits: torch.Tensor, target: torch.Tensor):
    """Per row: log-sum-exp, cross-entropy (0 where the target is ignored) and whether the argmax hits."""
    valid = target != IGNORE_INDEX
    lse = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(-1, torch.where(valid, target, 0).unsqueeze(-1)).squeeze(-1)
    return lse, torch.where(valid, lse - picked, 0.0), (logits.argmax(-1) == target) & valid


@compiled_on_cuda
def _logits_grad(logits: torch.Tensor, lse: torch.Tensor, target: torch.Tensor, row_weight: torch.Tensor,
                 parts: int) -> torch.Tensor:
    """``d Σ_r row_weight_r CE_r / d logits = row_weight (softmax - onehot)`` (0 on ignored rows), stacked
    ``[parts, rows, vocab]``: its bf16 parts, or (``parts == 0``) itself in the logits' dtype."""
    valid = target != IGNORE_INDEX
    weight = torch.where(valid, row_weight, 0.0).to(logits.dtype).unsqueeze(-1)
    # in place: eagerly (CPU) one [rows, vocab] tensor beside the logits; compiled, inductor fuses the chain
    grad = (logits - lse.unsqueeze(-1)).exp_().mul_(weight)
    grad.scatter_add_(-1, torch.where(valid, target, 0).unsqueeze(-1), -weight)
    return grad.unsqueeze(0) if parts == 0 else torch.stack(bf16_parts(grad, parts))


def compile_cross_entropy(backend: str) -> None:
    """``[compile]`` with ``"loss"``: the chunk functions compiled on every device (CUDA always compiles)."""
    global _token_losses, _logits_grad
    _token_losses = torch.compile(_token_losses.__wrapped__, backend=backend)
    _logits_grad = torch.compile(_logits_grad.__wrapped__, backend=backend)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                row_weight: torch.Tensor):
        """``hidden [R, H]``, ``weight [V, H]``, ``target [R]``, ``row_weight [R]`` -> (``Σ row_weight·CE``,
        per-row CE ``[R]``, per-row argmax hit ``[R]``)."""
        want_hidden, want_weight = ctx.needs_input_grad[:2]
        if splits_into_bf16_parts(hidden, weight):
            mm, split = bf16_mm, bf16_parts
            hidden_result, weight_result = result_parts(hidden.dtype), result_parts(weight.dtype)
            grad_parts = max(hidden_result if want_hidden else 0, weight_result if want_weight else 0)
        else:  # the exact path: each operand is one "part" in fp32 (fp64 in gradient checks)
            mm, split = torch.mm, lambda t: [fp32(t)]
            hidden_result = weight_result = 1
            grad_parts = 0  # the gradient unsplit
        weight_parts = split(weight)
        chunk = max(1, CHUNK_ELEMENTS // weight.shape[0])
        objective, ces, hits, grad_rows = 0.0, [], [], []
        grad_weight = None
        for r0 in range(0, hidden.shape[0], chunk):
            rows, rows_target, rows_weight = (t[r0:r0 + chunk] for t in (hidden, target, row_weight))
            row_parts = split(rows)
            logits = parts_mm(row_parts, [p.t() for p in weight_parts], mm=mm)
            lse, ce, hit = _token_losses(logits, rows_target)
            objective = objective + (ce * rows_weight).sum()
            ces.append(ce)
            hits.append(hit)
            if not (want_hidden or want_weight):
                continue
            grad = _logits_grad(logits, lse, rows_target, rows_weight, grad_parts)  # [parts, rows, V]
            del logits
            if want_hidden:  # [k R, V] @ [V, H], the k row blocks summed
                grad_rows.append(_stacked_product(grad, weight_parts, hidden_result,
                                                  lambda g, w, k: mm(g, w).view(k, -1, w.shape[1]).sum(0)))
            if want_weight:  # [V, k R] @ the rows repeated k times [k R, H]
                term = _stacked_product(grad, row_parts, weight_result, lambda g, rows, k: mm(g.t(), rows.repeat(k, 1)))
                grad_weight = term if grad_weight is None else grad_weight.add_(term)
        ctx.save_for_backward(torch.cat(grad_rows) if want_hidden else None, grad_weight)
        ctx.dtypes = hidden.dtype, weight.dtype
        ce, hit = torch.cat(ces), torch.cat(hits)
        ctx.mark_non_differentiable(ce, hit)
        return objective, ce, hit

    @staticmethod
    def backward(ctx, grad_objective: torch.Tensor, _ce, _hit):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (None if grad_hidden is None else (grad_hidden * grad_objective).to(ctx.dtypes[0]),
                None if grad_weight is None else (grad_weight * grad_objective).to(ctx.dtypes[1]), None, None)


def _stacked_product(grad: torch.Tensor, other_parts: list[torch.Tensor], parts: int, product) -> torch.Tensor:
    """``Σ_{i+j<parts} grad_i · other_j`` with one GEMM per part j of the other operand: the gradient's first
    ``k = parts - j`` parts, stacked ``[k, R, V]`` in memory, are one ``[k R, V]`` operand (no copy), so the
    other operand is read, and a large result written, once per part j rather than once per pair."""
    out = None
    for j, other in enumerate(other_parts):
        k = min(parts - j, grad.shape[0])
        if k <= 0:
            break
        term = product(grad[:k].reshape(-1, grad.shape[-1]), other, k)
        out = term if out is None else out.add_(term)
    return out


def head_loss(hiddens: Sequence[torch.Tensor], weight: torch.Tensor, targets: torch.Tensor,
              depth_weights: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of ``hiddens[d] @ weight.T`` (``[B, S, H]`` each, fp32 logits) against
    ``targets[..., d]``. Returns the objective ``Σ_d depth_weights[d] · CE_sum(d)`` and, detached,
    ``stats [len(hiddens), 3]``: per depth (CE sum, valid targets, argmax hits)."""
    depth = len(hiddens)
    hidden = torch.stack(list(hiddens)).reshape(-1, weight.shape[1])
    if not torch.is_grad_enabled():  # evaluation: no gradient work in the forward
        hidden, weight = hidden.detach(), weight.detach()
    target = targets[..., :depth].movedim(-1, 0).reshape(-1)
    if target.numel() != hidden.shape[0] or targets.shape[-1] < depth:
        raise ValueError(f"targets {tuple(targets.shape)} do not match {depth} depths of hidden states "
                         f"{tuple(hiddens[0].shape)}: expected [*{tuple(hiddens[0].shape[:-1])}, >= {depth}]")
    rows = target.numel() // depth
    row_weight = torch.tensor(list(depth_weights), dtype=torch.float32, device=hidden.device)
    objective, ce, hit = _LinearCrossEntropy.apply(hidden, weight, target, row_weight.repeat_interleave(rows))
    per_row = torch.stack([ce, (target != IGNORE_INDEX).to(ce.dtype), hit.to(ce.dtype)])  # fp32 (fp64)
    return objective, per_row.view(3, depth, rows).sum(-1).t()
