"""Operating a run: profiler traces on a rhythm of training steps that a resumed run keeps, Python's cycle
collector only every ``training.gc_freq`` steps (and no tensor ever left to it), and collective timeouts:
long while starting, short after the first step, so a stalled rank ends the job instead of hanging it."""

import gc
import json
import shutil
import struct
import subprocess
import weakref
from pathlib import Path

import pytest

from launch import REPO, read_metrics, run_training, training_command

from titan_dsv4.components.garbage_collection import GarbageCollection

PP2 = ("--parallelism.pipeline_parallel_degree", "2", "--training.local_batch_size", "4",
       "--training.seq_len", "128", "--validation.enable", "false")


def test_garbage_collection_defers_cycles_to_its_steps():
    class Node:
        pass

    collected = []
    collector = GarbageCollection(freq=3)
    try:
        assert not gc.isenabled()
        node = Node()
        node.self = node  # a reference cycle: only the cycle collector frees it
        weakref.finalize(node, collected.append, "freed")
        del node
        for step in (1, 2):
            _ = [[] for _ in range(100_000)]  # far past the allocation count that starts an automatic collection
            collector.step(step)
            assert not collected, step
        collector.step(3)
        assert collected == ["freed"]
    finally:
        collector.close()
    assert gc.isenabled()


@pytest.mark.slow
def test_a_pipelined_run_collects_only_every_gc_freq_steps_and_leaves_no_tensor_to_the_collector(tmp_path):
    """With automatic collection off, a tensor kept alive by a reference cycle would hold its memory (on a GPU:
    activations) until the next collection; the probe counts what each collection finds."""
    out = tmp_path / "collections"
    cmd, env = training_command(tmp_path / "run", *PP2, "--training.steps", "6", "--training.gc_freq", "2",
                                "--activation_checkpoint.mode", "full", "--validation.enable", "true",
                                "--parallelism.pipeline_parallel_schedule", "Interleaved1F1B",
                                nproc=2, module=(str(REPO / "tests" / "gc_probe.py"), str(out)))
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-5000:]
    for rank in (0, 1):
        collections = json.loads((out / f"rank{rank}.json").read_text())
        assert [c["step"] for c in collections] == [0, 2, 4, 6], (rank, collections)
        assert all(c["generation"] == 2 for c in collections)  # full collections: nothing promoted and kept
        assert [c["tensors"] for c in collections] == [0, 0, 0, 0], (rank, collections)


PHASES = ["titan_dsv4/data_wait", "titan_dsv4/forward_backward", "titan_dsv4/gradients", "titan_dsv4/optimizer",
          "titan_dsv4/expert_balance"]


def trace_events(path) -> list[dict]:
    return json.loads(path.read_text())["traceEvents"]


@pytest.mark.slow
def test_profiler_traces_each_rank_at_multiples_of_profile_freq_across_a_resume(tmp_path):
    dump = tmp_path / "run"
    profiling = ("--profiling.enable_profiling", "--profiling.profile_freq", "3", "--profiling.profiler_warmup",
                 "1", "--checkpoint.enable", "--checkpoint.interval", "4")
    run_training(dump, *PP2, *profiling, "--training.steps", "4", nproc=2)
    records = run_training(dump, *PP2, *profiling, "--training.steps", "7", nproc=2)  # resumes at step 4
    assert [r["step"] for r in records] == list(range(1, 8))
    traces = dump / "profile_traces"
    assert sorted(p.name for p in traces.iterdir()) == ["iteration_3", "iteration_6"]
    for step in (3, 6):
        folder = traces / f"iteration_{step}"
        assert sorted(p.name for p in folder.iterdir()) == ["rank0_trace.json", "rank1_trace.json"]
        for rank in (0, 1):
            events = trace_events(folder / f"rank{rank}_trace.json")
            steps = [e for e in events if e.get("name", "").startswith("ProfilerStep#")]
            assert len(steps) == 1, (step, rank, [e["name"] for e in steps])  # profiler_active = 1
            assert any(e.get("name") == "aten::mm" for e in events)  # the step's compute is in it
            phases = [e["name"] for e in events if e.get("name", "").startswith("titan_dsv4/")]
            assert sorted(phases) == sorted(PHASES), (step, rank, phases)  # each phase of the one step, once


@pytest.mark.slow
def test_a_stalled_rank_fails_the_job_after_train_timeout_but_not_in_the_first_step(tmp_path):
    """Rank 1 stalls 12 s before step 1 (under comm.init_timeout_seconds: the run goes on) and 120 s before
    step 3: rank 0's collective gives up after comm.train_timeout_seconds = 8 s and the job fails. (Under
    gloo this covers collectives; its pipeline receives keep the timeout their group was made with.)"""
    dump = tmp_path / "run"
    cmd, env = training_command(dump, "--training.steps", "4", "--training.local_batch_size", "4",
                                "--comm.train_timeout_seconds", "8", nproc=2,
                                module=(str(REPO / "tests" / "stall_rank.py"),))
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=400,
                            env={**env, "STALL": "1:12,3:120"})
    assert result.returncode != 0
    assert "stalling before step 1" in result.stderr and "stalling before step 3" in result.stderr
    assert "Timed out waiting 8000ms" in result.stderr, result.stderr[-5000:]
    assert [r["step"] for r in read_metrics(dump)] == [1, 2]


