"""DeepSeek-V4 MoE: fp32 router (sqrt-softplus scores, bias for selection only, or a fixed token->expert
hash table on the first layers), clamped SwiGLU experts stored stacked for grouped GEMM, one shared expert.
The routed experts optionally train quantisation-aware: their forward sees the weights as the released files
store them (FP4, or the Base checkpoints' FP8), their gradients pass straight through to the weights. Frozen
(LoRA fine-tuning), they may be stored as those FP4 bytes themselves and dequantised for each forward.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ...components.quantization import FP4_GROUP, dequantize_fp4
from . import gpu_paths
from .args import DeepseekV4ModelArgs
from .fp32_linear import fp32_linear
from .fused import compiled_on_cuda
from .lora import adapter_names, merged_weight
from .norm import fp32
from .qat import FakeQuantized
from .running_stats import recomputing


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
        # tokens routed to each expert since the last balancing update (not saved; counted by MoE.forward)
        self.register_buffer("expert_load", torch.zeros(args.n_routed_experts, dtype=torch.float32),
                             persistent=False)

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` ``[T, H]`` -> (weights ``[T, k]`` fp32, expert ids ``[T, k]``)."""
        logits = fp32_linear(x, self.weight)
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
        return weights * self.route_scale, idx


EXPERT_WEIGHTS = ("experts.w1", "experts.w2", "experts.w3")  # names' endings of the stacked expert weights
FP4_SCALE = "_scale"  # FP4-stored experts: ``w1`` holds the packed bytes, ``w1_scale`` the E8M0 scale bytes
# routed-expert tensors stacked along dim 0 by expert: weights, their LoRA adapters, their FP4 scales
STACKED_BY_EXPERT = re.compile(rf"\.experts\.w[123](_lora_[ab]|{FP4_SCALE})?$")


