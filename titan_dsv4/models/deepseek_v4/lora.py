"""LoRA adapters for fine-tuning on fewer GPUs: chosen projections compute ``x Wᵀ + (α / r) (x Aᵀ) Bᵀ`` with
the base weight ``W`` frozen and only ``A`` [r, in] and ``B`` [out, r] trained (``B`` starts at zero, so
training starts from the base model). Exports merge ``W + (α / r) B A`` back into the released layout.

The targets are named by their path inside a block: the attention's ``wq_a``, ``wq_b``, ``wkv``, ``wo_b``, the
shared expert's ``w1``/``w2``/``w3``, the MTP blocks' ``e_proj`` and ``h_proj`` (modules: ``LoRALinear``), and the
routed experts' stacked ``w1``/``w2``/``w3`` ``[E, out, in]``, which get one adapter per expert, ``A`` [E, r, in]
and ``B`` [E, out, r], beside them (``RoutedExperts`` applies them). (``wo_a`` is applied group by group from its
weight, the compressors and the indexer through fp32 GEMMs of their weights: none of them takes an adapter.)
"""

from __future__ import annotations

import re
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

LORA_TARGETS = ("attn.wq_a", "attn.wq_b", "attn.wkv", "attn.wo_b", "ffn.shared_experts.w1",
                "ffn.shared_experts.w2", "ffn.shared_experts.w3", "ffn.experts.w1", "ffn.experts.w2",
                "ffn.experts.w3", "e_proj", "h_proj")
_BLOCK_PATH = re.compile(r"^(?:layers|mtp)\.\d+\.(.+)$")


class LoRALinear(nn.Linear):
    """A bias-free linear layer with a low-rank adapter beside its weight."""

    def __init__(self, base: nn.Linear, rank: int, scaling: float):
        super().__init__(base.in_features, base.out_features, bias=False, device="meta")
        self.weight = base.weight  # the base weight itself (values, sharding and all), frozen by the trainer
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_b = nn.Parameter(torch.empty(base.out_features, rank, device=base.weight.device))
        self.scaling = scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight) + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scaling


def add_adapters(model: nn.Module, rank: int, scaling: float, targets: list[str]) -> None:
    """Give every target of every block (MTP blocks included) an adapter: a projection module becomes a
    ``LoRALinear``; a stacked expert weight ``w`` gains the parameters ``w_lora_a``, ``w_lora_b`` beside it."""
    unknown = sorted(set(targets) - set(LORA_TARGETS))
    if unknown or not targets:
        raise ValueError(f"LoRA targets {unknown or targets} are invalid: name some of {', '.join(LORA_TARGETS)}")
    for name, module in list(model.named_modules()):
        match = _BLOCK_PATH.match(name)
        if not match:
            continue
        if match.group(1) in targets and isinstance(module, nn.Linear):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, LoRALinear(module, rank, scaling))
            continue
        for weight_name, weight in list(module.named_parameters(recurse=False)):
            if f"{match.group(1)}.{weight_name}" in targets and weight.dim() == 3:
                n_experts, out_features, in_features = weight.shape
                if weight.dtype == torch.uint8:  # stored as FP4: two weights per byte
                    in_features *= 2
                a, b = adapter_names(weight_name)
                module.register_parameter(a, nn.Parameter(torch.empty(n_experts, rank, in_features,
                                                                      device=weight.device)))
                module.register_parameter(b, nn.Parameter(torch.empty(n_experts, out_features, rank,
                                                                      device=weight.device)))
                module.lora_scaling = scaling


def is_adapter(name: str) -> bool:
    return name.endswith(("lora_a", "lora_b"))


def adapter_names(weight_name: str) -> tuple[str, str]:
    """The names of a weight's adapter ``(A, B)``: ``x.weight`` -> ``x.lora_a``, ``x.lora_b`` (a projection);
    a stacked expert weight ``x.w1`` -> ``x.w1_lora_a``, ``x.w1_lora_b``."""
    stem = weight_name[: -len("weight")] if weight_name.endswith(".weight") else f"{weight_name}_"
    return f"{stem}lora_a", f"{stem}lora_b"


def freeze_all_but_adapters(model: nn.Module) -> None:
    """LoRA training: no gradient (hence no optimizer state) for any weight but the adapters."""
    for name, p in model.named_parameters():
        if not is_adapter(name):
            p.requires_grad_(False)


def merged_weight(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``W + scaling · B A`` in fp32, returned in ``W``'s dtype (stacked experts: one product per expert)."""
    return (weight.float() + scaling * (lora_b.float() @ lora_a.float())).to(weight.dtype)


def merged_items(names: Iterable[str], load: Callable[[str], torch.Tensor],
                 scaling: float) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for every weight among ``names``, loaded one at a time by ``load`` (from a file, or
    gathered from shards), each adapted weight merged with its adapter (the released layout); the adapters
    themselves are left out."""
    names = list(names)
    present = set(names)
    for name in names:
        if is_adapter(name):
            continue
        tensor, (a, b) = load(name), adapter_names(name)
        if a in present:
            tensor = merged_weight(tensor, load(a), load(b), scaling)
        yield name, tensor
