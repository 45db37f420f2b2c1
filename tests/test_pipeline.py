"""Pipeline parallelism with MTP on the last stage: every schedule against a single-process reference
(fp64, torchrun + gloo), the CLI's metrics under PP, and every bad layout's error."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from launch import REPO, free_port, run_training
from titan_dsv4.config import ConfigError, JobConfig
from titan_dsv4.distributed.parallel_dims import ParallelDims
from titan_dsv4.distributed.pipeline import plan_pipeline
from titan_dsv4.models.deepseek_v4 import DeepseekV4Model

import pp_worker

ALL_SCHEDULES = ["GPipe", "1F1B", "Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble", "ZBVZeroBubble",
                 "DualPipeV"]
CSV = str(REPO / "train_configs" / "pp2_looped_bfs.csv")


def run_worker(nproc: int, cases: list[str], tmp_path) -> dict:
    out = tmp_path / f"pp{nproc}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--rdzv_backend", "c10d",
           "--rdzv_endpoint", f"127.0.0.1:{free_port()}", str(REPO / "tests" / "pp_worker.py"), str(out), *cases]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-6000:]
    return json.loads(out.read_text())


def check(results: dict, cases: list[str]) -> None:
    assert sorted(results) == sorted(cases)
    for case, r in results.items():
        assert r["missing_grads"] == 0 and r["uncovered_params"] == 0, (case, r)
        assert r["parts_rel_err"] < 1e-12, (case, r)  # main and every MTP depth's loss sum (fp64)
        assert r["grad_rel_err"] < 1e-9, (case, r)  # every gradient, embedding = stage 0 + replica
        assert r["expert_bias_err"] == 0.0 < r["expert_bias_moved"], (case, r)  # balancing bias after a step


@pytest.mark.slow
def test_every_schedule_pp2_mtp_depth_1_and_2(tmp_path):
    cases = [f"{s}:{d}" for s in ALL_SCHEDULES for d in (1, 2)] + [f"CSV:2:{CSV}"]
    check(run_worker(2, cases, tmp_path), cases)


@pytest.mark.slow
def test_pp4_schedules(tmp_path):
    cases = [f"{s}:{d}" for s in ("1F1B", "Interleaved1F1B", "ZBVZeroBubble") for d in (1, 2)]
    check(run_worker(4, cases, tmp_path), cases)


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["Interleaved1F1B", "ZBVZeroBubble"])
def test_pp2_training_writes_the_same_metrics_as_pp1(tmp_path, schedule):
    """Training and validation (forward only through the stages, every microbatch) alike; ZBV's rank 0
    holds the first and the last stage."""
    common = ("--training.steps", "4", "--training.seq_len", "128", "--training.local_batch_size", "4",
              "--parallelism.pipeline_parallel_microbatch_size", "1", "--validation.enable",
              "--validation.freq", "2", "--validation.steps", "2")
    single = run_training(tmp_path / "pp1", *common)
    piped = run_training(tmp_path / "pp2", *common, "--parallelism.pipeline_parallel_degree", "2",
                         "--parallelism.pipeline_parallel_schedule", schedule, nproc=2)
    assert sum(r["validation"] is not None for r in single) == 2
    for a, b in zip(single, piped, strict=True):
        for key in ("loss", "total_loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), key
        assert b["mtp_losses"] == pytest.approx(a["mtp_losses"], rel=1e-5)
        assert b["moe_max_violation"] == pytest.approx(a["moe_max_violation"], abs=1e-6)  # from both stages
        assert (a["validation"] is None) == (b["validation"] is None)
        if a["validation"]:
            assert b["validation"]["valid_tokens"] == a["validation"]["valid_tokens"]
            for key in ("loss", "mtp_losses", "mtp_acceptance"):
                assert b["validation"][key] == pytest.approx(a["validation"][key], rel=1e-5), key


def plan(pp=2, local_batch=4, args=None, **parallelism):
    config = JobConfig()
    config.parallelism.pipeline_parallel_degree = pp
    for key, value in parallelism.items():
        setattr(config.parallelism, key, value)
    with torch.device("meta"):
        model = DeepseekV4Model(args or pp_worker.test_args(1, pp))
    return plan_pipeline(model, config, pp, local_batch), model


def test_hash_layers_can_sit_on_later_stages_and_mtp_sits_last():
    p, model = plan(pipeline_parallel_schedule="1F1B")
    assert model.args.num_hash_layers == 3
    assert "layers.2" in p.fqns_per_stage[1]  # a hash-routed layer off the first stage (covered by the matrix)
    assert p.fqns_per_stage[0][0] == "embed"
    assert {"hc_head", "norm", "head", "mtp.0", "mtp_embed"} <= set(p.fqns_per_stage[-1])
    v, _ = plan(pipeline_parallel_schedule="ZBVZeroBubble")
    assert v.stage_ids(0) == [0, 3] and v.stage_ids(1) == [1, 2]
    loop, _ = plan(pipeline_parallel_schedule="Interleaved1F1B")
    assert loop.stage_ids(0) == [0, 2] and loop.stage_ids(1) == [1, 3]


BAD_LAYOUTS = [
    (dict(pp=4, pipeline_parallel_schedule="Interleaved1F1B", args=pp_worker.test_args(1, 2)),
     "impossible"),  # 8 stages for 4 layers
    (dict(local_batch=4, pipeline_parallel_microbatch_size=3), "must divide training.local_batch_size"),
    (dict(pipeline_parallel_schedule="Interleaved1F1B", pipeline_parallel_layers_per_stage=3),
     "needs at least two stages per rank"),
    (dict(pipeline_parallel_schedule="1F1B", pipeline_parallel_layers_per_stage=1), "runs one stage per rank"),
    (dict(module_fqns_per_model_part=[["embed", "layers.0", "layers.1"], ["layers.3"]]),
     "leaves modules on no stage: layers.2"),
    (dict(module_fqns_per_model_part=[["layers.0", "layers.1", "layers.2"], ["layers.2", "layers.3"]]),
     "placed on stages 0 and 1"),
    (dict(module_fqns_per_model_part=[["layers.0", "layers.9"], ["layers.1", "layers.2", "layers.3"]]),
     "unknown module 'layers.9'"),
    (dict(module_fqns_per_model_part=[["layers.0", "layers.1", "head"], ["layers.2", "layers.3"]]),
     "module 'head' must be on pipeline stage 1"),
    (dict(pipeline_parallel_schedule_csv="/nonexistent.csv"), "no such file"),
    (dict(pipeline_parallel_layers_per_stage=64), "`parallelism.pipeline_parallel_layers_per_stage` = 64 gives 1 "
     "stage for 4 layers (+2 for the embedding and the head), which cannot be placed evenly on "
     "pipeline_parallel_degree = 2"),
]


@pytest.mark.parametrize("kwargs,message", BAD_LAYOUTS, ids=[m[:40] for _, m in BAD_LAYOUTS])
def test_bad_layouts_fail_before_compute(kwargs, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        plan(**kwargs)


def test_explicit_module_lists_are_completed_by_the_model_hook():
    p, _ = plan(module_fqns_per_model_part=[["layers.0"], ["layers.1", "layers.2", "layers.3"]])
    assert p.fqns_per_stage[0] == ["embed", "layers.0"]
    assert p.fqns_per_stage[1][:3] == ["layers.1", "layers.2", "layers.3"]


def test_world_size_not_divisible():
    with pytest.raises(ConfigError, match="not divisible"):
        ParallelDims(dp_replicate=1, dp_shard=-1, pp=2, ep=1, world_size=3)
    with pytest.raises(ConfigError, match="= 4, but 6 processes"):
        ParallelDims(dp_replicate=1, dp_shard=2, pp=2, ep=1, world_size=6)


def test_csv_with_wrong_rank_count(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("0F0,0B0\n")
    with pytest.raises(ConfigError, match="1 rank rows but pipeline_parallel_degree = 2"):
        plan(pipeline_parallel_schedule_csv=str(path))


def test_a_malformed_csv_is_named_with_its_cell(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("0F0,0B0\n1F0,1X0\n")
    with pytest.raises(ConfigError) as info:
        plan(pipeline_parallel_schedule_csv=str(path))
    assert str(info.value) == (f"`parallelism.pipeline_parallel_schedule_csv` = {str(path)!r}: line 2 has '1X0'; "
                               "cells are STAGE ACTION MICROBATCH with action F, B, I or W (e.g. 0F1)")


def test_the_banner_names_the_csv_schedule_that_runs():
    from titan_dsv4.config import load_config
    from titan_dsv4.config.validate import describe_run, validate

    config = load_config(["--parallelism.pipeline_parallel_degree", "2", "--parallelism.pipeline_parallel_schedule",
                          "1F1B", "--parallelism.pipeline_parallel_schedule_csv", CSV])
    banner = describe_run(config, validate(config, 2), 2)
    assert "PP 2 (CSV schedule pp2_looped_bfs.csv) x DP 1" in banner and "1F1B" not in banner


def test_a_negative_layers_per_stage_is_refused_naming_the_key():
    from titan_dsv4.config import load_config
    from titan_dsv4.config.validate import validate

    config = load_config(["--parallelism.pipeline_parallel_degree", "2",
                          "--parallelism.pipeline_parallel_layers_per_stage", "-1"])
    with pytest.raises(ConfigError, match=re.escape("`parallelism.pipeline_parallel_layers_per_stage` = -1 is "
                                                    "invalid: must be >= 1")):
        validate(config, 2)
