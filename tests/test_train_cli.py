"""End-to-end training through the CLI: metrics contract, falling loss, data parallel == single process."""

import math

import pytest

from launch import run_training

KEYS = {"step", "loss", "mtp_losses", "mtp_acceptance", "total_loss", "grad_norm", "lr", "tokens_per_sec",
        "max_memory_mb", "max_reserved_mb", "alloc_retries", "valid_tokens", "step_time_s", "data_loading_s", "mfu",
        "moe_max_violation"}
SMALL = ("--training.local_batch_size", "4", "--training.seq_len", "128")


def test_short_run_writes_metrics_and_learns(tmp_path):
    records = run_training(tmp_path, "--training.local_batch_size", "8", "--training.seq_len", "128",
                           "--training.steps", "25", "--lr_scheduler.warmup_steps", "2", "--optimizer.lr", "5e-3")
    assert [r["step"] for r in records] == list(range(1, 26))
    for r in records:
        assert KEYS <= r.keys()
        assert len(r["mtp_losses"]) == 1 and len(r["mtp_acceptance"]) == 1
        assert math.isclose(r["total_loss"], r["loss"] + 0.3 * r["mtp_losses"][0], rel_tol=0.05)
        assert r["tokens_per_sec"] > 0 and r["max_memory_mb"] > 0 and r["grad_norm"] > 0
        assert 0 < r["data_loading_s"] < r["step_time_s"]
        assert r["max_reserved_mb"] is None and r["alloc_retries"] is None  # CUDA allocator only
        assert list(r["moe_max_violation"]) == ["layers.1", "layers.2", "layers.3", "mtp.0"]  # layer 0 hashes
        assert all(0 < v <= 8 / 2 - 1 for v in r["moe_max_violation"].values())  # 8 experts, top-2
    first = records[0]["loss"]
    last = sum(r["loss"] for r in records[-3:]) / 3
    assert last < first - 1.0, (first, last)


def test_mtp_can_be_disabled(tmp_path):
    records = run_training(tmp_path, *SMALL, "--training.steps", "2", "--mtp.num_layers", "0")
    assert all(r["mtp_losses"] == [] and r["total_loss"] == pytest.approx(r["loss"]) for r in records)


@pytest.mark.slow
def test_two_process_fsdp_and_context_parallel_equal_single_process(tmp_path):
    """FSDP=2 (each rank half the batch) and CP=2 x FSDP (each rank half of every sequence): training and
    validation losses, gradient norms, token counts and expert balance of one process."""
    steps = ("--training.steps", "3", "--training.seq_len", "128", "--validation.enable", "--validation.freq", "3",
             "--validation.steps", "2")
    single = run_training(tmp_path / "one", *steps, "--training.local_batch_size", "4")
    layouts = {"fsdp": ("--training.local_batch_size", "2"),
               "cp": ("--training.local_batch_size", "4", "--parallelism.context_parallel_degree", "2")}
    for name, layout in layouts.items():
        run = run_training(tmp_path / name, *steps, *layout, nproc=2)
        for a, b in zip(single, run, strict=True):
            for key in ("loss", "total_loss", "grad_norm"):
                assert b[key] == pytest.approx(a[key], rel=1e-5), (name, key)
            assert b["mtp_losses"] == pytest.approx(a["mtp_losses"], rel=1e-5), name
            assert b["valid_tokens"] == a["valid_tokens"], name
            # loads summed over ranks
            assert b["moe_max_violation"] == pytest.approx(a["moe_max_violation"], abs=1e-6), name
        validation = single[-1]["validation"], run[-1]["validation"]  # each rank its half of every batch
        assert validation[1]["valid_tokens"] == validation[0]["valid_tokens"], name
        for key in ("loss", "mtp_losses", "mtp_acceptance"):
            assert validation[1][key] == pytest.approx(validation[0][key], rel=1e-5), (name, key)


