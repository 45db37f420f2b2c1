"""One DeepSeek-V4 block: two mHC sites around attention and the MoE; no plain residual add anywhere."""

from __future__ import annotations

import torch
from torch import nn

from .args import DeepseekV4ModelArgs
from .attention import Attention, AttentionContext
from .hyper_connection import HyperConnection
from .moe import MoE
from .norm import RMSNorm


class Block(nn.Module):
    def __init__(self, args: DeepseekV4ModelArgs, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        h, eps = args.hidden_size, args.rms_norm_eps
        self.attn_norm = RMSNorm(h, eps)
        self.attn = Attention(args, layer_id)
        self.ffn_norm = RMSNorm(h, eps)
        self.ffn = MoE(args, layer_id)
        self.hc_attn = HyperConnection(h, args.hc_mult, args.hc_sinkhorn_iters, args.hc_eps, eps)
        self.hc_ffn = HyperConnection(h, args.hc_mult, args.hc_sinkhorn_iters, args.hc_eps, eps)

    def forward(self, x: torch.Tensor, ctx: AttentionContext, input_ids: torch.Tensor | None) -> torch.Tensor:
        """``x``: the mHC stream ``[B, S, hc_mult, H]``."""
        collapsed, post, comb = self.hc_attn(x)
        x = HyperConnection.post(self.attn(self.attn_norm(collapsed), ctx), x, post, comb)
        collapsed, post, comb = self.hc_ffn(x)
        return HyperConnection.post(self.ffn(self.ffn_norm(collapsed), input_ids), x, post, comb)
