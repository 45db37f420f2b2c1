"""LoRA fine-tuning: the adapted model against the plain model holding the merged weights, only the adapters
training, the released checkpoint loading under adapters, exports and checkpoint conversion merging them, and
the planner counting state for the adapters alone."""

import dataclasses
import json

import pytest
import torch

import titan_dsv4
from hf_reference import first_batch_loss, random_model
from launch import run_training
from titan_dsv4.components.dataloader import build_dataloader
from titan_dsv4.components.hf_checkpoint import CheckpointError, checkpoint_tensors
from titan_dsv4.components.loss import MTPLoss, build_targets
from titan_dsv4.components.tokenizer import Tokenizer
from titan_dsv4.convert import main as convert
from titan_dsv4.models.deepseek_v4 import FLAVORS, DeepseekV4Model
from titan_dsv4.models.deepseek_v4.lora import LORA_TARGETS, is_adapter

TARGETS = list(LORA_TARGETS)  # every kind of target, MTP's projections included


def _objective_and_grads(model, batch):
    model.train().set_mtp_loss_scale(0.3)
    targets = build_targets(batch.labels, batch.positions, model.args.num_nextn_predict_layers)
    loss = MTPLoss()(model(batch.input_ids, batch.positions, targets=targets), targets)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _adapted_weights(model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Weight name -> its adapter (A, B): ``x.lora_a`` adapts ``x.weight``, a stacked expert weight's
    ``experts.w1_lora_a`` adapts ``experts.w1``."""
    params = dict(model.named_parameters())
    weight = {n: n[: -len("lora_a")] + "weight" if n.endswith(".lora_a") else n[: -len("_lora_a")] for n in params}
    return {weight[n]: (p, params[n[:-1] + "b"]) for n, p in params.items() if n.endswith("lora_a")}


@pytest.mark.parametrize("qat", ["none", "fp4"])
def test_adapters_equal_the_merged_weights_and_only_they_train(qat):
    """Projections and routed experts (one adapter per expert) against the plain model holding ``W + s B A``.
    Under quantisation-aware training the experts' adapters are merged before the rounding: the adapted model
    computes the merged model's FP4 export, and the adapters' gradients follow from its straight-through one."""
    base = random_model(FLAVORS["debugmodel"], seed=2)
    adapted = DeepseekV4Model(dataclasses.replace(base.args, lora_rank=8, lora_alpha=16.0, lora_targets=TARGETS))
    adapted.init_weights(0)
    missing, unexpected = adapted.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and missing and all(is_adapter(k) for k in missing)
    assert len(missing) == 2 * (5 * 10 + 2)  # 10 targets in each of 4 blocks + MTP, and MTP's e_proj and h_proj
    batch = next(build_dataloader("pydocs", None, Tokenizer(), 64, 2, 0, 1))
    with torch.no_grad():  # B starts at zero: the adapted model is the base model
        for m in (base, adapted):
            m.set_mtp_loss_scale(0.3)
        assert first_batch_loss(adapted, 64, 2) == first_batch_loss(base, 64, 2)
        for _, b in _adapted_weights(adapted).values():
            b.normal_(0, 0.05)  # a trained adapter
    merged = random_model(FLAVORS["debugmodel"], seed=2)
    with torch.no_grad():  # W + (alpha / r) B A, written out here (one product per expert for stacked weights)
        for name, (a, b) in _adapted_weights(adapted).items():
            merged.get_parameter(name).add_(2.0 * b @ a)
    for name, p in adapted.named_parameters():  # as the trainer freezes them
        p.requires_grad_(is_adapter(name))
    for model in (adapted, merged):
        model.set_expert_qat(qat)
    loss, grads = _objective_and_grads(adapted, batch)
    merged_loss, merged_grads = _objective_and_grads(merged, batch)
    torch.testing.assert_close(loss, merged_loss, rtol=1e-5, atol=0)
    assert grads and all(is_adapter(n) for n in grads)
    assert any(".experts.w" in n for n in grads)
    for name, (a, b) in _adapted_weights(adapted).items():  # dL/dB = s (dL/dW) Aᵀ and dL/dA = s Bᵀ (dL/dW)
        g = merged_grads[name]
        torch.testing.assert_close(b.grad, 2.0 * g @ a.mT, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(a.grad, 2.0 * b.mT @ g, rtol=1e-4, atol=1e-7)


def test_fp4_stored_experts_compute_as_their_dense_twin():
    """``lora.expert_storage = "fp4"``: the routed experts kept as the released FP4 bytes and scales (~1/7.5 of
    fp32) compute, with and without quantisation-aware training, exactly as a dense model holding their
    dequantised values, adapters (on every target but the experts' w3: a stored FP4 matrix without adapter is
    not rounded again) and gradients alike."""
    from titan_dsv4.components.quantization import dequantize_fp4

    targets = [t for t in TARGETS if t != "ffn.experts.w3"]
    args = dataclasses.replace(FLAVORS["debugmodel"], lora_rank=8, lora_targets=targets)
    stored = DeepseekV4Model(dataclasses.replace(args, expert_storage="fp4"))
    stored.init_weights(0)
    dense = DeepseekV4Model(args)
    dense.init_weights(0)
    state = stored.state_dict()
    experts = [n for n in state if n.endswith(("experts.w1", "experts.w2", "experts.w3"))]
    assert len(experts) == 15 and all(state[n].dtype == torch.uint8 for n in experts)
    packed_bytes = sum(state[n].numel() + state[f"{n}_scale"].numel() for n in experts)
    dense_bytes = sum(dense.get_parameter(n).numel() * 4 for n in experts)
    assert packed_bytes / dense_bytes == (1 / 2 + 1 / 32) / 4  # 4.25 bits per weight
    with torch.no_grad():
        for name in experts:
            dense.get_parameter(name).copy_(dequantize_fp4(state[name], state[f"{name}_scale"]))
        for model in (stored, dense):
            for name, p in model.named_parameters():
                if name.endswith("lora_b"):  # trained adapters
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.05)
                p.requires_grad_(is_adapter(name))
    batch = next(build_dataloader("pydocs", None, Tokenizer(), 64, 2, 0, 1))
    for qat in ("none", "fp4"):
        results = []
        for model in (stored, dense):
            model.zero_grad()
            model.set_expert_qat(qat)
            results.append(_objective_and_grads(model, batch))
        (loss, grads), (dense_loss, dense_grads) = results
        assert torch.equal(loss, dense_loss), qat
        assert grads.keys() == dense_grads.keys() and any(".experts.w" in n for n in grads)
        for name, grad in grads.items():
            assert torch.equal(grad, dense_grads[name]), (qat, name)


def test_a_model_only_load_reencodes_experts_stored_the_other_way(tmp_path):
    """``load_model_only`` from a checkpoint whose experts are FP4 bytes into a dense model gives their
    dequantised values, and from that dense checkpoint into an FP4-stored model the same values back
    (dequantised FP4 values are fixed points of the rounding; a group none of whose codes reaches 4 comes back
    with half the scale and twice the codes); every other tensor is copied as stored."""
    import torch.distributed.checkpoint as dcp

    from titan_dsv4.components.checkpoint import load_model_only, model_state
    from titan_dsv4.components.quantization import dequantize_fp4

    args = dataclasses.replace(FLAVORS["debugmodel"], lora_rank=8, lora_targets=["ffn.experts.w1"])
    stored = DeepseekV4Model(dataclasses.replace(args, expert_storage="fp4"))
    stored.init_weights(1)
    dcp.save(model_state([stored]), checkpoint_id=str(tmp_path / "fp4"), no_dist=True)
    dense = DeepseekV4Model(args)
    load_model_only([dense], tmp_path / "fp4")
    packed, unpacked = model_state([stored]), model_state([dense])
    experts = [n for n in unpacked if n.endswith(("experts.w1", "experts.w2", "experts.w3"))]
    assert len(experts) == 15
    for name, tensor in unpacked.items():
        want = dequantize_fp4(packed[name], packed[f"{name}_scale"]) if name in experts else packed[name]
        assert torch.equal(tensor, want), name
    dcp.save(unpacked, checkpoint_id=str(tmp_path / "dense"), no_dist=True)
    again = DeepseekV4Model(dataclasses.replace(args, expert_storage="fp4"))
    load_model_only([again], tmp_path / "dense")
    repacked = model_state([again])
    for name, tensor in packed.items():
        if name in experts:
            want = dequantize_fp4(tensor, packed[f"{name}_scale"])
            assert torch.equal(dequantize_fp4(repacked[name], repacked[f"{name}_scale"]), want), name
        elif not name.endswith("_scale"):
            assert torch.equal(repacked[name], tensor), name
    unpacked["layers.0.ffn.experts.w2"] = torch.zeros(8, 64, 32)  # experts of another shape: named, not loaded
    dcp.save(unpacked, checkpoint_id=str(tmp_path / "other"), no_dist=True)
    with pytest.raises(CheckpointError, match=r"'layers.0.ffn.experts.w2' holds experts of shape \[8, 64, 32\]"):
        load_model_only([again], tmp_path / "other")


RUN = ("--training.steps", "2", "--training.seq_len", "64", "--training.local_batch_size", "2",
       "--lora.rank", "8", "--lora.target_modules", ",".join(TARGETS), "--checkpoint.enable",
       "--checkpoint.last_save_in_hf", "--checkpoint.export_dtype", "float32")


@pytest.mark.slow
def test_pipelined_lora_run_trains_only_adapters_and_exports_them_merged(tmp_path):
    source = tmp_path / "source"
    titan_dsv4.save_pretrained(random_model(FLAVORS["debugmodel"], seed=7), source, dtype=torch.float32)
    load = ("--checkpoint.initial_load_path", str(source), "--checkpoint.initial_load_in_hf")
    records = run_training(tmp_path / "run", *RUN, *load, "--parallelism.pipeline_parallel_degree", "2",
                           "--parallelism.pipeline_parallel_microbatch_size", "1", nproc=2)
    # step 1 is the released model's loss (the adapters start as zero updates)
    released_model = titan_dsv4.from_pretrained(source, dtype=torch.float32)
    assert records[0]["loss"] == pytest.approx(first_batch_loss(released_model, 64, 2), rel=1e-5)
    assert records[1]["loss"] != pytest.approx(records[0]["loss"], rel=1e-4)  # the adapters did train

    folder = tmp_path / "run" / "checkpoint"
    config = json.loads((folder / "step-2" / "config.json").read_text())
    assert (config["lora_rank"], config["lora_alpha"], config["lora_targets"]) == (8, 16.0, TARGETS)
    exported = titan_dsv4.from_pretrained(folder / "step-2-hf", dtype=torch.float32)
    assert not exported.args.lora_rank
    assert "lora_rank" not in json.loads((folder / "step-2-hf" / "config.json").read_text())
    assert convert(["dcp-to-hf", str(folder / "step-2"), str(tmp_path / "converted"), "--dtype", "float32"]) == 0
    converted = checkpoint_tensors(titan_dsv4.from_pretrained(tmp_path / "converted", dtype=torch.float32))
    released, merged = checkpoint_tensors(released_model), checkpoint_tensors(exported)
    assert merged.keys() == released.keys() == converted.keys()
    blocks = [f"layers.{i}" for i in range(4)] + ["mtp.0"]
    adapted = [f"{block}.{target}" + ("" if target.startswith("ffn.experts.") else ".weight")
               for block in blocks for target in TARGETS if block == "mtp.0" or target not in ("e_proj", "h_proj")]
    for name in merged:
        assert torch.equal(converted[name], merged[name]), name  # the checkpoint merges as the export did
        if name in adapted:
            assert not torch.equal(merged[name], released[name]), name  # W + s B A moved
        elif not name.endswith(".bias"):  # frozen (the expert-balancing biases are buffers and keep moving)
            assert torch.equal(merged[name], released[name]), name


@pytest.mark.slow
def test_fp4_stored_expert_parallel_run_equals_the_dense_run_and_exports_it(tmp_path):
    """From a released-format FP4 checkpoint, EP=2 with adapters on the experts and FP4 quantisation-aware
    training: storing the frozen experts as FP4 bytes trains exactly as the dense run (same losses, same
    export), also when started from the checkpoint converted to a dense DCP (each rank re-encoding its own
    experts), and its training checkpoint (FP4 bytes and adapters) converts to that export."""
    source = tmp_path / "source"
    titan_dsv4.save_pretrained(random_model(FLAVORS["debugmodel"], seed=3), source, quantize="fp4")
    assert convert(["hf-to-dcp", str(source), str(tmp_path / "source-dcp"), "--dtype", "float32"]) == 0
    run = (*RUN, "--parallelism.expert_parallel_degree", "2", "--model.expert_qat", "fp4")
    from_hf = ("--checkpoint.initial_load_path", str(source), "--checkpoint.initial_load_in_hf")
    dense = run_training(tmp_path / "dense", *run, *from_hf, nproc=2)
    stored = run_training(tmp_path / "fp4", *run, *from_hf, "--lora.expert_storage", "fp4", nproc=2)
    from_dcp = run_training(tmp_path / "fp4-dcp", *run, "--checkpoint.initial_load_path", str(tmp_path / "source-dcp"),
                            "--lora.expert_storage", "fp4", nproc=2)
    assert [r["loss"] for r in stored] == [r["loss"] for r in dense] == [r["loss"] for r in from_dcp]
    assert stored[1]["loss"] != stored[0]["loss"]
    checkpoint = tmp_path / "fp4" / "checkpoint" / "step-2"
    assert json.loads((checkpoint / "config.json").read_text())["expert_storage"] == "fp4"
    assert convert(["dcp-to-hf", str(checkpoint), str(tmp_path / "converted"), "--dtype", "float32"]) == 0
    folders = (tmp_path / "dense" / "checkpoint" / "step-2-hf", tmp_path / "fp4" / "checkpoint" / "step-2-hf",
               tmp_path / "converted")
    exports = [checkpoint_tensors(titan_dsv4.from_pretrained(f, dtype=torch.float32)) for f in folders]
    assert "expert_storage" not in json.loads((folders[1] / "config.json").read_text())
    for name, tensor in exports[0].items():
        assert torch.equal(exports[1][name], tensor) and torch.equal(exports[2][name], tensor), name


def test_lora_trains_the_adapters_alone_in_the_plan():
    from titan_dsv4.config import load_config
    from titan_dsv4.plan import plan_memory

    argv = ["--job.config_file", "train_configs/debug_model.toml", "--parallelism.pipeline_parallel_degree", "1",
            "--lora.rank", "4"]
    plan = plan_memory(load_config(argv), 1, device="cpu")[0]
    # 4 default targets (wq_a 64->32, wq_b 32->128, wkv 64->32, wo_b 32->64) in 5 blocks: r x (in + out) each
    adapters = 5 * 4 * ((64 + 32) + (32 + 128) + (64 + 32) + (32 + 64))
    assert plan.grads == adapters * 4 and plan.optimizer == 2 * adapters * 4
    # the routed experts' w2 (64 -> 64, 8 experts) in 5 blocks, rank 8, split by expert over 2 ranks (EP = 2)
    argv += ["--lora.rank", "8", "--lora.target_modules", "ffn.experts.w2", "--parallelism.expert_parallel_degree", "2"]
    plan = plan_memory(load_config(argv), 2, device="cpu")[0]
    adapters = 5 * 8 // 2 * 8 * (64 + 64)
    assert plan.grads == adapters * 4 and plan.optimizer == 2 * adapters * 4
    # the frozen experts stored as FP4: 4.25 bits instead of 32 per weight (3 matrices 64 x 64, 4 per rank)
    stored = plan_memory(load_config([*argv, "--lora.expert_storage", "fp4"]), 2, device="cpu")[0]
    assert plan.params - stored.params == 5 * 3 * 4 * 64 * 64 * (4 - 17 / 32)
    assert stored.grads == plan.grads and stored.optimizer == plan.optimizer


def test_a_checkpoint_with_adapters_does_not_lose_them_silently(tmp_path):
    from titan_dsv4.config import ConfigError, load_config
    from titan_dsv4.config.validate import validate

    args = dataclasses.replace(FLAVORS["debugmodel"], lora_rank=4, lora_targets=["attn.wq_a"])
    (tmp_path / ".metadata").write_bytes(b"")  # validate checks the DCP folder's presence, not its contents
    (tmp_path / "config.json").write_text(json.dumps(args.to_hf_config(adapters=True)))
    argv = ["--checkpoint.initial_load_path", str(tmp_path)]
    assert validate(load_config([*argv, "--lora.rank", "4"]), 1).model_args.lora_rank == 4
    with pytest.raises(ConfigError, match=r"holds LoRA adapters of rank 4 \(its config.json\): set lora.rank = 4"):
        validate(load_config(argv), 1)


@pytest.mark.parametrize("storage", ["dense", "fp4"])
def test_a_lora_run_resumes_exactly(tmp_path, storage):
    """Frozen weights have no optimizer state; the adapters' moments come back: steps 3 and 4 after resuming
    from step 2 equal the uninterrupted run's (step 4's loss follows step 3's update, which uses the moments);
    also with the frozen experts stored as FP4 bytes and adapters on them."""
    import shutil

    run = ("--training.steps", "4", "--training.seq_len", "64", "--training.local_batch_size", "2",
           "--lora.rank", "8", "--lora.target_modules", "attn.wq_a,ffn.experts.w2", "--lora.expert_storage", storage,
           "--checkpoint.enable", "--checkpoint.interval", "1", "--metrics.log_freq", "1")
    whole = run_training(tmp_path / "whole", *run)
    (tmp_path / "resumed" / "checkpoint").mkdir(parents=True)
    shutil.copytree(tmp_path / "whole" / "checkpoint" / "step-2", tmp_path / "resumed" / "checkpoint" / "step-2")
    resumed = run_training(tmp_path / "resumed", *run)
    assert [r["step"] for r in resumed] == [3, 4]
    assert [(r["loss"], r["grad_norm"]) for r in resumed] == [(r["loss"], r["grad_norm"]) for r in whole[2:]]
    assert whole[3]["loss"] != whole[2]["loss"]
