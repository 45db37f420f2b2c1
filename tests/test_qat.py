"""Quantisation-aware training of the routed experts and the quantised exports it is for: the rounding against
a brute-force search, the released formats as fixed points, the model's forward and straight-through
gradients against a model holding the rounded weights, and a trainer run under expert parallelism whose
FP4 export holds exactly the weights its forward used. The attention's activation rounding (the released
inference code's FP8 KV, Hadamard + FP4 indexer): against brute-force searches, and the model against
transformers' with that rounding hooked in."""

import dataclasses
import json
import math

import pytest
import torch
from safetensors import safe_open

import titan_dsv4
from hf_reference import first_batch_loss, random_model, transformers_twin
from launch import run_training
from titan_dsv4.components.dataloader import build_dataloader
from titan_dsv4.components.hf_checkpoint import checkpoint_tensors
from titan_dsv4.components.loss import MTPLoss, build_targets
from titan_dsv4.components.quantization import (dequantize_fp4, dequantize_fp8, fake_quantize_activation_fp4,
                                                fake_quantize_activation_fp8, fake_quantize_fp4, fake_quantize_fp8,
                                                quantize_fp4)
from titan_dsv4.components.tokenizer import Tokenizer
from titan_dsv4.models.deepseek_v4 import FLAVORS
from titan_dsv4.models.deepseek_v4.qat import hadamard
from titan_dsv4.models.deepseek_v4.state_dict_adapter import DeepseekV4StateDictAdapter

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]  # code k's magnitude (bit 3 is the sign)


def brute_force_group(row: list[float], grid: list[float], smallest_exponent: int, floor: float = 0.0
                      ) -> list[float]:
    """One scale group, written out: the smallest power of two (at least 2^smallest_exponent) that brings
    max(largest magnitude, floor) to the grid's largest value or below, then the nearest grid magnitude, a tie
    going to the even code."""
    amax = max(max(abs(v) for v in row), floor)
    exponent = smallest_exponent
    while amax / 2.0**exponent > grid[-1]:
        exponent += 1
    scale = 2.0**exponent
    out = []
    for v in row:
        m = abs(v) / scale
        code = min(range(len(grid)), key=lambda k: (abs(grid[k] - m), k % 2))  # nearest; on a tie the even code
        out.append(math.copysign(grid[code] * scale, v))
    return out


def brute_force_fp4(row: list[float], smallest_exponent: int = -127) -> list[float]:
    """One 32-value group of E2M1 values with a power-of-two scale."""
    return brute_force_group(row, E2M1, smallest_exponent)


def test_fp4_rounding_matches_a_brute_force_search():
    torch.manual_seed(0)
    weight = torch.randn(6, 64) * torch.tensor([1e-3, 1.0, 30.0, 1.0, 1.0, 1.0])[:, None]
    # every midpoint between grid values (and 6, which makes the scale 1): ties both ways, either sign
    midpoints = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0])
    weight[3, :16] = torch.cat([midpoints, -midpoints])
    weight[4, :32] = torch.tensor([0.125, 0.375, 0.625, 0.875, 1.25, 1.75, 2.5, 3.0] * 4)  # max 3: scale 1/2
    weight[5, :32] = 0.0  # an all-zero group
    expected = torch.tensor([sum((brute_force_fp4(row[i:i + 32]) for i in range(0, 64, 32)), [])
                             for row in weight.tolist()])
    got = fake_quantize_fp4(weight)
    assert torch.equal(got, expected)
    assert torch.equal(torch.signbit(got), torch.signbit(expected))  # -0 for a negative value rounded to 0
    assert torch.equal(dequantize_fp4(*quantize_fp4(weight)), expected)  # the packed export holds the same


E4M3 = [v for v in torch.arange(128, dtype=torch.uint8).view(torch.float8_e4m3fn).float().tolist()
        if not math.isnan(v)]  # code k's magnitude, from the format's bytes (bit 7 is the sign)


def brute_force_fp8_activation(row: list[float]) -> list[float]:
    """One 64-value group as the released ``act_quant`` rounds it: E4M3 values with the power-of-two scale that
    brings max(largest magnitude, 1e-4) to 448 or below."""
    return brute_force_group(row, E4M3, smallest_exponent=-140, floor=1e-4)


