"""Main + MTP cross-entropy, normalised by the global number of valid label tokens.

``objective = (CE_sum(main) + lambda / D * sum_k CE_sum(depth k)) / global_valid_tokens`` where
``global_valid_tokens`` counts valid *main* labels over the whole global batch (all data-parallel ranks, all
microbatches, all accumulation steps). Each rank or microbatch therefore contributes its share of one
global mean, and summing gradients (never averaging) reproduces the single-process gradient exactly.

The targets for all depths travel as one tensor ``[B, S, 1 + D]`` (column 0: next-token labels, column k+1:
depth k), which a pipeline schedule carries to every stage as a keyword input: the last stage's LM head runs
fused with the cross-entropy (``models/deepseek_v4/head_loss.py``) and returns the weighted sum; this module
normalises it and keeps the logged parts.
"""

from __future__ import annotations

import torch

from ..models.deepseek_v4.mtp import mtp_targets


def build_targets(labels: torch.Tensor, positions: torch.Tensor, num_mtp: int) -> torch.Tensor:
    """``[B, S, 1 + num_mtp]``: labels and each MTP depth's document-aware shifted labels."""
    columns = [labels] + [mtp_targets(labels, positions, k) for k in range(num_mtp)]
    return torch.stack(columns, dim=-1)


class MTPLoss:
    """Callable ``(outputs, targets, global_valid_tokens) -> objective`` on the model's training output
    ``(objective_sum, stats)`` (the head runs fused with its cross-entropy, so the per-depth sums and their
    weighting by lambda come from the model: ``DeepseekV4Model.forward`` with ``targets``). Keeps detached
    parts for logging: per call ``[main_sum, main_count, sum_0, count_0, correct_0, ...]`` (float64) where
    ``correct_k`` counts positions whose argmax equals depth k's target (greedy MTP acceptance).
    """

    def __init__(self) -> None:
        self.parts: list[torch.Tensor] = []

    def __call__(self, outputs: tuple[torch.Tensor, torch.Tensor], targets: torch.Tensor | None = None,
                 global_valid_tokens: torch.Tensor | float | None = None) -> torch.Tensor:
        objective, stats = outputs
        stats = stats.detach().double()
        self.parts.append(torch.cat([stats[0, :2], stats[1:].reshape(-1)]))
        if global_valid_tokens is None:
            global_valid_tokens = stats[0, 1]
        return objective / global_valid_tokens

    def take_parts(self, last: int | None = None) -> torch.Tensor | None:
        """Sum of the stashed parts of the last ``last`` calls (all if None), then forget them all."""
        parts = self.parts[-last:] if last else self.parts
        self.parts = []
        return torch.stack(parts).sum(0) if parts else None


def summarise_parts(parts: torch.Tensor, num_mtp: int, scaling_factor: float) -> dict:
    """Global (already reduced) parts -> the logged losses."""
    main_sum, main_count = parts[0].item(), max(parts[1].item(), 1.0)
    mtp_losses, acceptance, total = [], [], main_sum
    for k in range(num_mtp):
        s, c, correct = (parts[2 + 3 * k + i].item() for i in range(3))
        mtp_losses.append(s / max(c, 1.0))
        acceptance.append(correct / max(c, 1.0))
        total += scaling_factor / num_mtp * s
    return {"loss": main_sum / main_count, "mtp_losses": mtp_losses, "mtp_acceptance": acceptance,
            "total_loss": total / main_count, "valid_tokens": int(parts[1].item())}
