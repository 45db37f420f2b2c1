"""Multi-Token Prediction (dsv4-spec.md §3): depth k predicts token t+k+2 at position t.

Each depth is a full V4 block (at layer id ``num_hidden_layers + k``) fed with
``e_proj(enorm(embed(ids shifted by k+1))) + h_proj(hnorm(stream))``, with its own ``hc_head`` and ``norm``.
The embedding table and LM head are the backbone's.
"""

from __future__ import annotations

import torch
from torch import nn

from .args import DeepseekV4ModelArgs
from .attention import AttentionContext
from .block import Block
from .document import same_document_ahead, shift_left
from .hyper_connection import HyperHead
from .norm import RMSNorm

IGNORE_INDEX = -100


class MTPBlock(Block):
    def __init__(self, args: DeepseekV4ModelArgs, depth: int):
        super().__init__(args, args.num_hidden_layers + depth)
        h, eps = args.hidden_size, args.rms_norm_eps
        self.e_proj = nn.Linear(h, h, bias=False)
        self.h_proj = nn.Linear(h, h, bias=False)
        self.enorm = RMSNorm(h, eps)
        self.hnorm = RMSNorm(h, eps)
        self.norm = RMSNorm(h, eps)
        self.hc_head = HyperHead(h, args.hc_mult, args.hc_eps, eps)

    def forward(self, stream: torch.Tensor, embedded: torch.Tensor, ctx: AttentionContext,
                input_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (next depth's stream ``[B,S,n,H]``, this depth's normed hidden ``[B,S,H]``)."""
        fused = self.e_proj(self.enorm(embedded)).unsqueeze(2) + self.h_proj(self.hnorm(stream))
        stream = super().forward(fused, ctx, input_ids)
        return stream, self.norm(self.hc_head(stream))


def mtp_input_ids(input_ids: torch.Tensor, positions: torch.Tensor, depth: int) -> torch.Tensor:
    """Token ids shifted left by ``depth + 1``; 0 in the tail and where the source is in another document."""
    shift = depth + 1
    return shift_left(input_ids, shift, same_document_ahead(positions, shift), fill=0)


def mtp_targets(labels: torch.Tensor, positions: torch.Tensor, depth: int,
                ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Depth-``depth`` targets from next-token ``labels``: ``labels[t + depth + 1]`` (i.e. token t+depth+2),
    ``ignore_index`` in the tail and wherever that token lies in another document."""
    shift = depth + 1
    return shift_left(labels, shift, same_document_ahead(positions, shift), fill=ignore_index)
