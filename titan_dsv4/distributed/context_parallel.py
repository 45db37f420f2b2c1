"""Context parallelism: the collectives behind ``models/deepseek_v4/sequence_shard.SequenceShard``.

A sequence of ``S`` tokens is cut into ``cp`` contiguous shards of ``S / cp``, one per rank of the ``cp``
group, in rank order. Contiguous shards balance DeepSeek-V4's attention without zig-zag reordering: every
query reads a fixed window and (CSA) a fixed top-k of compressed entries, so its cost barely depends on its
position (only HCA's entries, 1/128 of the tokens, grow with it). All collectives are functional
all-gathers (compile-traceable; their backward is a reduce-scatter), which run on NCCL and gloo alike.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

try:
    from torch.distributed._functional_collectives import all_gather_single
except ImportError:  # torch < 2.13 (the lent GPU image holds 2.11): the trainer imports; CP itself is refused there
    from torch.distributed._functional_collectives import all_gather_tensor_autograd as all_gather_single


class ContextParallel:
    """This rank's shard of every sequence: ``index`` of ``size``; attention reads ``halo`` tokens before it."""

    def __init__(self, group: dist.ProcessGroup, halo: int):
        self.group, self.halo = group, halo
        self.index, self.size = dist.get_rank(group), dist.get_world_size(group)

    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        """``[B, L, ...]`` -> ``[B, size * L, ...]`` (gradient: each part's, summed over ranks, to its rank)."""
        parts = all_gather_single(t.unsqueeze(0).contiguous(), 0, self.group)  # [size, B, L, ...]
        return parts.movedim(0, 1).flatten(1, 2)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        return self._gather(t.detach())

    def gather_with_grad(self, t: torch.Tensor) -> torch.Tensor:
        return self._gather(t)

    def extend(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] < self.halo:  # the halo would need tokens of more than one shard
            raise ValueError(f"a sequence shard of {x.shape[1]} tokens is shorter than the {self.halo}-token halo "
                             "its attention reads from the previous shard: use fewer, longer shards")
        # every rank's tail, so the backward (a reduce-scatter) runs on every rank, the first one included
        tails = all_gather_single(x[:, -self.halo:].unsqueeze(0).contiguous(), 0, self.group)
        previous = tails[self.index - 1]  # the first shard takes the last one's, zeroed: the graph stays alike
        if self.index == 0:
            previous = torch.where(torch.zeros((), dtype=torch.bool, device=x.device), previous, 0)
        return torch.cat([previous.to(x.dtype), x], dim=1)

    def part(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's shard ``[B, S / size, ...]`` of a whole-sequence batch tensor ``[B, S, ...]``."""
        local = t.shape[1] // self.size
        return t[:, self.index * local: (self.index + 1) * local]
