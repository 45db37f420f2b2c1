"""Build Hugging Face transformers' DeepseekV4ForCausalLM with the same weights as one of our models."""

from __future__ import annotations

import torch

from titan_dsv4.models.deepseek_v4 import DeepseekV4Model, DeepseekV4ModelArgs
from titan_dsv4.models.deepseek_v4.state_dict_adapter import DeepseekV4StateDictAdapter


def transformers_config(args: DeepseekV4ModelArgs):
    from transformers import DeepseekV4Config

    n = args.num_hidden_layers
    kinds = {"sliding": "sliding_attention", "csa": "compressed_sparse_attention",
             "hca": "heavily_compressed_attention"}
    hca = [r for i, r in enumerate(args.compress_ratios[:n]) if args.layer_kind(i) == "hca"]
    cfg = DeepseekV4Config(
        vocab_size=args.vocab_size, hidden_size=args.hidden_size, moe_intermediate_size=args.moe_intermediate_size,
        num_hidden_layers=n, num_attention_heads=args.num_attention_heads, head_dim=args.head_dim,
        q_lora_rank=args.q_lora_rank, num_experts_per_tok=args.num_experts_per_tok,
        n_routed_experts=args.n_routed_experts, scoring_func=args.scoring_func,
        routed_scaling_factor=args.routed_scaling_factor, rope_theta=args.rope_theta,
        layer_types=[kinds[args.layer_kind(i)] for i in range(n)],
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": hca[0] if hca else 128},
        compress_rope_theta=args.compress_rope_theta, hc_mult=args.hc_mult,
        hc_sinkhorn_iters=args.hc_sinkhorn_iters, hc_eps=args.hc_eps,
        mlp_layer_types=["hash_moe"] * args.num_hash_layers + ["moe"] * (n - args.num_hash_layers),
        swiglu_limit=args.swiglu_limit, sliding_window=args.sliding_window, o_groups=args.o_groups,
        o_lora_rank=args.o_lora_rank, index_n_heads=args.index_n_heads, index_head_dim=args.index_head_dim,
        index_topk=args.index_topk, num_nextn_predict_layers=0, rms_norm_eps=args.rms_norm_eps,
        partial_rotary_factor=args.qk_rope_head_dim / args.head_dim,
        rope_parameters=dict(args.rope_scaling or {}, rope_type="yarn") if args.rope_scaling else None,
        max_position_embeddings=args.max_position_embeddings,
    )
    assert len(set(hca)) <= 1, "transformers supports one HCA ratio per model"
    cfg._attn_implementation = "eager"
    return cfg


def transformers_twin(model: DeepseekV4Model):
    """transformers' model holding ``model``'s backbone weights (fp32, eval)."""
    from transformers import DeepseekV4ForCausalLM

    hf = DeepseekV4ForCausalLM(transformers_config(model.args)).float().eval()
    ours = {k: v for k, v in model.state_dict().items() if not k.endswith("expert_load")}
    mapped = DeepseekV4StateDictAdapter(model.args).to_transformers(ours)
    missing, unexpected = hf.load_state_dict(mapped, strict=False)
    missing = [k for k in missing if "rotary_emb" not in k]
    assert not missing and not unexpected, (missing, unexpected)
    return hf


def random_model(args: DeepseekV4ModelArgs, seed: int = 0) -> DeepseekV4Model:
    """Our model with random weights, including the zero-initialised tensors (so every path is exercised)."""
    torch.manual_seed(seed)
    model = DeepseekV4Model(args)
    model.init_weights(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("attn_sink", "ape", "base")):
                p.normal_(0, 0.5)
            elif name.endswith(("norm.weight", "scale")):
                p.uniform_(0.5, 1.5)
            elif name.endswith(("experts.w1", "experts.w2", "experts.w3", "shared_experts.w1.weight")):
                p.normal_(0, 0.1)
        for name, b in model.named_buffers():
            if name.endswith("gate.bias"):
                b.normal_(0, 0.1)
    return model.float()


def first_batch_loss(model: DeepseekV4Model, seq_len: int, batch_size: int) -> float:
    """The main loss of ``model`` (MTP weight 0.3, as the trainer's default) on a run's first global batch of
    the embedded corpus, computed in this process: what a training run's step 1 must log."""
    from titan_dsv4.components.dataloader import build_dataloader
    from titan_dsv4.components.loss import MTPLoss, build_targets
    from titan_dsv4.components.tokenizer import Tokenizer

    model.train().set_mtp_loss_scale(0.3)
    batch = next(build_dataloader("pydocs", None, Tokenizer(), seq_len, batch_size, 0, 1))
    targets = build_targets(batch.labels, batch.positions, model.args.num_nextn_predict_layers)
    loss_fn = MTPLoss()
    with torch.no_grad():
        loss_fn(model(batch.input_ids, batch.positions, targets=targets), targets)
    parts = loss_fn.take_parts()
    return (parts[0] / parts[1]).item()
