"""Named model shapes: the released Flash / Pro and tiny CPU debug models with every layer type."""

from __future__ import annotations

from .args import DeepseekV4ModelArgs

_DEBUG = dict(
    vocab_size=2048, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, head_dim=32,
    qk_rope_head_dim=16, q_lora_rank=32, o_lora_rank=16, o_groups=2, n_routed_experts=8,
    num_experts_per_tok=2, moe_intermediate_size=64, routed_scaling_factor=1.5, num_hash_layers=1,
    sliding_window=32, compress_ratios=[0, 4, 16, 4], compress_rope_theta=160000.0, rope_theta=10000.0,
    rope_scaling={"type": "yarn", "factor": 4, "original_max_position_embeddings": 512,
                  "beta_fast": 32, "beta_slow": 1},
    max_position_embeddings=4096, index_n_heads=4, index_head_dim=32, index_topk=8,
)


def _flavors() -> dict[str, DeepseekV4ModelArgs]:
    return {
        # layers: sliding, CSA (with indexer), HCA (ratio 16), CSA; layer 0 hash-routed; MTP depth 1
        "debugmodel": DeepseekV4ModelArgs(**_DEBUG, num_nextn_predict_layers=1),
        "debugmodel_mtp2": DeepseekV4ModelArgs(**_DEBUG, num_nextn_predict_layers=2),
        "flash": DeepseekV4ModelArgs(),  # the defaults are the released V4-Flash config.json
        "pro": DeepseekV4ModelArgs(
            hidden_size=7168, num_hidden_layers=61, num_attention_heads=128, q_lora_rank=1536,
            o_groups=16, n_routed_experts=384, moe_intermediate_size=3072, routed_scaling_factor=2.5,
            index_topk=1024, compress_ratios=[128, 128] + [4, 128] * 29 + [4, 0],
        ),
    }


FLAVORS = _flavors()