def test_fp8_activation_rounding_matches_a_brute_force_search():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 128) * torch.tensor([1e-6, 1e-2, 1.0, 30.0, 1e5])[None, :, None]
    x[0, 2, :64] = 0.0  # an all-zero group: the 1e-4 floor sets its scale
    # with a maximum of 448 the scale is 1: every midpoint between neighbouring grid values ties, either sign
    grid = torch.tensor(E4M3[:-1])
    ties = (grid[:-1] + grid[1:]) / 2
    x[1, 2, :63] = ties[torch.randperm(len(ties))[:63]] * torch.where(torch.rand(63) < 0.5, -1.0, 1.0)
    x[1, 2, 63] = 448.0
    # a maximum one fp32 step above 448 * 2^20: log2 of its ratio rounds down onto 20, the scale must be 2^21
    x[1, 3, :64] = torch.randn(64) * 1e5
    x[1, 3, 5] = torch.nextafter(torch.tensor(448.0 * 2**20), torch.tensor(math.inf))
    want = torch.tensor([sum((brute_force_fp8_activation(row[i:i + 64]) for i in range(0, 128, 64)), [])
                         for row in x.view(-1, 128).tolist()]).view(x.shape)
    got = fake_quantize_activation_fp8(x, 64)
    assert torch.equal(got, want)
    assert torch.equal(fake_quantize_activation_fp8(x.to(torch.bfloat16), 64), fake_quantize_activation_fp8(
        x.to(torch.bfloat16).float(), 64).to(torch.bfloat16))  # bf16 in, bf16 out, the same values


def test_fp4_activation_rounding_matches_a_brute_force_search():
    torch.manual_seed(1)
    x = torch.randn(3, 4, 64) * torch.tensor([1e-39, 1e-3, 1.0, 40.0])[None, :, None]  # 1e-39: below 6 * 2^-126
    x[0, 1, 40:] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0] * 3)  # ties, with a maximum of 6
    want = torch.tensor([sum((brute_force_fp4(row[i:i + 32], smallest_exponent=-126) for i in range(0, 64, 32)), [])
                         for row in x.view(-1, 64).tolist()]).view(x.shape)
    assert torch.equal(fake_quantize_activation_fp4(x), want)


def test_hadamard_is_sylvesters_normalised_matrix():
    for dim in (1, 2, 32, 128):
        entries = [[(-1) ** bin(i & j).count("1") / math.sqrt(dim) for j in range(dim)] for i in range(dim)]
        assert torch.allclose(hadamard(dim), torch.tensor(entries), rtol=0, atol=1e-7), dim


def _brute_force_rows(x: torch.Tensor, group: int, round_group) -> torch.Tensor:
    rows = x.detach().reshape(-1, x.shape[-1]).tolist()
    out = [sum((round_group(row[i:i + group]) for i in range(0, len(row), group)), []) for row in rows]
    return torch.tensor(out, dtype=x.dtype).view(x.shape)


def _straight_through(x: torch.Tensor, rounded: torch.Tensor) -> torch.Tensor:
    return x + (rounded - x).detach()


def _hook_released_rounding(hf, nope: int) -> None:
    """transformers' model rounding as the released inference code, by hooks and written-out searches: each KV
    (its norm's output: the RoPE that follows leaves the first ``nope`` dims alone) to FP8, and the indexer's
    queries and keys, rotated by the Hadamard matrix of its definition, to FP4."""
    def kv(module, inputs, out):
        rounded = _brute_force_rows(out[..., :nope], 64, brute_force_fp8_activation)
        return _straight_through(out, torch.cat([rounded, out[..., nope:]], dim=-1))

    def indexer(module, inputs):
        q, keys, hidden = inputs
        dim = q.shape[-1]
        rotation = torch.tensor([[(-1) ** bin(i & j).count("1") / math.sqrt(dim) for j in range(dim)]
                                 for i in range(dim)], dtype=torch.float64)

        def fp4(t):
            return _brute_force_rows((t.double() @ rotation).float(), 32,
                                     lambda row: brute_force_fp4(row, smallest_exponent=-126))
        return fp4(q), fp4(keys), hidden

    for name, module in hf.named_modules():
        if name.endswith("kv_norm") and ".indexer." not in name:
            module.register_forward_hook(kv)
        elif type(module).__name__ == "DeepseekV4IndexerScorer":
            module.register_forward_pre_hook(indexer)


