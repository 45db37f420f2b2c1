"""Key mapping between our module tree and the two Hugging Face layouts.

* Released layout (DeepSeek's safetensors, ``embed.weight``, ``layers.{i}.hc_attn_fn``,
  ``layers.{i}.ffn.experts.{e}.w1.weight``, ``mtp.{k}.*``): our FQNs were chosen to match it, so only the
  mHC parameters and the stacked experts are renamed.
* transformers layout (``DeepseekV4ForCausalLM.save_pretrained``: ``model.layers.{i}.self_attn.q_a_proj``,
  ``mlp.experts.gate_up_proj`` ...). transformers has no MTP.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch

from .args import DeepseekV4ModelArgs
from .moe import EXPERT_WEIGHTS

_HC = re.compile(r"(^|\.)(hc_attn|hc_ffn|hc_head)\.(fn|base|scale)$")
_HC_HF = re.compile(r"(^|\.)(hc_attn|hc_ffn|hc_head)_(fn|base|scale)$")
EXPERT_HF = re.compile(r"^(.*\.ffn\.experts)\.(\d+)\.(w[123])\.weight$")


def hf_name(fqn: str) -> str:
    """Our FQN -> the released name (for everything but the stacked experts)."""
    return _HC.sub(lambda m: f"{m.group(1)}{m.group(2)}_{m.group(3)}", fqn)


def fqn_from_hf(name: str) -> str:
    """Released name -> our FQN (routed experts keep their per-expert name)."""
    return _HC_HF.sub(lambda m: f"{m.group(1)}{m.group(2)}.{m.group(3)}", name)


def iter_hf(state: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
            first_expert: Mapping[str, int] | None = None):
    """(released name, tensor) pairs from a mapping or ``(name, tensor)`` pairs, stacked experts split per
    expert; lazy, for streaming writers. ``first_expert[name]``: the global index of a stacked tensor's first
    expert when it holds only some (a rank's shard), else 0. A stacked name may come again (a reader's next
    block of experts): its experts are numbered on from the previous block's."""
    following = dict(first_expert or {})  # stacked name -> the global index of its next expert
    for name, tensor in state.items() if hasattr(state, "items") else state:
        if name.endswith(EXPERT_WEIGHTS):
            prefix, w = name.rsplit(".", 1)
            first = following.get(name, 0)
            following[name] = first + tensor.shape[0]
            for e in range(tensor.shape[0]):
                yield f"{prefix}.{first + e}.{w}.weight", tensor[e]
        else:
            yield hf_name(name), tensor

# ours -> transformers, applied in order to the part after ``layers.{i}.``
_TRANSFORMERS_LAYER = [
    ("attn_norm.", "input_layernorm."),
    ("ffn_norm.", "post_attention_layernorm."),
    ("hc_attn.", "attn_hc."),
    ("hc_ffn.", "ffn_hc."),
    ("attn.indexer.compressor.wkv.", "self_attn.compressor.indexer.kv_proj."),
    ("attn.indexer.compressor.wgate.", "self_attn.compressor.indexer.gate_proj."),
    ("attn.indexer.compressor.ape", "self_attn.compressor.indexer.position_bias"),
    ("attn.indexer.compressor.norm.", "self_attn.compressor.indexer.kv_norm."),
    ("attn.indexer.wq_b.", "self_attn.compressor.indexer.q_b_proj."),
    ("attn.indexer.weights_proj.", "self_attn.compressor.indexer.scorer.weights_proj."),
    ("attn.compressor.wkv.", "self_attn.compressor.kv_proj."),
    ("attn.compressor.wgate.", "self_attn.compressor.gate_proj."),
    ("attn.compressor.ape", "self_attn.compressor.position_bias"),
    ("attn.compressor.norm.", "self_attn.compressor.kv_norm."),
    ("attn.wq_a.", "self_attn.q_a_proj."),
    ("attn.q_norm.", "self_attn.q_a_norm."),
    ("attn.wq_b.", "self_attn.q_b_proj."),
    ("attn.wkv.", "self_attn.kv_proj."),
    ("attn.kv_norm.", "self_attn.kv_norm."),
    ("attn.wo_a.", "self_attn.o_a_proj."),
    ("attn.wo_b.", "self_attn.o_b_proj."),
    ("attn.attn_sink", "self_attn.sinks"),
    ("ffn.gate.bias", "mlp.gate.e_score_correction_bias"),
    ("ffn.gate.", "mlp.gate."),
    ("ffn.shared_experts.w1.", "mlp.shared_experts.gate_proj."),
    ("ffn.shared_experts.w3.", "mlp.shared_experts.up_proj."),
    ("ffn.shared_experts.w2.", "mlp.shared_experts.down_proj."),
]
_TRANSFORMERS_GLOBAL = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "head.weight": "lm_head.weight",
    "hc_head.fn": "model.hc_head.hc_fn",
    "hc_head.base": "model.hc_head.hc_base",
    "hc_head.scale": "model.hc_head.hc_scale",
}


