"""Packed-sequence bookkeeping: documents are runs of consecutive ``positions`` (restarting at 0).

Attention windows, compressed entries and MTP's shifted inputs must never cross a document boundary;
everything that needs that asks this module.
"""

from __future__ import annotations

import torch


def default_positions(input_ids: torch.Tensor) -> torch.Tensor:
    batch, seq = input_ids.shape
    return torch.arange(seq, device=input_ids.device).unsqueeze(0).expand(batch, seq)


def document_ids(positions: torch.Tensor) -> torch.Tensor:
    """``[B, S]`` int ids, a new id wherever ``positions`` does not continue the previous token's by +1."""
    starts = torch.ones_like(positions, dtype=torch.bool)
    starts[:, 1:] = positions[:, 1:] != positions[:, :-1] + 1
    return starts.long().cumsum(dim=1)


def same_document_ahead(positions: torch.Tensor, shift: int) -> torch.Tensor:
    """``[B, S]`` bool: token ``t + shift`` exists and belongs to the same document as token ``t``."""
    ok = torch.zeros_like(positions, dtype=torch.bool)
    if shift < positions.shape[1]:
        ok[:, : positions.shape[1] - shift] = positions[:, shift:] == positions[:, :-shift or None] + shift
    return ok


def shift_left(x: torch.Tensor, shift: int, valid: torch.Tensor, fill: int) -> torch.Tensor:
    """``x[:, t + shift]`` where ``valid`` else ``fill`` (the tail and cross-document slots)."""
    out = torch.full_like(x, fill)
    if shift < x.shape[1]:
        out[:, : x.shape[1] - shift] = x[:, shift:]
    return torch.where(valid, out, torch.full_like(out, fill))