def test_attention_rounds_as_the_released_inference_code():
    """Logits and gradients against transformers' model with the rounding hooked in; the indexer keeps 3 of up to
    10 entries, so its rounding decides what CSA attends to."""
    args = dataclasses.replace(FLAVORS["debugmodel"].with_mtp_layers(0), head_dim=80, index_n_heads=16,
                               index_topk=3)  # 64 non-RoPE dims: one FP8 group
    ours = random_model(args, seed=4)
    theirs = transformers_twin(ours)
    ids = torch.randint(0, args.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    weights = torch.randn(2, 40, args.vocab_size, generator=torch.Generator().manual_seed(1))
    plain = ours(ids).detach()
    ours.set_attention_qat(True)
    _hook_released_rounding(theirs, args.head_dim - args.qk_rope_head_dim)
    got, want = ours(ids), theirs(input_ids=ids).logits
    scale = want.abs().max()
    assert (got - want).abs().max() <= 1e-4 * scale
    assert (plain - want).abs().max() > 1e-3 * scale  # the rounding shows
    for attention in ours.attention_modules():  # and the indexer's alone does: it changes what CSA attends to
        if attention.indexer is not None:
            attention.indexer.qat = False
    with torch.no_grad():
        assert (ours(ids) - want).abs().max() > 1e-3 * scale
    ours.set_attention_qat(True)
    (got * weights).sum().backward()
    (want * weights).sum().backward()
    grads = DeepseekV4StateDictAdapter(args).to_transformers(
        {n: p.grad for n, p in ours.named_parameters() if p.grad is not None})
    hf_grads = dict(theirs.named_parameters())
    for name, grad in grads.items():
        other = hf_grads[name].grad
        assert (grad - other).abs().max() <= 1e-4 * other.abs().max(), name
    assert ours.layers["1"].attn.wkv.weight.grad.abs().max() > 0  # the KV's projection learns through the rounding


def test_attention_qat_needs_the_released_group_widths():
    model = random_model(FLAVORS["debugmodel"])
    with pytest.raises(ValueError, match="head_dim - qk_rope_head_dim = 16 must be a multiple of 64"):
        model.set_attention_qat(True)


@pytest.mark.parametrize("fake_quantize", [fake_quantize_fp4, fake_quantize_fp8])
def test_bf16_weights_round_in_bf16_as_in_fp32(fake_quantize):
    """A bf16 model's experts are rounded without an fp32 copy; every step is exact, at any magnitude."""
    torch.manual_seed(0)
    for magnitude in (1e-30, 1e-3, 1.0, 1e3, 1e30):
        weight = (torch.randn(2, 256, 320) * magnitude).to(torch.bfloat16)
        assert torch.equal(fake_quantize(weight).float(), fake_quantize(weight.float())), magnitude


def test_released_formats_are_fixed_points():
    """Weights as the released files hold them (random codes and scales, written here byte by byte) come
    through the forward's rounding unchanged: training from the released checkpoint starts from its model."""
    g = torch.Generator().manual_seed(1)
    packed = torch.randint(0, 256, (3, 16, 32), dtype=torch.uint8, generator=g).view(torch.int8)
    scales = torch.randint(100, 140, (3, 16, 2), dtype=torch.uint8, generator=g)
    fp4 = torch.stack([dequantize_fp4(packed[e], scales[e]) for e in range(3)])
    assert torch.equal(fake_quantize_fp4(fp4), fp4)
    codes = torch.randint(0, 256, (2, 200, 136), dtype=torch.uint8, generator=g)
    codes[(codes & 0x7F) == 0x7F] = 0  # e4m3's NaN
    blocks = torch.randint(110, 135, (2, 2, 2), dtype=torch.uint8, generator=g)
    fp8 = torch.stack([dequantize_fp8(codes[e].view(torch.float8_e4m3fn), blocks[e]) for e in range(2)])
    assert torch.equal(fake_quantize_fp8(fp8), fp8)


def _quantized_twin(model, fake_quantize):
    twin = random_model(model.args)
    twin.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, p in twin.named_parameters():
            if name.endswith(("experts.w1", "experts.w2", "experts.w3")):
                p.copy_(fake_quantize(p))
    return twin


def _loss_and_grads(model, batch):
    targets = build_targets(batch.labels, batch.positions, model.args.num_nextn_predict_layers)
    loss_fn = MTPLoss()
    loss_fn(model(batch.input_ids, batch.positions, targets=targets), targets).backward()
    total, tokens = loss_fn.take_parts()[:2]
    return (total / tokens).item(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("fmt,fake_quantize", [("fp4", fake_quantize_fp4), ("fp8", fake_quantize_fp8)])
def test_forward_sees_the_rounded_experts_and_gradients_pass_straight_through(fmt, fake_quantize):
    model = random_model(FLAVORS["debugmodel"], seed=3).train()
    twin = _quantized_twin(model, fake_quantize).train()  # holds the rounded weights; trains without QAT
    for m in (model, twin):
        m.set_mtp_loss_scale(0.3)
    batch = next(build_dataloader("pydocs", None, Tokenizer(), 64, 2, 0, 1))
    plain_loss, _ = _loss_and_grads(model, batch)
    model.zero_grad()
    model.set_expert_qat(fmt)
    qat_loss, qat_grads = _loss_and_grads(model, batch)
    twin_loss, twin_grads = _loss_and_grads(twin, batch)
    assert qat_loss == twin_loss and qat_loss != plain_loss
    assert qat_grads.keys() == twin_grads.keys()
    for name, grad in qat_grads.items():  # d loss / d w = d loss / d rounded(w): the straight-through estimate
        assert torch.equal(grad, twin_grads[name]), name
    assert any(name.startswith("mtp.") and "experts.w" in name for name in qat_grads)  # MTP's experts too


RUN = ("--training.steps", "1", "--training.seq_len", "128", "--training.local_batch_size", "2",
       "--checkpoint.initial_load_in_hf", "--checkpoint.last_save_in_hf", "--parallelism.expert_parallel_degree", "2",
       "--model.expert_qat", "fp4")


@pytest.mark.slow
def test_expert_parallel_qat_run_exports_the_weights_its_forward_used(tmp_path):
    source = tmp_path / "source"
    titan_dsv4.save_pretrained(random_model(FLAVORS["debugmodel"], seed=5), source, dtype=torch.float32)
    load = ("--checkpoint.initial_load_path", str(source))
    # bf16 export (the default) of what a CPU run computes in fp32: the quantised weights round from fp32
    quantized = run_training(tmp_path / "fp4", *RUN, *load, "--checkpoint.export_quantize", "fp4", nproc=2)
    plain = run_training(tmp_path / "plain", *RUN, *load, "--checkpoint.export_dtype", "float32", nproc=2)

    # step 1's loss: the source weights with the experts rounded, computed here in one process
    model = titan_dsv4.from_pretrained(source, dtype=torch.float32)
    model.set_expert_qat("fp4")
    assert quantized[0]["loss"] == pytest.approx(first_batch_loss(model, 128, 4), rel=1e-5)
    model.set_expert_qat("none")
    assert quantized[0]["loss"] != pytest.approx(first_batch_loss(model, 128, 4), rel=1e-5)  # rounding mattered

    export = tmp_path / "fp4" / "checkpoint" / "step-1-hf"
    config = json.loads((export / "config.json").read_text())
    assert config["expert_dtype"] == "fp4" and config["quantization_config"]["weight_block_size"] == [128, 128]
    files = {}
    for file in export.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            files.update({k: f.get_slice(k).get_dtype() for k in f.keys()})
    assert files["layers.1.ffn.experts.3.w2.weight"] == "I8" and files["layers.1.ffn.experts.3.w2.scale"] == "F8_E8M0"
    assert files["mtp.0.ffn.experts.0.w1.weight"] == "I8"
    assert files["layers.1.attn.wq_a.weight"] == files["layers.1.ffn.shared_experts.w1.weight"] == "F8_E4M3"
    trained = checkpoint_tensors(titan_dsv4.from_pretrained(tmp_path / "plain" / "checkpoint" / "step-1-hf",
                                                            dtype=torch.float32))
    exported = checkpoint_tensors(titan_dsv4.from_pretrained(export, dtype=torch.float32))
    assert plain[0]["loss"] == quantized[0]["loss"]  # the export setting changes nothing before the export
    fp8_matrices = ("attn.wq_a.weight", "attn.wq_b.weight", "attn.wkv.weight", "attn.wo_a.weight",
                    "attn.wo_b.weight", "indexer.wq_b.weight", "shared_experts.w1.weight",
                    "shared_experts.w2.weight", "shared_experts.w3.weight", "e_proj.weight", "h_proj.weight")
    for name, weight in trained.items():
        if name.endswith(("experts.w1", "experts.w2", "experts.w3")):
            expected = fake_quantize_fp4(weight)  # exactly what the run's next forward would use
        elif name.endswith(fp8_matrices):
            expected = fake_quantize_fp8(weight)
        else:  # in bf16, or kept in fp32 as the release keeps the mHC mixes, sinks and biases
            assert torch.equal(exported[name], weight.to(torch.bfloat16).float()) or torch.equal(exported[name], weight)
            continue
        assert torch.equal(exported[name], expected), name
    assert not torch.equal(exported["layers.2.ffn.experts.w1"], trained["layers.2.ffn.experts.w1"])


@pytest.mark.slow
def test_pipeline_parallel_run_rounds_every_stages_attention(tmp_path):
    """The trainer turns the rounding on in every stage's attentions, the MTP block's on the last stage
    included: step 1's loss is the single-process loss of the same weights with it."""
    source = tmp_path / "source"
    args = dataclasses.replace(FLAVORS["debugmodel"], head_dim=80)
    titan_dsv4.save_pretrained(random_model(args, seed=6), source, dtype=torch.float32)
    run = ("--training.steps", "1", "--training.seq_len", "64", "--training.local_batch_size", "4",
           "--checkpoint.initial_load_in_hf", "--checkpoint.initial_load_path", str(source),
           "--parallelism.pipeline_parallel_degree", "2", "--model.attention_qat")
    logged = run_training(tmp_path / "run", *run, nproc=2)[0]
    model = titan_dsv4.from_pretrained(source, dtype=torch.float32).train()
    model.set_mtp_loss_scale(0.3)  # the trainer's default
    batch = next(build_dataloader("pydocs", None, Tokenizer(), 64, 4, 0, 1))
    targets = build_targets(batch.labels, batch.positions, 1)

    def losses(qat: bool) -> list[float]:  # main, MTP depth 1
        model.set_attention_qat(qat)
        loss_fn = MTPLoss()
        with torch.no_grad():
            loss_fn(model(batch.input_ids, batch.positions, targets=targets), targets)
        parts = loss_fn.take_parts()
        return [(parts[0] / parts[1]).item(), (parts[2] / parts[3]).item()]

    main, mtp = losses(True)
    assert logged["loss"] == pytest.approx(main, rel=1e-6) and logged["mtp_losses"][0] == pytest.approx(mtp, rel=1e-6)
    plain_main, plain_mtp = losses(False)  # the rounding moves both by more than that tolerance
    assert abs(plain_main - main) > 5e-6 * main and abs(plain_mtp - mtp) > 5e-6 * mtp


@pytest.mark.parametrize("key", ["model.expert_qat", "checkpoint.export_quantize"])
def test_fp4_needs_expert_widths_in_whole_scale_groups(tmp_path, key):
    from titan_dsv4.config import ConfigError, load_config
    from titan_dsv4.config.validate import validate

    hf_config = FLAVORS["debugmodel"].to_hf_config()
    hf_config["moe_intermediate_size"] = 48  # w2's input width: one and a half groups of 32
    (tmp_path / "config.json").write_text(json.dumps(hf_config))
    argv = ["--checkpoint.initial_load_path", str(tmp_path), "--checkpoint.initial_load_in_hf",
            "--checkpoint.last_save_in_hf"]
    validate(load_config([*argv, f"--{key}", "fp8"]), 1)  # FP8's 128x128 blocks take partial edges
    with pytest.raises(ConfigError, match=rf"`{key}` = 'fp4' needs the experts' input widths \(hidden_size 64, "
                                          r"moe_intermediate_size 48\) to be multiples of 32"):
        validate(load_config([*argv, f"--{key}", "fp4"]), 1)