@compiled_on_cuda
def stored_fp4_weight(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """FP4-stored expert weights in ``dtype`` for one forward (one fused kernel on CUDA)."""
    return dequantize_fp4(packed, scale).to(dtype)


def fp4_scales(names: Iterable[str]) -> set[str]:
    """The names among ``names`` that are FP4-stored experts' scales (read and written with their weight)."""
    names = set(names)
    return {f"{n}{FP4_SCALE}" for n in names} & names


def dense_experts(names: Iterable[str], load: Callable[[str], torch.Tensor]
                  ) -> tuple[list[str], Callable[[str], torch.Tensor]]:
    """A model's tensor names and loader as a dense model's: FP4-stored experts dequantised (fp32) when loaded,
    their scales not named (for exports and conversions, which write the released dense layout)."""
    names = list(names)
    scales = fp4_scales(names)

    def load_dense(name: str) -> torch.Tensor:
        tensor = load(name)
        return dequantize_fp4(tensor, load(f"{name}{FP4_SCALE}")) if f"{name}{FP4_SCALE}" in scales else tensor

    return [n for n in names if n not in scales], load_dense


class RoutedExperts(nn.Module):
    """Clamped-SwiGLU experts stored stacked: w1/w3 ``[E, I, H]``, w2 ``[E, H, I]``.

    Works on token rows already grouped by expert, so expert parallelism only has to move rows around it
    (``distributed/expert_parallel.py``); ``E`` is then the number of experts this rank holds. ``qat``
    (``"none"`` | ``"fp4"`` | ``"fp8"``): the format the forward rounds each expert matrix to. LoRA
    (``lora.py``) may add per-expert adapters ``w*_lora_a`` ``[E, r, in]``, ``w*_lora_b`` ``[E, out, r]``.
    """

    use_grouped_mm: bool | None = None  # None: torch._grouped_mm for bf16 on CUDA (fast kernels), else the loop

    def __init__(self, n_experts: int, hidden: int, inter: int, limit: float, storage: str = "dense"):
        super().__init__()
        self.limit, self.qat, self.lora_scaling = limit, "none", 0.0
        for name, (rows, cols) in {"w1": (inter, hidden), "w2": (hidden, inter), "w3": (inter, hidden)}.items():
            if storage == "fp4":  # frozen, as the released files store them: 4.25 bits per weight
                self.register_parameter(name, nn.Parameter(
                    torch.empty(n_experts, rows, cols // 2, dtype=torch.uint8), requires_grad=False))
                self.register_parameter(f"{name}{FP4_SCALE}", nn.Parameter(
                    torch.empty(n_experts, rows, cols // FP4_GROUP, dtype=torch.uint8), requires_grad=False))
            else:
                self.register_parameter(name, nn.Parameter(torch.empty(n_experts, rows, cols)))

    def forward(self, xs: torch.Tensor, ws: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """``xs`` ``[N, H]`` rows grouped by expert, ``ws`` ``[N, 1]`` fp32 routing weights, ``counts``
        ``[E]`` rows per expert -> ``[N, H]`` as ``w2``'s GEMM gives them, in ``xs``' dtype (bf16 on GPUs;
        ``MoE`` sums them in fp32): expert parallelism's combine moves them at that width, exactly. The
        routing weight is applied before ``w2``."""
        matrices = self.matrices(xs.dtype)
        grouped = self.use_grouped_mm
        if grouped is None:
            grouped = gpu_paths.fast_kernels and xs.is_cuda and xs.dtype == torch.bfloat16
        if grouped and xs.shape[0] > 0:
            offsets = counts.cumsum(0).to(torch.int32)
            return self.expert_ffn(xs, ws, matrices,
                                   lambda x, w: torch._grouped_mm(x, w.transpose(-2, -1), offs=offsets))
        outs, sizes = [], counts.tolist()
        for e, (xe, we) in enumerate(zip(xs.split(sizes), ws.split(sizes))):
            if xe.shape[0] == 0:
                continue
            outs.append(self.expert_ffn(xe, we, matrices, lambda x, w: x @ w[e].t()))
        return torch.cat(outs) if outs else xs.new_zeros(0, xs.shape[-1])

    def matrices(self, dtype: torch.dtype, take: Callable[[str], torch.Tensor] | None = None
                 ) -> dict[str, tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]]:
        """Each matrix's local stacked weight and LoRA adapter ``(A, B)`` (or None). FP4-stored weights are
        dequantised to ``dtype`` (the activations'). Under quantisation-aware training an adapter is merged
        into its weight before the rounding: the forward then computes what an FP4/FP8 export of the merged
        model serves. ``take(name)``: the tensor to use for parameter ``name`` (default: this rank's shard)."""
        take = take or (lambda name: local_tensor(getattr(self, name)))
        out = {}
        for name in ("w1", "w2", "w3"):
            weight, adapter = take(name), None
            stored = weight.dtype == torch.uint8
            if stored:
                weight = stored_fp4_weight(weight, take(f"{name}{FP4_SCALE}"), dtype)
            if hasattr(self, f"{name}_lora_a"):
                adapter = tuple(take(n) for n in adapter_names(name))
            if self.qat != "none" and not (stored and adapter is None and self.qat == "fp4"):  # FP4 is its rounding
                if adapter is not None:
                    weight = merged_weight(weight, *adapter, self.lora_scaling)
                weight, adapter = FakeQuantized.apply(weight, self.qat), None
            out[name] = (weight, adapter)
        return out

    def expert_ffn(self, x: torch.Tensor, w: torch.Tensor, matrices: dict,
                   matmul: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Experts on their rows ``x`` (routing weights ``w``, applied before ``w2``), in ``x``' dtype.
        ``matmul(x, stacked)``: ``x`` times the transposed matrix of its expert (one expert's rows, or all
        of them grouped); ``matrices`` as ``self.matrices()``."""
        def project(x: torch.Tensor, name: str) -> torch.Tensor:
            weight, adapter = matrices[name]
            out = matmul(x, weight)
            if adapter is not None:
                out = out + matmul(matmul(x, adapter[0]), adapter[1]) * self.lora_scaling
            return out

        act = clamped_swiglu(project(x, "w1"), project(x, "w3"), self.limit) * w
        return project(act.to(x.dtype), "w2")


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of an expert-parallel (DTensor) weight; the tensor itself otherwise."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


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
        self.experts = RoutedExperts(args.n_routed_experts, h, inter, args.swiglu_limit, args.expert_storage)
        self.shared_experts = SharedExpert(h, inter, args.swiglu_limit)

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor | None) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, idx = self.gate(flat, input_ids)
        flat_idx = idx.flatten()
        order = flat_idx.argsort(stable=True)
        token = order // idx.shape[1]
        # counts with a static shape (bincount's depends on the data: a graph break under compile)
        counts = torch.zeros(self.gate.n_experts, dtype=torch.long, device=x.device).index_add_(
            0, flat_idx, torch.ones_like(flat_idx))
        if self.training and not recomputing():
            self.gate.expert_load += counts
        rows = self.experts(flat[token], weights.flatten()[order].unsqueeze(-1), counts)
        routed = fp32(torch.zeros_like(flat)).index_add_(0, token, fp32(rows))
        return (routed + fp32(self.shared_experts(flat))).to(x.dtype).view(shape)
