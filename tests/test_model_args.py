"""Model args: both config.json dialects, validation, counting, meta build, deterministic init, attention paths."""

import dataclasses
import json

import pytest
import torch

from hf_reference import random_model, transformers_config
from titan_dsv4.distributed.pipeline import prune_to_stage
from titan_dsv4.models.deepseek_v4 import FLAVORS, DeepseekV4Model, DeepseekV4ModelArgs

RELEASED_FLASH_CONFIG = {  # DeepSeek-V4-Flash config.json (dsv4-spec.md §1.1)
    "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4", "vocab_size": 129280,
    "hidden_size": 4096, "num_hidden_layers": 43, "num_attention_heads": 64, "num_key_value_heads": 1,
    "head_dim": 512, "qk_rope_head_dim": 64, "q_lora_rank": 1024, "o_lora_rank": 1024, "o_groups": 8,
    "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 6, "moe_intermediate_size": 2048,
    "routed_scaling_factor": 1.5, "norm_topk_prob": True, "scoring_func": "sqrtsoftplus",
    "topk_method": "noaux_tc", "num_hash_layers": 3, "swiglu_limit": 10.0, "hidden_act": "silu",
    "sliding_window": 128, "compress_ratios": [0, 0] + [4, 128] * 20 + [4, 0], "compress_rope_theta": 160000,
    "rope_theta": 10000, "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                                          "beta_fast": 32, "beta_slow": 1},
    "max_position_embeddings": 1048576, "index_n_heads": 64, "index_head_dim": 128, "index_topk": 512,
    "hc_mult": 4, "hc_sinkhorn_iters": 20, "hc_eps": 1e-6, "rms_norm_eps": 1e-6, "num_nextn_predict_layers": 1,
    "expert_dtype": "fp4", "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "scale_fmt": "ue8m0", "weight_block_size": [128, 128]},
}


def test_released_config_gives_flash(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(RELEASED_FLASH_CONFIG))
    assert DeepseekV4ModelArgs.from_hf_config(path) == FLAVORS["flash"]


def test_transformers_config_form():
    args = FLAVORS["debugmodel"].with_mtp_layers(0)
    hf = transformers_config(args).to_dict()
    assert "compress_ratios" not in hf and "layer_types" in hf  # really the transformers dialect
    back = DeepseekV4ModelArgs.from_hf_config({**hf, "num_nextn_predict_layers": 0})
    for f in ("compress_ratios", "num_hash_layers", "qk_rope_head_dim", "rope_theta", "compress_rope_theta",
              "hidden_size", "index_topk", "hc_mult", "sliding_window"):
        assert getattr(back, f) == getattr(args, f), f
    assert back.rope_scaling["factor"] == args.rope_scaling["factor"]


@pytest.mark.parametrize("flavor", ["debugmodel", "flash", "pro"])
def test_written_config_round_trips(flavor):
    args = FLAVORS[flavor]
    written = json.loads(json.dumps(args.to_hf_config()))
    assert written["compress_ratios"] == args.compress_ratios and written["model_type"] == "deepseek_v4"
    assert DeepseekV4ModelArgs.from_hf_config(written) == args


BAD = [
    (dict(compress_ratios=[0, 4]), "compress_ratios"),
    (dict(qk_rope_head_dim=33), "qk_rope_head_dim"),
    (dict(qk_rope_head_dim=64), "qk_rope_head_dim"),  # > head_dim 32
    (dict(o_groups=3), "o_groups"),
    (dict(num_experts_per_tok=9), "num_experts_per_tok"),
    (dict(scoring_func="relu"), "scoring_func"),
    (dict(num_key_value_heads=2), "num_key_value_heads"),
    (dict(num_hash_layers=9), "num_hash_layers"),
    (dict(rope_scaling={"type": "linear", "factor": 2}), "rope_scaling"),
    (dict(hidden_size=0), "hidden_size"),
]


@pytest.mark.parametrize("change,field", BAD, ids=[b[1] + str(i) for i, b in enumerate(BAD)])
def test_bad_config_names_the_field(change, field):
    with pytest.raises(ValueError, match=f"`{field}`") as info:
        dataclasses.replace(FLAVORS["debugmodel"], **change)
    assert "invalid" in str(info.value)


@pytest.mark.parametrize("flavor", ["debugmodel", "debugmodel_mtp2", "flash", "pro"])
def test_parameter_count_matches_built_model(flavor):
    args = FLAVORS[flavor]
    with torch.device("meta"):
        model = DeepseekV4Model(args)
    assert all(p.is_meta for p in model.parameters())  # nothing allocated
    built = sum(p.numel() for p in model.parameters())
    assert args.num_params() == built
    no_mtp = built - sum(p.numel() for p in model.mtp.parameters())
    assert args.num_params(include_mtp=False) == no_mtp


def test_flash_size_and_flops():
    flash = FLAVORS["flash"]
    assert round(flash.num_params(include_mtp=False) / 1e9, 1) == 284.3
    assert 13.0e9 < flash.num_active_params(include_mtp=False) < 13.9e9  # "13B active"
    flops = flash.training_flops_per_token(4096)
    assert flops > 6 * flash.num_active_params()
    assert flash.training_flops_per_token(4096, include_mtp=False) < flops