class DeepseekV4StateDictAdapter:
    def __init__(self, args: DeepseekV4ModelArgs):
        self.args = args

    # ------------------------------------------------------------------ released layout
    def to_hf(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return dict(iter_hf(state_dict))

    def from_hf(self, hf_state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
        for name, tensor in hf_state_dict.items():
            match = EXPERT_HF.match(name)
            if match:
                experts.setdefault((match.group(1), match.group(3)), {})[int(match.group(2))] = tensor
                continue
            out[fqn_from_hf(name)] = tensor
        for (prefix, w), by_id in experts.items():
            missing = sorted(set(range(self.args.n_routed_experts)) - set(by_id))
            if missing:
                raise KeyError(f"{prefix}: routed experts {missing[:8]} missing for {w}")
            out[f"{prefix}.{w}"] = torch.stack([by_id[e] for e in range(self.args.n_routed_experts)])
        return out

    # ------------------------------------------------------------------ transformers layout
    def to_transformers(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name, tensor in state_dict.items():
            if name.startswith("mtp.") or name.startswith("mtp_embed."):
                continue  # transformers does not model MTP
            if name in _TRANSFORMERS_GLOBAL:
                out[_TRANSFORMERS_GLOBAL[name]] = tensor
                continue
            _, idx, rest = name.split(".", 2)
            prefix = f"model.layers.{idx}."
            if rest == "ffn.experts.w1":
                w3 = state_dict[name[: -len("w1")] + "w3"]
                out[prefix + "mlp.experts.gate_up_proj"] = torch.cat([tensor, w3], dim=1)
            elif rest == "ffn.experts.w2":
                out[prefix + "mlp.experts.down_proj"] = tensor
            elif rest == "ffn.experts.w3":
                continue
            else:
                out[prefix + _rename(rest, to_transformers=True)] = tensor
        return out

    def from_transformers(self, hf_state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        inverse_global = {v: k for k, v in _TRANSFORMERS_GLOBAL.items()}
        out: dict[str, torch.Tensor] = {}
        inter = self.args.moe_intermediate_size
        for name, tensor in hf_state_dict.items():
            if name in inverse_global:
                out[inverse_global[name]] = tensor
                continue
            if not name.startswith("model.layers."):
                raise KeyError(f"unexpected transformers tensor {name!r}")
            _, _, idx, rest = name.split(".", 3)
            prefix = f"layers.{idx}."
            if rest == "mlp.experts.gate_up_proj":
                out[prefix + "ffn.experts.w1"], out[prefix + "ffn.experts.w3"] = tensor.split(inter, dim=1)
            elif rest == "mlp.experts.down_proj":
                out[prefix + "ffn.experts.w2"] = tensor
            else:
                out[prefix + _rename(rest, to_transformers=False)] = tensor
        return out


def _rename(rest: str, to_transformers: bool) -> str:
    """Translate the part of a layer key after ``layers.{i}.`` with the first matching table entry."""
    for ours, theirs in _TRANSFORMERS_LAYER:
        source, target = (ours, theirs) if to_transformers else (theirs, ours)
        if rest.startswith(source):
            return target + rest[len(source):]
    return rest
