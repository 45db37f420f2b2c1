"""HF <-> DCP converter: a round trip is exact, torch's own DCP loader reads what we write, errors are clear."""

import json

import torch
import torch.distributed.checkpoint as dcp

import titan_dsv4
from hf_reference import random_model
from titan_dsv4.components.hf_checkpoint import checkpoint_tensors
from titan_dsv4.convert import main
from titan_dsv4.models.deepseek_v4 import FLAVORS, DeepseekV4Model


def test_round_trip_is_exact_and_dcp_loads_with_torch(tmp_path):
    model = random_model(FLAVORS["debugmodel"])
    titan_dsv4.save_pretrained(model, tmp_path / "hf", dtype=torch.float32)
    assert main(["hf-to-dcp", str(tmp_path / "hf"), str(tmp_path / "dcp"), "--dtype", "float32"]) == 0
    # torch's DCP loader fills a fresh model's state dict from it (independent reader)
    fresh = DeepseekV4Model(model.args)
    state = checkpoint_tensors(fresh)
    dcp.load(state, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    assert all(torch.equal(state[k], v) for k, v in checkpoint_tensors(model).items())
    assert main(["dcp-to-hf", str(tmp_path / "dcp"), str(tmp_path / "back"), "--dtype", "float32"]) == 0
    back = checkpoint_tensors(titan_dsv4.from_pretrained(tmp_path / "back", dtype=torch.float32))
    assert all(torch.equal(back[k], v) for k, v in checkpoint_tensors(model).items())


def test_routed_experts_are_written_and_read_one_expert_at_a_time(tmp_path, monkeypatch):
    """A layer's stacked experts (17 GB per matrix for Pro) are never one tensor in either direction: DCP's own
    metadata lists one chunk per expert, and ``dcp-to-hf`` deserialises no tensor larger than one expert."""
    model = random_model(FLAVORS["debugmodel"])
    titan_dsv4.save_pretrained(model, tmp_path / "hf", dtype=torch.float32)
    assert main(["hf-to-dcp", str(tmp_path / "hf"), str(tmp_path / "dcp"), "--dtype", "float32"]) == 0
    meta = dcp.FileSystemReader(str(tmp_path / "dcp")).read_metadata().state_dict_metadata
    experts = meta["layers.1.ffn.experts.w2"]
    assert [tuple(c.offsets) for c in experts.chunks] == [(e, 0, 0) for e in range(model.args.n_routed_experts)]
    assert {tuple(c.sizes) for c in experts.chunks} == {(1, *experts.size[1:])}
    loaded, load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loaded.append(load(*a, **k)) or loaded[-1])
    assert main(["dcp-to-hf", str(tmp_path / "dcp"), str(tmp_path / "back"), "--dtype", "float32"]) == 0
    assert max(t.numel() for t in loaded if t.dim() == 3) == experts.size[1:].numel()
    back = checkpoint_tensors(titan_dsv4.from_pretrained(tmp_path / "back", dtype=torch.float32))
    assert all(torch.equal(back[k], v) for k, v in checkpoint_tensors(model).items())


def test_bf16_conversion_keeps_fp32_tensors(tmp_path):
    titan_dsv4.save_pretrained(random_model(FLAVORS["debugmodel"]), tmp_path / "hf")
    assert main(["hf-to-dcp", str(tmp_path / "hf"), str(tmp_path / "dcp")]) == 0
    meta = dcp.FileSystemReader(str(tmp_path / "dcp")).read_metadata().state_dict_metadata
    assert meta["layers.0.attn.wq_a.weight"].properties.dtype == torch.bfloat16
    assert meta["layers.0.hc_attn.fn"].properties.dtype == torch.float32
    assert json.loads((tmp_path / "dcp" / "config.json").read_text())["hidden_size"] == 64


def test_errors_exit_2_with_a_message(tmp_path, capsys):
    assert main(["dcp-to-hf", str(tmp_path), str(tmp_path / "out")]) == 2
    assert "no config.json" in capsys.readouterr().err
    titan_dsv4.save_pretrained(random_model(FLAVORS["debugmodel"]), tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors.index.json").unlink()
    next((tmp_path / "hf").glob("*.safetensors")).write_bytes(b"garbage")
    assert main(["hf-to-dcp", str(tmp_path / "hf"), str(tmp_path / "dcp")]) == 2
    assert "not a readable safetensors file" in capsys.readouterr().err


def test_training_starts_from_the_converted_dcp_as_from_the_hf_folder(tmp_path):
    from launch import run_training

    titan_dsv4.save_pretrained(random_model(FLAVORS["debugmodel"], seed=5), tmp_path / "hf", dtype=torch.float32)
    assert main(["hf-to-dcp", str(tmp_path / "hf"), str(tmp_path / "dcp"), "--dtype", "float32"]) == 0
    run = ("--training.steps", "2", "--training.seq_len", "64", "--training.local_batch_size", "2")
    from_hf = run_training(tmp_path / "a", *run, "--checkpoint.initial_load_path", str(tmp_path / "hf"),
                           "--checkpoint.initial_load_in_hf")
    from_dcp = run_training(tmp_path / "b", *run, "--checkpoint.initial_load_path", str(tmp_path / "dcp"))
    assert [r["loss"] for r in from_dcp] == [r["loss"] for r in from_hf]
    fresh = run_training(tmp_path / "c", *run)
    assert fresh[0]["loss"] != from_dcp[0]["loss"]


def test_a_pipelined_training_checkpoint_converts_to_the_runs_own_export(tmp_path):
    """Each ``step-N`` checkpoint (model spread over two pipeline ranks, optimizer state beside it) converts
    to the Hugging Face layout; the last one equals the trainer's own export of the same step."""
    from launch import run_training

    run_training(tmp_path, "--training.steps", "2", "--training.seq_len", "64", "--training.local_batch_size", "2",
                 "--parallelism.pipeline_parallel_degree", "2", "--parallelism.pipeline_parallel_microbatch_size",
                 "1", "--checkpoint.enable", "--checkpoint.interval", "1", "--checkpoint.last_save_in_hf",
                 "--checkpoint.export_dtype", "float32", nproc=2)
    folder = tmp_path / "checkpoint"
    for step in (1, 2):
        checkpoint = folder / f"step-{step}"
        assert json.loads((checkpoint / "config.json").read_text()) == FLAVORS["debugmodel"].to_hf_config()
        assert main(["dcp-to-hf", str(checkpoint), str(tmp_path / f"hf-{step}"), "--dtype", "float32"]) == 0
    converted, exported, first = (checkpoint_tensors(titan_dsv4.from_pretrained(path, dtype=torch.float32))
                                  for path in (tmp_path / "hf-2", folder / "step-2-hf", tmp_path / "hf-1"))
    assert converted.keys() == exported.keys()
    assert all(torch.equal(converted[k], exported[k]) for k in converted)
    assert not torch.equal(first["layers.0.attn.wq_a.weight"], converted["layers.0.attn.wq_a.weight"])