def test_training_flops_count_what_each_query_sees():
    """Against a count by hand, position by position: raw keys in the window, compressed entries complete by
    then (CSA: at most top-k), the indexer scoring every complete entry (with backward only if trained)."""
    args = dataclasses.replace(FLAVORS["debugmodel"], num_hidden_layers=3, compress_ratios=[0, 4, 16, 0],
                               sliding_window=8, index_topk=5)
    seq = 203  # not a multiple of either ratio; CSA reaches its top-k cap at position 23
    h, d, ih, idim = args.num_attention_heads, args.head_dim, args.index_n_heads, args.index_head_dim
    for trained in (True, False):
        flops = 0.0
        for layer, ratio in enumerate(args.compress_ratios):
            kind = args.layer_kind(layer)
            for t in range(seq):
                keys = min(args.sliding_window, t + 1)
                complete = sum(1 for j in range(seq) if j * ratio + ratio - 1 <= t) if ratio else 0
                keys += min(complete, args.index_topk) if kind == "csa" else complete
                flops += 6 * 2 * h * d * keys  # scores and values, forward and backward
                if kind == "csa":
                    flops += (6 if trained else 2) * ih * idim * complete
        flops /= seq
        indexer_weights = (args.q_lora_rank * ih * idim + ih * args.hidden_size + 4 * idim * args.hidden_size)
        flops += 6.0 * args.num_active_params() - (0 if trained else 4 * indexer_weights)
        assert args.training_flops_per_token(seq, indexer_trained=trained) == pytest.approx(flops, rel=1e-12)


def test_init_is_independent_of_the_split():
    args = FLAVORS["debugmodel"]
    full = DeepseekV4Model(args)
    full.init_weights(seed=7)
    with torch.device("meta"):
        meta = DeepseekV4Model(args)
    for fqns in (["embed", "layers.0", "layers.1"], ["layers.2", "layers.3", "hc_head", "norm", "head", "mtp.0"]):
        part = prune_to_stage(meta, fqns).to_empty(device="cpu")
        part.init_weights(seed=7)
        full_state = full.state_dict()
        for name, tensor in part.state_dict().items():
            assert torch.equal(tensor, full_state[name]), name
    other = DeepseekV4Model(args)
    other.init_weights(seed=8)
    assert not torch.equal(other.layers["1"].attn.wq_a.weight, full.layers["1"].attn.wq_a.weight)
    tid2eid = full.layers["0"].ffn.gate.tid2eid
    assert all(len(set(row.tolist())) == args.num_experts_per_tok for row in tid2eid)


def test_blocked_attention_equals_dense():
    """The query-blocked path (GPU / long sequences) is the dense reference, forward and backward."""
    model = random_model(FLAVORS["debugmodel"]).train()
    ids = torch.randint(0, 2048, (2, 150))
    positions = torch.cat([torch.arange(70), torch.arange(80)]).expand(2, 150)
    results = []
    for block in (None, 32):
        model.set_attention_query_block(block)
        model.zero_grad()
        out = model(ids, positions)
        sum(o.pow(2).mean() for o in out).backward()
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (dense, dense_grads), (blocked, blocked_grads) = results
    for a, b in zip(dense, blocked):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert dense_grads.keys() == blocked_grads.keys()
    for name in dense_grads:
        torch.testing.assert_close(dense_grads[name], blocked_grads[name], rtol=1e-4, atol=1e-6)


def test_indexer_top_k_breaks_exact_ties_by_position():
    from titan_dsv4.models.deepseek_v4.attention import topk_earliest_first

    scores = torch.tensor([[0.0, 1.0, -0.0, -2.0, 1.0, float("-inf"), 0.5, 0.0, -1e-30]])
    assert topk_earliest_first(scores, 6).tolist() == [[1, 4, 6, 0, 2, 7]]  # -0.0 ties with +0.0
    wide = torch.randn(4, 300)
    assert torch.equal(topk_earliest_first(wide, 20).sort().values, wide.topk(20).indices.sort().values)


def test_init_leaves_what_a_checkpoint_load_overwrites():
    """With a checkpoint load to follow (HF or DCP), init sets only what no checkpoint holds, the LoRA
    adapters (as a full init does) and the running statistics (zero); every other tensor is left for the
    load, untouched here."""
    args = dataclasses.replace(FLAVORS["debugmodel"], lora_rank=8, lora_targets=["attn.wq_a", "ffn.experts.w1"])
    reference = DeepseekV4Model(args)
    reference.init_weights(seed=7)
    expected = dict([*reference.named_parameters(), *reference.named_buffers()])
    with torch.device("meta"):
        model = DeepseekV4Model(args).to_empty(device="cpu")
    tensors = dict([*model.named_parameters(), *model.named_buffers()])
    with torch.no_grad():
        for tensor in tensors.values():
            tensor.fill_(float("nan") if tensor.is_floating_point() else 7)
    model.init_weights(seed=7, checkpoint_follows=True)
    set_by_init = [n for n in tensors if n.endswith(("lora_a", "lora_b", "expert_load", "kl_sum"))]
    assert any(n.endswith("experts.w1_lora_a") for n in set_by_init) and any("kl_sum" in n for n in set_by_init)
    for name, tensor in tensors.items():
        if name in set_by_init:
            assert torch.equal(tensor, expected[name]), name
        else:
            assert (tensor.isnan() if tensor.is_floating_point() else tensor == 7).all(), name
