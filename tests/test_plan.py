"""``python -m titan_dsv4.plan`` against the measured peak memory of real CPU training runs (the live tensor
bytes of every rank, from the profiler's allocation events: ``tests/memory_worker.py``), the microbatches
torch's schedules keep in flight, and the shipped cluster configs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launch import DEBUG_TOML, REPO, free_port
from titan_dsv4.config import load_config
from titan_dsv4.models.deepseek_v4 import FLAVORS, DeepseekV4Model
from titan_dsv4.plan import StageActivations, main, plan_memory, worst_moment

LAYOUTS = {  # name: (processes, overrides)
    "single": (1, ["--training.local_batch_size", "4"]),
    "single_full_ac": (1, ["--training.local_batch_size", "4", "--activation_checkpoint.mode", "full"]),
    "pp2_1f1b": (2, ["--parallelism.pipeline_parallel_degree", "2"]),
    "pp2_gpipe": (2, ["--parallelism.pipeline_parallel_degree", "2", "--parallelism.pipeline_parallel_schedule",
                      "GPipe"]),
    "pp2_zbv": (2, ["--parallelism.pipeline_parallel_degree", "2", "--parallelism.pipeline_parallel_schedule",
                    "ZBVZeroBubble"]),
    "fsdp2": (2, ["--training.local_batch_size", "4", "--parallelism.data_parallel_shard_degree", "2"]),
    "ep2_fsdp2": (2, ["--training.local_batch_size", "4", "--parallelism.data_parallel_shard_degree", "2",
                      "--parallelism.expert_parallel_degree", "2"]),
    # each rank half of every sequence: its attention on the shard + halo, the entries of the whole sequence
    "cp2": (2, ["--training.local_batch_size", "4", "--parallelism.context_parallel_degree", "2"]),
}


def measured_peaks(tmp_path: Path, nproc: int, overrides: list[str]) -> list[dict]:
    out = tmp_path / "peaks.json"
    worker = [str(REPO / "tests" / "memory_worker.py"), str(out), "--job.config_file", DEBUG_TOML,
              "--job.dump_folder", str(tmp_path / "run"), "--parallelism.pipeline_parallel_degree", "1", *overrides]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--rdzv_backend",
               "c10d", "--rdzv_endpoint", f"127.0.0.1:{free_port()}", *worker]
    else:
        cmd = [sys.executable, *worker]
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run(cmd, cwd=REPO / "tests", capture_output=True, text=True, timeout=600,
                            env={**os.environ, **env})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_plan_within_15_percent_of_measured_peak(tmp_path, layout):
    nproc, overrides = LAYOUTS[layout]
    peaks = measured_peaks(tmp_path, nproc, overrides)
    config = load_config(["--job.config_file", DEBUG_TOML, "--parallelism.pipeline_parallel_degree", "1",
                          *overrides])
    plan = plan_memory(config, nproc, device="cpu")
    for rank in peaks:
        predicted = plan[rank["pp_rank"]].total
        assert abs(predicted / rank["peak"] - 1) <= 0.15, (layout, rank, predicted)


def test_muon_keeps_one_momentum_per_matrix_element_and_adamw_two():
    base = ["--job.config_file", DEBUG_TOML, "--parallelism.pipeline_parallel_degree", "1"]
    adamw = plan_memory(load_config(base), 1, device="cpu")[0]
    muon = plan_memory(load_config([*base, "--optimizer.name", "Muon"]), 1, device="cpu")[0]
    with torch.device("meta"):
        model = DeepseekV4Model(FLAVORS[load_config(base).model.flavor])
    frozen = {id(p) for p in model.indexer_parameters()}  # no indexer loss: the indexer is not trained
    matrices = sum(p.numel() for p, _ in model.matrix_parameters() if id(p) not in frozen)
    assert adamw.optimizer == 2 * adamw.grads and adamw.optimizer - muon.optimizer == 4 * matrices > 0
    assert muon.total == adamw.total - 4 * matrices
    # one process orthogonalizes every trained matrix: per matrix n x m (n <= m), 10 x (4 n^2 m + 2 n^3)
    shapes = [(count, *sorted((p.shape[-2], p.shape[-1]) if p.ndim == 3 else (p.shape[0] // count, p.shape[1])))
              for p, count in model.matrix_parameters() if id(p) not in frozen]
    assert muon.newton_schulz_flops == sum(c * 10 * (4 * n * n * m + 2 * n ** 3) for c, n, m in shapes)
    assert adamw.newton_schulz_flops == 0 and muon.model_flops == adamw.model_flops > 0


def test_in_flight_microbatches_follow_the_schedule():
    """Hand-known: 1F1B keeps ``pp - rank`` microbatches on rank ``rank``; GPipe keeps all of them."""
    from titan_dsv4.config.validate import validate
    from titan_dsv4.distributed.pipeline import schedule_actions

    one = {s: StageActivations(held=1, backward_extra=0) for s in range(4)}
    for schedule, expected in (("1F1B", [4, 3, 2, 1]), ("GPipe", [8, 8, 8, 8])):
        config = load_config(["--job.config_file", DEBUG_TOML, "--model.flavor", "debugmodel",
                              "--parallelism.pipeline_parallel_degree", "4", "--training.local_batch_size", "8",
                              "--parallelism.pipeline_parallel_microbatch_size", "1",
                              "--parallelism.pipeline_parallel_first_stage_less_layers", "0",
                              "--parallelism.pipeline_parallel_last_stage_less_layers", "0",
                              "--parallelism.pipeline_parallel_schedule", schedule])
        setup = validate(config, 4)
        for rank in range(4):
            worst, _ = worst_moment(schedule_actions(setup.pipeline_plan, rank), {rank: one[rank]})
            assert worst == expected[rank], (schedule, rank)


@pytest.mark.parametrize("name, ngpu", [("flash_pretrain_16x8_h100", 128), ("flash_finetune_16x8_h100", 128),
                                        ("flash_finetune_128k_16x8_h100", 128), ("flash_lora_1x8_h100", 8),
                                        ("pro_pretrain_128x8_h100", 1024), ("pro_finetune_128x8_h100", 1024)])
def test_shipped_cluster_configs_fit_80gb(capsys, name, ngpu):
    path = REPO / "train_configs" / f"{name}.toml"
    assert main(["--job.config_file", str(path), "--gpu-memory-gib", "80"]) == 0  # the config sets the degrees
    out = capsys.readouterr().out
    assert f": {ngpu} ranks, PP=" in out and ": fits (" in out, out
    assert f"python -m titan_dsv4.plan --job.config_file train_configs/{name}.toml\n" in path.read_text()
    assert f"--nodes {ngpu // 8} " in path.read_text()


@pytest.mark.parametrize("nproc,layout", [(1, []), (2, ["--parallelism.data_parallel_shard_degree", "2",
                                                         "--parallelism.expert_parallel_degree", "2"])])
def test_quantisation_aware_experts_add_their_rounded_copies(nproc, layout):
    """Without activation checkpointing each MoE layer's GEMMs keep the rounded weights of the rank's experts
    for backward: 3 matrices x (8 experts / EP) x 64 x 64 fp32 values, in 4 decoder + 1 MTP layers."""
    base = ["--job.config_file", DEBUG_TOML, "--parallelism.pipeline_parallel_degree", "1",
            "--training.local_batch_size", "4", *layout]
    plain = plan_memory(load_config(base), nproc, device="cpu")[0]
    qat = plan_memory(load_config([*base, "--model.expert_qat", "fp4"]), nproc, device="cpu")[0]
    assert qat.activations - plain.activations == 5 * 3 * (8 // nproc) * 64 * 64 * 4
    assert qat.total - plain.total == qat.activations - plain.activations


def test_a_gpu_plan_counts_a_compiled_gradient_free_call_by_its_outputs():
    """On CUDA the FP4 dequantisation of an expert stack (and the QAT rounding) is one compiled kernel, whose
    temporaries never reach memory: a GPU plan counts the bf16 matrix it returns, a CPU plan (eager) also the
    element-wise temporaries the plain code creates on the way."""
    from titan_dsv4.models.deepseek_v4.gpu_paths import meta_as_gpu
    from titan_dsv4.models.deepseek_v4.moe import stored_fp4_weight
    from titan_dsv4.plan import LiveBytes

    packed = torch.empty(8, 256, 128, dtype=torch.uint8, device="meta")  # 8 experts 256 x 256, two per byte
    scale = torch.empty(8, 256, 8, dtype=torch.uint8, device="meta")  # one per 32 columns
    matrix = 8 * 256 * 256 * 2  # bf16
    gpu = LiveBytes([packed, scale])
    with meta_as_gpu(gpu.fused), gpu:
        out = stored_fp4_weight(packed, scale, torch.bfloat16)
    assert out.shape == (8, 256, 256) and gpu.peak == gpu.live == matrix
    eager = LiveBytes([packed, scale])
    with eager:
        stored_fp4_weight(packed, scale, torch.bfloat16)
    assert eager.peak > matrix