def test_the_run_names_itself_first(tmp_path):
    """Rank 0's first line: the job, the model's size counted from its modules, the layout and settings."""
    import subprocess

    import torch

    from launch import REPO, training_command
    from titan_dsv4.models.deepseek_v4 import FLAVORS, DeepseekV4Model
    from titan_dsv4.config.validate import _count

    cmd, env = training_command(tmp_path, *SMALL, "--training.steps", "1", "--activation_checkpoint.mode",
                                "selective", "--activation_checkpoint.selective_ac_option", "op")
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    with torch.device("meta"):
        model = DeepseekV4Model(FLAVORS["debugmodel"])
    params = sum(p.numel() for p in model.parameters())
    first = result.stdout.splitlines()[0]
    assert first == (f"titan_dsv4: DeepSeek-V4 debug model with MTP: debugmodel, {_count(params)} parameters "
                     f"({_count(model.args.num_active_params())} active), MTP depth 1; 1 process: DP 1; "
                     "activation checkpointing selective (op), compile off; 1 step of 4 x 128 tokens"), first


def test_validation_loss_is_the_trained_models_loss_on_the_held_out_batches(tmp_path):
    """The last step's validation record against the exported weights: plain fp32 logits (eval mode: the
    main head; train mode: every MTP depth) and torch's cross-entropy on the held-out batches."""
    import torch
    import torch.nn.functional as F

    import titan_dsv4
    from titan_dsv4.components.dataloader import build_dataloader, read_batches
    from titan_dsv4.components.loss import build_targets
    from titan_dsv4.components.tokenizer import Tokenizer

    records = run_training(tmp_path, *SMALL, "--training.steps", "3", "--validation.enable",
                           "--validation.freq", "2", "--validation.steps", "3", "--checkpoint.enable",
                           "--checkpoint.last_save_in_hf", "--checkpoint.export_dtype", "float32")
    assert [r["validation"] is not None for r in records] == [False, True, True]  # every 2 steps and the last
    model = titan_dsv4.from_pretrained(tmp_path / "checkpoint" / "step-3-hf", dtype=torch.float32)
    sums, hits = torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    counts = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for batch in read_batches(build_dataloader("pydocs", None, Tokenizer(), 128, 4, 0, 1, "validation"), 3):
            targets = build_targets(batch.labels, batch.positions, 1)
            main = model.eval()(batch.input_ids, batch.positions)
            _, depth0 = model.train()(batch.input_ids, batch.positions)
            for d, logits in enumerate((main, depth0)):
                t = targets[..., d].flatten()
                sums[d] += F.cross_entropy(logits.flatten(0, 1), t, ignore_index=-100, reduction="sum").double()
                valid = t != -100
                counts[d] += valid.sum()
                hits[d] += (logits.flatten(0, 1).argmax(-1) == t)[valid].sum()
    validation = records[-1]["validation"]
    assert validation["valid_tokens"] == int(counts[0])
    assert validation["loss"] == pytest.approx(float(sums[0] / counts[0]), rel=1e-5)
    assert validation["mtp_losses"] == pytest.approx([float(sums[1] / counts[1])], rel=1e-5)
    assert validation["mtp_acceptance"] == pytest.approx([float(hits[1] / counts[1])], abs=1e-9)
    assert records[1]["validation"]["loss"] != validation["loss"]  # the model changed in between


def test_validation_leaves_training_untouched(tmp_path):
    """A run that validates every step trains exactly as one that never does: eval mode counts no expert
    loads (the balancing bias), adds nothing to the indexer's KL (trained here) and draws no random numbers."""
    common = (*SMALL, "--training.steps", "3", "--training.indexer_loss_coeff", "0.5")
    plain = run_training(tmp_path / "plain", *common, "--validation.enable", "false")
    validated = run_training(tmp_path / "validated", *common, "--validation.freq", "1", "--validation.steps", "1")
    assert all(r["validation"] for r in validated) and not any(r["validation"] for r in plain)
    for a, b in zip(plain, validated, strict=True):
        for key in ("loss", "mtp_losses", "grad_norm", "indexer_loss", "moe_max_violation"):
            assert b[key] == a[key], key
