"""Context parallelism as the model sees it: this rank holds one contiguous shard of every sequence.

Everything a token computes is local except attention, whose queries read the previous ``sliding_window`` keys
and every earlier compressed entry. Each attention therefore runs on its shard extended by ``halo`` tokens of
the previous shard (window keys, and the pooling windows of its first entries; the halo's queries are the
previous shard's and are not kept), and attends to the compressed entries of all shards, each pooled by the
shard its window ends in.
Compressed entries are 4x (CSA) and 128x (HCA) fewer than tokens, so gathering them is cheap where gathering
keys would not be. The collectives are behind :class:`SequenceShard`; ``distributed/context_parallel.py``
implements it.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

HALO_DOC = -3  # document id of the zeros before the first shard: no real token attends to them


class SequenceShard(Protocol):
    index: int  # which shard of the sequence, 0-based
    size: int  # shards per sequence
    halo: int  # tokens of the previous shard an attention reads

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """``[B, L, ...]`` -> ``[B, size * L, ...]``, every shard's part in order (no gradient)."""

    def gather_with_grad(self, t: torch.Tensor) -> torch.Tensor:
        """As ``gather``; each part's gradient (summed over the shards that used it) goes back to its shard."""

    def extend(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, L, ...]`` -> ``[B, halo + L, ...]``: the previous shard's last ``halo`` rows first (zeros on the
        first shard); their gradient goes back to that shard."""

    def part(self, t: torch.Tensor) -> torch.Tensor:
        """This shard's ``[B, L, ...]`` of a whole-sequence tensor ``[B, size * L, ...]``."""


def shard_window(shard: SequenceShard, everywhere: torch.Tensor, fill: int) -> torch.Tensor:
    """This shard's ``[B, halo + L]`` of a whole-sequence tensor ``[B, size * L]`` (``fill`` before the start)."""
    local = everywhere.shape[1] // shard.size
    padded = F.pad(everywhere, (shard.halo, 0), value=fill)
    return padded[:, shard.index * local: shard.index * local + shard.halo + local]