def tensorboard_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series as TensorBoard itself reads the folder (orphaned points of a restart purged)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def expected_series(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """The TensorBoard series metrics.jsonl implies: its numbers under their keys, MTP depths and MoEs apart."""
    series: dict[str, list[tuple[int, float]]] = {}

    def add(tag: str, step: int, value) -> None:
        if isinstance(value, (int, float)):  # booleans too (skipped: 0/1)
            series.setdefault(tag, []).append((step, float(value)))

    for record in records:
        step = record["step"]
        for key, value in record.items():
            if key != "step":
                add(key, step, value)
        for prefix, losses in (("", record), ("validation/", record.get("validation"))):
            for depth, (loss, acceptance) in enumerate(zip(losses["mtp_losses"], losses["mtp_acceptance"])
                                                       if losses else []):
                add(f"{prefix}mtp_loss/depth_{depth}", step, loss)
                add(f"{prefix}mtp_acceptance/depth_{depth}", step, acceptance)
        if record.get("validation"):
            add("validation/loss", step, record["validation"]["loss"])
        for moe, violation in record.get("moe_max_violation", {}).items():
            add(f"moe_max_violation/{moe}", step, violation)
    return series


def wandb_offline_runs(folder) -> list[tuple[str, dict, dict[str, list[tuple[int, float]]]]]:
    """Each offline W&B run under ``folder``, oldest first: its id, config and scalar series, read from its
    ``.wandb`` file (a LevelDB log of W&B's protobuf records after a 7-byte header)."""
    from wandb.proto import wandb_internal_pb2

    runs = []
    for run_file in sorted(Path(folder).glob("offline-run-*/run-*.wandb")):
        data, pos, pending, block = run_file.read_bytes(), 7, b"", 32768
        run_id, config, series = None, {}, {}
        while pos + 7 <= len(data):
            if block - pos % block < 7:  # a block's tail too short for a header is padding
                pos += block - pos % block
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            pending, pos = pending + data[pos + 7:pos + 7 + length], pos + 7 + length
            if kind not in (1, 4):  # FULL and LAST end a record; FIRST and MIDDLE continue it
                continue
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "run":
                run_id = record.run.run_id
                config = {item.key: json.loads(item.value_json) for item in record.run.config.update}
            elif record.WhichOneof("record_type") == "history":
                row = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                       for item in record.history.item}
                for tag, value in row.items():
                    if not tag.startswith("_"):
                        series.setdefault(tag, []).append((record.history.step.num, value))
        runs.append((run_id, config, series))
    return runs


def assert_same_series(got: dict, want: dict, rel: float) -> None:
    assert set(got) == set(want)
    for tag, points in want.items():
        assert [step for step, _ in got[tag]] == [step for step, _ in points], tag
        assert [value for _, value in got[tag]] == pytest.approx([value for _, value in points], rel=rel), tag


@pytest.mark.slow
def test_dashboards_hold_metrics_jsonl_after_a_resumed_run_redoes_steps(tmp_path, monkeypatch):
    """A run saves at step 2 and reaches step 4; its step-4 checkpoint is lost (as in a crash before that save)
    and the rerun, at twice the learning rate, redoes steps 3-4 and goes on to 6. TensorBoard shows each step
    once, the rerun's values from step 3 (float32 of metrics.jsonl's); the rerun continues the same W&B run
    from step 5 (W&B keeps the steps it has), each run's part exactly its metrics.jsonl records."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    dump = tmp_path / "run"
    run = ("--training.steps", "4", "--training.local_batch_size", "4", "--training.seq_len", "128",
           "--checkpoint.enable", "--checkpoint.interval", "2", "--metrics.enable_tensorboard",
           "--metrics.enable_wandb", "--validation.freq", "2", "--validation.steps", "1")
    first = run_training(dump, *run)
    shutil.rmtree(dump / "checkpoint" / "step-4")
    records = run_training(dump, *run, "--optimizer.lr", "6e-3", "--training.steps", "6")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6] and records[:2] == first[:2]
    assert records[3]["loss"] != first[3]["loss"]
    assert_same_series(tensorboard_scalars(dump / "tb"), expected_series(records), rel=1e-6)
    (first_id, config, first_series), (second_id, second_config, second_series) = wandb_offline_runs(dump / "wandb")
    assert second_id == first_id
    assert config["training"]["steps"] == 4 and second_config["training"]["steps"] == 6
    assert_same_series(first_series, expected_series(first), rel=0)
    assert_same_series(second_series, expected_series(records[4:]), rel=0)


@pytest.mark.parametrize("key,package,extra", [("enable_tensorboard", "tensorboard", "metrics"),
                                               ("enable_wandb", "wandb", "wandb")])
def test_a_dashboard_without_its_package_exits_2(tmp_path, key, package, extra):
    cmd, env = training_command(tmp_path, f"--metrics.{key}", module=(
        "-c", f"import sys; sys.modules['{package}'] = None; from titan_dsv4.train import main; "
              "sys.exit(main(sys.argv[1:]))"))
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 2
    assert result.stderr.strip() == (f"titan_dsv4: config error: `metrics.{key}` = true needs the {package} "
                                     f"package: pip install 'titan_dsv4[{extra}]'")
