"""DeepSeek-V4 model arguments, named exactly as the released ``config.json``.

The same dataclass reads both config dialects that exist in the wild (DeepSeek's released form and the
Hugging Face transformers form), validates every field before a module is built, and counts parameters
and training FLOPs for MFU.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCORING_FUNCS = ("sqrtsoftplus", "softmax", "sigmoid")
EXPERT_STORAGE = ("dense", "fp4")
CSA_RATIO = 4  # the released code ties overlapping windows + the lightning indexer to ratio 4
_HF_LAYER_TYPES = {
    "sliding_attention": 0,
    "compressed_sparse_attention": None,  # ratio taken from compress_rates
    "heavily_compressed_attention": None,
}


@dataclass
class DeepseekV4ModelArgs:
    vocab_size: int = 129280
    hidden_size: int = 4096
    num_hidden_layers: int = 43
    num_attention_heads: int = 64
    num_key_value_heads: int = 1
    head_dim: int = 512
    qk_rope_head_dim: int = 64
    q_lora_rank: int = 1024
    o_lora_rank: int = 1024
    o_groups: int = 8
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 6
    moe_intermediate_size: int = 2048
    routed_scaling_factor: float = 1.5
    norm_topk_prob: bool = True
    scoring_func: str = "sqrtsoftplus"
    topk_method: str = "noaux_tc"
    num_hash_layers: int = 3
    swiglu_limit: float = 10.0
    hidden_act: str = "silu"
    sliding_window: int = 128
    # one entry per backbone layer followed by one per MTP depth; 0 = sliding window only,
    # 4 = CSA (overlapping windows + lightning indexer), any other value = HCA.
    compress_ratios: list[int] = field(
        default_factory=lambda: [0, 0] + [4, 128] * 20 + [4, 0]
    )
    compress_rope_theta: float = 160000.0
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = field(
        default_factory=lambda: {
            "type": "yarn",
            "factor": 16,
            "original_max_position_embeddings": 65536,
            "beta_fast": 32,
            "beta_slow": 1,
        }
    )
    max_position_embeddings: int = 1048576
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    rms_norm_eps: float = 1e-6
    num_nextn_predict_layers: int = 1
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int = 0
    eos_token_id: int = 1
    # LoRA adapters (lora.py; set from the job's [lora] section), not part of the released config: rank 0 = none
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: list[str] = field(default_factory=list)
    # how the routed experts' weights are stored: "dense" (the parameter dtype) or "fp4" (the released FP4
    # bytes and scales, frozen: LoRA), not part of the released config
    expert_storage: str = "dense"

    def __post_init__(self) -> None:
        self.compress_ratios = [int(r) for r in self.compress_ratios]
        if len(self.compress_ratios) == self.num_hidden_layers:
            # Megatron-Bridge convention: MTP depths are sliding-window only when not listed.
            self.compress_ratios += [0] * self.num_nextn_predict_layers
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def bad(name: str, value: Any, allowed: str) -> ValueError:
            return ValueError(f"model arg `{name}` = {value!r} is invalid: {allowed}")

        positive = (
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
            "q_lora_rank", "o_lora_rank", "o_groups", "n_routed_experts", "num_experts_per_tok",
            "moe_intermediate_size", "sliding_window", "index_n_heads", "index_head_dim", "index_topk",
            "hc_mult", "hc_sinkhorn_iters",
        )
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise bad(name, getattr(self, name), "must be a positive integer")
        if self.num_key_value_heads != 1:
            raise bad("num_key_value_heads", self.num_key_value_heads, "DeepSeek-V4 uses one shared K=V head (1)")
        if self.n_shared_experts != 1:
            raise bad("n_shared_experts", self.n_shared_experts, "the released architecture has exactly 1")
        if self.num_nextn_predict_layers < 0:
            raise bad("num_nextn_predict_layers", self.num_nextn_predict_layers, "must be >= 0")
        rope = self.qk_rope_head_dim
        if rope < 2 or rope % 2 or rope > self.head_dim:
            raise bad("qk_rope_head_dim", rope, f"must be even and in [2, head_dim={self.head_dim}]")
        if rope > self.index_head_dim:
            raise bad("qk_rope_head_dim", rope, f"must be <= index_head_dim={self.index_head_dim}")
        if self.num_attention_heads % self.o_groups:
            raise bad("o_groups", self.o_groups,
                      f"must divide num_attention_heads={self.num_attention_heads}")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise bad("num_experts_per_tok", self.num_experts_per_tok,
                      f"must be <= n_routed_experts={self.n_routed_experts}")
        if self.expert_storage not in EXPERT_STORAGE:
            raise bad("expert_storage", self.expert_storage, "allowed " + ", ".join(EXPERT_STORAGE))
        if self.scoring_func not in SCORING_FUNCS:
            raise bad("scoring_func", self.scoring_func, f"allowed: {', '.join(SCORING_FUNCS)}")
        if self.topk_method != "noaux_tc":
            raise bad("topk_method", self.topk_method, "allowed: noaux_tc")
        if self.hidden_act != "silu":
            raise bad("hidden_act", self.hidden_act, "allowed: silu")
        if not 0 <= self.num_hash_layers <= self.num_hidden_layers:
            raise bad("num_hash_layers", self.num_hash_layers, f"must be in [0, {self.num_hidden_layers}]")
        expected = self.num_hidden_layers + self.num_nextn_predict_layers
        if len(self.compress_ratios) != expected:
            raise bad("compress_ratios", f"<{len(self.compress_ratios)} entries>",
                      f"needs num_hidden_layers + num_nextn_predict_layers = {expected} entries "
                      f"(or num_hidden_layers = {self.num_hidden_layers})")
        if any(r < 0 for r in self.compress_ratios):
            raise bad("compress_ratios", self.compress_ratios, "entries must be >= 0")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            if kind != "yarn":
                raise bad("rope_scaling", self.rope_scaling, "only YaRN ({'type': 'yarn', ...}) or null")
            for key in ("factor", "original_max_position_embeddings"):
                if key not in self.rope_scaling:
                    raise bad("rope_scaling", self.rope_scaling, f"YaRN needs `{key}`")
        if self.tie_word_embeddings:
            raise bad("tie_word_embeddings", True, "DeepSeek-V4 has an untied head (false)")

    # ------------------------------------------------------------------ derived
    @property
    def num_mtp_layers(self) -> int:
        return self.num_nextn_predict_layers

    @property
    def context_parallel_halo(self) -> int:
        """Tokens of the previous sequence shard a shard's attention reads under context parallelism: its first
        query's sliding window and its first compressed entry's pooling windows (two under CSA's overlap),
        rounded up to 16."""
        needed = max([self.sliding_window - 1] + [2 * r - 1 if r == CSA_RATIO else r - 1 for r in self.compress_ratios])
        return -(-needed // 16) * 16

    def layer_kind(self, layer_id: int) -> str:
        """'sliding', 'csa' or 'hca' for a backbone layer (or MTP layer ``num_hidden_layers + k``)."""
        ratio = self.compress_ratios[layer_id]
        return "sliding" if ratio == 0 else ("csa" if ratio == CSA_RATIO else "hca")

    def with_mtp_layers(self, depth: int) -> "DeepseekV4ModelArgs":
        """Same model with ``depth`` MTP modules (0 disables MTP)."""
        if depth < 0:
            raise ValueError(f"mtp depth must be >= 0, got {depth}")
        ratios = self.compress_ratios[: self.num_hidden_layers]
        mtp = self.compress_ratios[self.num_hidden_layers:]
        mtp = (mtp + [0] * depth)[:depth]
        return dataclasses.replace(self, num_nextn_predict_layers=depth, compress_ratios=ratios + mtp)

    # ------------------------------------------------------------------ HF config I/O
    @classmethod
    def from_hf_config(cls, config: dict[str, Any] | str | Path) -> "DeepseekV4ModelArgs":
        """Build from a ``config.json`` dict or path, released form or transformers form."""
        if not isinstance(config, dict):
            config = json.loads(Path(config).read_text())
        cfg = dict(config)
        if cfg.get("model_type", "deepseek_v4") != "deepseek_v4":
            raise ValueError(f"config `model_type` = {cfg['model_type']!r} is invalid: expected 'deepseek_v4'")
        names = {f.name for f in dataclasses.fields(cls)}
        n_layers = int(cfg.get("num_hidden_layers", cls.num_hidden_layers))
        n_mtp = int(cfg.get("num_nextn_predict_layers", 1))
        if "compress_ratios" not in cfg and "layer_types" in cfg:
            rates = {"compressed_sparse_attention": CSA_RATIO, "heavily_compressed_attention": 128}
            rates.update(cfg.get("compress_rates") or {})
            if rates["compressed_sparse_attention"] != CSA_RATIO:
                raise ValueError(
                    f"config `compress_rates.compressed_sparse_attention` = "
                    f"{rates['compressed_sparse_attention']} is invalid: the released architecture uses 4")
            ratios = []
            for t in cfg["layer_types"]:
                if t not in _HF_LAYER_TYPES:
                    raise ValueError(f"config `layer_types` entry {t!r} is invalid: "
                                     f"allowed {', '.join(_HF_LAYER_TYPES)}")
                ratios.append(0 if t == "sliding_attention" else rates[t])
            cfg["compress_ratios"] = ratios[:n_layers]
        if "num_hash_layers" not in cfg and "mlp_layer_types" in cfg:
            types = list(cfg["mlp_layer_types"])
            n_hash = sum(1 for t in types if t == "hash_moe")
            if types[:n_hash] != ["hash_moe"] * n_hash:
                raise ValueError("config `mlp_layer_types` is invalid: hash_moe layers must come first")
            cfg["num_hash_layers"] = n_hash
        if "qk_rope_head_dim" not in cfg and "partial_rotary_factor" in cfg and cfg["partial_rotary_factor"]:
            cfg["qk_rope_head_dim"] = int(round(cfg.get("head_dim", 512) * cfg["partial_rotary_factor"]))
        if "rope_parameters" in cfg and "rope_scaling" not in cfg:
            rp = cfg["rope_parameters"] or {}
            main, comp = rp.get("main", {}), rp.get("compress", {})
            if "rope_theta" in main:
                cfg["rope_theta"] = main["rope_theta"]
            if "rope_theta" in comp:
                cfg["compress_rope_theta"] = comp["rope_theta"]
            if comp.get("rope_type", comp.get("type")) == "yarn":
                cfg["rope_scaling"] = {
                    "type": "yarn",
                    **{k: comp[k] for k in ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow")
                       if k in comp},
                }
            else:
                cfg["rope_scaling"] = None
        if isinstance(cfg.get("eos_token_id"), list):
            cfg["eos_token_id"] = cfg["eos_token_id"][0]
        kwargs = {k: v for k, v in cfg.items() if k in names and v is not None}
        kwargs.setdefault("num_nextn_predict_layers", n_mtp)
        return cls(**kwargs)

    @property
    def lora_scaling(self) -> float:
        """``alpha / rank``: what the adapters' output is multiplied by (0 without adapters)."""
        return self.lora_alpha / self.lora_rank if self.lora_rank else 0.0

    def to_hf_config(self, adapters: bool = False) -> dict[str, Any]:
        """The released ``config.json`` form; ``adapters``: with the LoRA fields (a training checkpoint's
        config; exports merge the adapters and leave them out)."""
        out: dict[str, Any] = {"architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4"}
        out.update(dataclasses.asdict(self))
        if not adapters or not self.lora_rank:
            for name in ("lora_rank", "lora_alpha", "lora_targets", "expert_storage"):
                del out[name]
        out.update(torch_dtype="bfloat16", attention_bias=False, attention_dropout=0.0)
        return out

    # ------------------------------------------------------------------ counting
    def block_params(self, layer_id: int) -> dict[str, int]:
        """Parameter count of block ``layer_id`` by part, mirroring the module shapes."""
        h, d, nh = self.hidden_size, self.head_dim, self.num_attention_heads
        n, e, inter = self.hc_mult, self.n_routed_experts, self.moe_intermediate_size
        attn = (h * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * nh * d + h * d + d
                + nh * d * self.o_lora_rank + self.o_groups * self.o_lora_rank * h + nh)
        kind = self.layer_kind(layer_id)
        ratio = self.compress_ratios[layer_id]
        if kind != "sliding":
            coff = 2 if kind == "csa" else 1
            attn += 2 * coff * d * h + ratio * coff * d + d
        if kind == "csa":
            di = self.index_head_dim
            attn += (self.q_lora_rank * self.index_n_heads * di + self.index_n_heads * h
                     + 4 * di * h + ratio * 2 * di + di)
        gate = e * h  # the selection bias and tid2eid are buffers
        routed = 3 * e * inter * h
        shared = 3 * inter * h
        hc = 2 * ((2 + n) * n * n * h + (2 + n) * n + 3)
        norms = 2 * h
        return {"attn": attn, "gate": gate, "routed": routed, "shared": shared, "other": hc + norms}

    def _mtp_extra_params(self) -> int:
        h, n = self.hidden_size, self.hc_mult
        return 2 * h * h + 3 * h + n * n * h + n + 1

    def num_params(self, include_mtp: bool = True, include_embedding: bool = True) -> int:
        """Trainable parameters (``tid2eid`` is a buffer and not counted)."""
        h, n = self.hidden_size, self.hc_mult
        total = self.vocab_size * h * 2 + h + n * n * h + n + 1  # embed, head, norm, hc_head
        if not include_embedding:
            total -= self.vocab_size * h
        layers = range(self.num_hidden_layers + (self.num_nextn_predict_layers if include_mtp else 0))
        for i in layers:
            total += sum(self.block_params(i).values())
        if include_mtp:
            total += self.num_nextn_predict_layers * self._mtp_extra_params()
        return total

    def num_active_params(self, include_mtp: bool = True) -> int:
        """Parameters touched per token (routed experts counted for the top-k only, embedding excluded)."""
        total = self.num_params(include_mtp, include_embedding=False)
        layers = self.num_hidden_layers + (self.num_nextn_predict_layers if include_mtp else 0)
        per_expert = 3 * self.moe_intermediate_size * self.hidden_size
        total -= layers * (self.n_routed_experts - self.num_experts_per_tok) * per_expert
        if include_mtp:
            total += self.num_nextn_predict_layers * self.vocab_size * self.hidden_size  # head reused per depth
        return total

    def training_flops_per_token(self, seq_len: int, include_mtp: bool = True, indexer_trained: bool = True
                                 ) -> float:
        """6 x active matmul params + attention score/value FLOPs (fwd+bwd, causal, per token).

        Attention per layer: the query at position t sees min(window, t + 1) raw keys plus the compressed
        entries complete by then, ``(t + 1) // ratio`` (CSA: at most ``index_topk`` of them), averaged over
        the positions of one sequence. The lightning indexer scores every complete entry; it has no backward
        unless trained (``indexer_trained``: its KL loss is on, ``training.indexer_loss_coeff > 0``).
        """
        flops = 6.0 * self.num_active_params(include_mtp)
        layers = self.num_hidden_layers + (self.num_nextn_predict_layers if include_mtp else 0)
        for i in range(layers):
            keys = _mean_visible(seq_len, self.sliding_window)
            ratio = self.compress_ratios[i]
            if ratio and self.layer_kind(i) == "csa":
                keys += _mean_entries(seq_len, ratio, self.index_topk)
                passes = 6.0 if indexer_trained else 2.0  # fwd (+ the two backward products)
                flops += passes * self.index_n_heads * self.index_head_dim * _mean_entries(seq_len, ratio)
                if not indexer_trained:  # its projections run forward only: 2x their weights, not 6x
                    flops -= 4.0 * self._indexer_matmul_params()
            elif ratio:
                keys += _mean_entries(seq_len, ratio)
            flops += 6.0 * 2 * self.num_attention_heads * self.head_dim * keys
        return flops

    def _indexer_matmul_params(self) -> int:
        """Matmul weights of one lightning indexer: its query projection, head weights and compressor."""
        di, h = self.index_head_dim, self.hidden_size
        return self.q_lora_rank * self.index_n_heads * di + self.index_n_heads * h + 4 * di * h


def _mean_visible(seq_len: int, window: int) -> float:
    """Average number of keys a causal sliding-window query sees over positions 0..seq_len-1."""
    full = min(seq_len, window)
    ramp = full * (full + 1) / 2
    return (ramp + (seq_len - full) * window) / seq_len


def _mean_entries(seq_len: int, ratio: int, cap: int | None = None) -> float:
    """Average over positions t = 0..seq_len-1 of ``min(cap, (t + 1) // ratio)``: the compressed entries
    complete at t (one per ``ratio`` tokens), at most ``cap``."""

    def floor_sum(n: int) -> int:  # sum of k // ratio for k = 1..n
        q, r = divmod(n, ratio)
        return ratio * q * (q - 1) // 2 + q * (r + 1)

    uncapped = seq_len if cap is None else min(seq_len, max(cap * ratio - 1, 0))  # beyond, every term is cap
    return (floor_sum(uncapped) + (0 if cap is None else cap * (seq_len - uncapped))) / seq_len


__all__ = ["DeepseekV4ModelArgs", "SCORING_FUNCS", "CSA_RATIO"]
