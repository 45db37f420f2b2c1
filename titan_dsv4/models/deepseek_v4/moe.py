"""DeepSeek-V4 MoE: fp32 router (sqrt-softplus scores, bias for selection only, or a fixed token->expert
hash table on the first layers), clamped SwiGLU experts stored stacked for grouped GEMM, one shared expert.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .args import DeepseekV4ModelArgs
from .norm import fp32


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    """``silu(min(gate, L)) * clamp(up, -L, L)`` in fp32."""
    return F.silu(fp32(gate).clamp(max=limit)) * fp32(up).clamp(-limit, limit)


class Router(nn.Module):
    """Scores every expert in fp32 and picks top-k (learned) or looks them up in ``tid2eid`` (hash)."""

    def __init__(self, args: DeepseekV4ModelArgs, hashed: bool):
        super().__init__()
        self.hashed, self.top_k = hashed, args.num_experts_per_tok
        self.scoring_func, self.norm_topk_prob = args.scoring_func, args.norm_topk_prob
        self.route_scale, self.n_experts = args.routed_scaling_factor, args.n_routed_experts
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.hidden_size))
        if hashed:
            self.register_buffer("tid2eid", torch.zeros(args.vocab_size, self.top_k, dtype=torch.long))
        else:
            # aux-loss-free balancing bias: used for selection only, moved outside autograd by the trainer
            self.register_buffer("bias", torch.zeros(args.n_routed_experts, dtype=torch.float32))
        # tokens routed to each expert since the last balancing update (not saved)
        self.register_buffer("expert_load", torch.zeros(args.n_routed_experts, dtype=torch.float32),
                             persistent=False)

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` ``[T, H]`` -> (weights ``[T, k]`` fp32, expert ids ``[T, k]``)."""
        logits = F.linear(fp32(x), fp32(self.weight))
        if self.scoring_func == "softmax":
            scores = logits.softmax(dim=-1)
        elif self.scoring_func == "sigmoid":
            scores = logits.sigmoid()
        else:
            scores = F.softplus(logits).sqrt()
        if self.hashed:
            if input_ids is None:
                raise ValueError("hash-routed MoE layers need the token ids (pass input_ids)")
            idx = self.tid2eid[input_ids.reshape(-1)].long()
        else:
            idx = torch.topk(scores + fp32(self.bias), self.top_k, dim=-1).indices
        weights = scores.gather(1, idx)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.training:
            with torch.no_grad():
                self.expert_load += torch.bincount(idx.flatten(), minlength=self.n_experts).float()
        return weights * self.route_scale, idx


class RoutedExperts(nn.Module):
    """``n_routed_experts`` clamped-SwiGLU experts stored stacked: w1/w3 ``[E, I, H]``, w2 ``[E, H, I]``."""

    def __init__(self, n_experts: int, hidden: int, inter: int, limit: float):
        super().__init__()
        self.limit = limit
        self.w1 = nn.Parameter(torch.empty(n_experts, inter, hidden))
        self.w2 = nn.Parameter(torch.empty(n_experts, hidden, inter))
        self.w3 = nn.Parameter(torch.empty(n_experts, inter, hidden))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """fp32 ``[T, H]`` sum of each token's experts, routing weight applied before ``w2``."""
        n_tokens, top_k = idx.shape
        flat = idx.flatten()
        order = flat.argsort(stable=True)
        token = order // top_k
        counts = torch.bincount(flat, minlength=self.w1.shape[0]).tolist()
        xs = x[token]
        ws = weights.flatten()[order].unsqueeze(-1)
        outs = []
        for e, (xe, we) in enumerate(zip(xs.split(counts), ws.split(counts))):
            if xe.shape[0] == 0:
                continue
            act = clamped_swiglu(xe @ self.w1[e].t(), xe @ self.w3[e].t(), self.limit) * we
            outs.append(act.to(x.dtype) @ self.w2[e].t())
        out = fp32(torch.zeros(n_tokens, x.shape[-1], dtype=x.dtype, device=x.device))
        if outs:
            out.index_add_(0, token, fp32(torch.cat(outs)))
        return out


class SharedExpert(nn.Module):
    def __init__(self, hidden: int, inter: int, limit: float):
        super().__init__()
        self.limit = limit
        self.w1 = nn.Linear(hidden, inter, bias=False)
        self.w2 = nn.Linear(inter, hidden, bias=False)
        self.w3 = nn.Linear(hidden, inter, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(clamped_swiglu(self.w1(x), self.w3(x), self.limit).to(x.dtype))


class MoE(nn.Module):
    def __init__(self, args: DeepseekV4ModelArgs, layer_id: int):
        super().__init__()
        inter, h = args.moe_intermediate_size, args.hidden_size
        self.gate = Router(args, hashed=layer_id < args.num_hash_layers)
        self.experts = RoutedExperts(args.n_routed_experts, h, inter, args.swiglu_limit)
        self.shared_experts = SharedExpert(h, inter, args.swiglu_limit)

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor | None) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, idx = self.gate(flat, input_ids)
        routed = self.experts(flat, weights, idx)
        return (routed + fp32(self.shared_experts(flat))).to(x.dtype).view(shape)
