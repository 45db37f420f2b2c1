"""Main + MTP cross-entropy, normalised by the global number of valid label tokens.

``objective = (CE_sum(main) + lambda / D * sum_k CE_sum(depth k)) / global_valid_tokens`` where
``global_valid_tokens`` counts valid *main* labels over the whole global batch (all data-parallel ranks, all
microbatches, all accumulation steps). Each rank or microbatch therefore contributes its share of one
global mean, and summing gradients (never averaging) reproduces the single-process gradient exactly.

The targets for all depths travel as one tensor ``[B, S, 1 + D]`` (column 0: next-token labels, column k+1:
depth k), which is what a pipeline schedule can carry to the last stage.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.deepseek_v4.mtp import IGNORE_INDEX, mtp_targets
from ..models.deepseek_v4.norm import fp32


def build_targets(labels: torch.Tensor, positions: torch.Tensor, num_mtp: int) -> torch.Tensor:
    """``[B, S, 1 + num_mtp]``: labels and each MTP depth's document-aware shifted labels."""
    columns = [labels] + [mtp_targets(labels, positions, k) for k in range(num_mtp)]
    return torch.stack(columns, dim=-1)


class MTPLoss:
    """Callable ``(outputs, targets, global_valid_tokens) -> objective``; keeps detached parts for logging.

    ``parts`` holds, per call, ``[main_sum, main_count, sum_0, count_0, correct_0, ...]`` (float64) where
    ``correct_k`` counts positions whose argmax equals depth k's target (greedy MTP acceptance).
    """

    def __init__(self, num_mtp: int, scaling_factor: float, ignore_index: int = IGNORE_INDEX):
        self.num_mtp, self.scaling_factor, self.ignore_index = num_mtp, scaling_factor, ignore_index
        self.parts: list[torch.Tensor] = []

    def __call__(self, outputs: torch.Tensor | tuple[torch.Tensor, ...], targets: torch.Tensor,
                 global_valid_tokens: torch.Tensor | float | None = None) -> torch.Tensor:
        logits = outputs if isinstance(outputs, torch.Tensor) else outputs[0]
        mtp_logits = [] if isinstance(outputs, torch.Tensor) else list(outputs[1:])
        if targets.dim() == 2:
            targets = targets.unsqueeze(-1)
        main_sum, main_count, _ = self._ce(logits, targets[..., 0])
        total = main_sum
        parts = [main_sum.detach(), main_count]
        for k, depth_logits in enumerate(mtp_logits):
            depth_sum, depth_count, correct = self._ce(depth_logits, targets[..., k + 1])
            total = total + self.scaling_factor / len(mtp_logits) * depth_sum
            parts += [depth_sum.detach(), depth_count, correct]
        self.parts.append(torch.stack([p.double() for p in parts]))
        if global_valid_tokens is None:
            global_valid_tokens = main_count
        return total / global_valid_tokens

    def _ce(self, logits: torch.Tensor, target: torch.Tensor):
        flat_logits = fp32(logits.reshape(-1, logits.shape[-1]))
        flat_target = target.reshape(-1)
        loss_sum = F.cross_entropy(flat_logits, flat_target, ignore_index=self.ignore_index, reduction="sum")
        valid = flat_target != self.ignore_index
        with torch.no_grad():
            correct = ((flat_logits.argmax(-1) == flat_target) & valid).sum()
        return loss_sum, valid.sum(), correct

    def compile(self, backend: str) -> None:
        """Compile the per-depth cross-entropy (fp32 upcast + log-softmax + argmax fuse into one kernel)."""
        self._ce = torch.compile(self._ce, backend=backend)

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
            "total_loss": total / main_count, "valid_tokens": int(main_count)}
