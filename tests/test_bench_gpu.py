"""``scripts/bench_gpu.py --smoke`` on CPU: every part of the one-GPU benchmark runs (the Triton kernels' parts
under Triton's interpreter) before a GPU's scarce minutes are spent on it, and its accounting agrees with
itself."""

import json
import os
import subprocess
import sys

import pytest
import torch

from launch import REPO

PARTS = ["gpu_equality", "matmul_peak_tflops", "fast_mtp0", "fast_mtp1", "qat_fp4_mtp1", "lora_fp4_mtp1",
         "ac_full_mtp1", "ac_op_mtp1", "unfused_attention_mtp1", "exact_mtp1", "component_s",
         "component_flops_per_token", "profile"]


@pytest.mark.slow
def test_every_part_of_the_benchmark_runs(tmp_path):
    triton = pytest.importorskip("triton")
    result = subprocess.run([sys.executable, "scripts/bench_gpu.py", "--smoke", "--seq", "128", "--batch", "1",
                             "--steps", "1", "--checkpointing", "--out", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    failed = {name: part["error"] for name, part in summary.items() if isinstance(part, dict) and "error" in part}
    assert failed == {}
    assert set(PARTS + ["attention_kernel_s", "indexer_scores_s"]) <= set(summary)
    assert (summary["torch"], summary["triton"]) == (torch.__version__, triton.__version__)  # what made the figures
    # the Triton attention kernel (interpreted) against the torch path on the debug model's CSA and HCA
    # layers, in bf16: output and every gradient
    assert max(summary["gpu_equality"]["fused_attention_rel_err"].values()) < 3e-2, summary["gpu_equality"]
    # MFU's numerator and the component shares' total are the same count
    flops = summary["component_flops_per_token"]
    assert flops["total"] == summary["fast_mtp1"]["flops_per_token"]
    assert sum(v for k, v in flops.items() if k != "total") <= flops["total"]
    profile = summary["profile"]
    assert {"attention", "moe", "mhc", "head_loss"} <= set(profile["by_component"])
    assert profile["attributed_s"] > 0 and (tmp_path / "top_kernels.txt").stat().st_size > 0
