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
    assert set(PARTS + ["attention_kernel_tiles", "indexer_scores_s", "compiled_kernels"]) <= set(summary)
    assert all(variants == [] for variants in summary["compiled_kernels"].values())  # interpreted: none compiled
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
    # the goal's figures, worked out again from the parts they come from
    goal = summary["goal"]
    assert goal["mfu_fast_mtp1"] == summary["fast_mtp1"]["mfu"]
    mtp0, mtp1 = summary["fast_mtp0"], summary["fast_mtp1"]
    assert goal["mtp_overhead_over_flop_share"] == pytest.approx(
        (mtp1["step_s"] - mtp0["step_s"]) / mtp0["step_s"]
        / ((mtp1["flops_per_token"] - mtp0["flops_per_token"]) / mtp0["flops_per_token"]))
    shares = goal["component_time_over_flop_share"]
    assert set(shares) == {"attention", "moe", "mhc", "head_loss"}
    other = sum(profile["by_component"].get("other", {}).values())
    assert sum(shares[c] * flops[c] / flops["total"] for c in shares) == pytest.approx(
        1 - other / profile["attributed_s"])  # the four components' time shares
    tiles = summary["attention_kernel_tiles"]["block_n16"]
    assert tiles["forward_tflops"] / tiles["backward_tflops"] == pytest.approx(
        2 / 5 * (tiles["forward_backward_s"] - tiles["forward_s"]) / tiles["forward_s"])


def test_no_part_starts_after_the_deadline(tmp_path):
    """``--deadline 0``: every part is marked skipped, the summary still written, the goal left empty."""
    result = subprocess.run([sys.executable, "scripts/bench_gpu.py", "--smoke", "--deadline", "0", "--out",
                             str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    parts = [name for name in PARTS if name in summary]
    assert parts and all("skipped" in summary[name] for name in parts), summary
    assert summary["goal"] == {}


READ_THE_LAUNCHERS_CACHE = """
import json, sys
sys.path.insert(0, "scripts")
import bench_gpu, compile_kernels

label, kernel, args, kwargs = compile_kernels.recorded_launches(64, 512, 128, 512, 4, 64, 128)[0]
compiled = compile_kernels.compile_launch(kernel, args, kwargs)
kernel.device_caches = {0: ({"a launch": compiled}, {}, None, None, None)}  # as a GPU launch leaves it
print(json.dumps([label, compile_kernels.usage(compiled), bench_gpu.compiled_kernels()]))
"""


def test_the_benchmark_reports_what_the_launcher_compiled():
    """On a GPU, ``compiled_kernels`` reads each kernel's variants from Triton's launcher cache: here the
    attention forward, compiled for sm_90 as ``compile_kernels.py`` compiles it, put where a launch leaves
    it. The benchmark names the variant's constants and gives ptxas's figures; the kernels not launched
    have none."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled kernels, not interpreted
    result = subprocess.run([sys.executable, "-c", READ_THE_LAUNCHERS_CACHE], cwd=REPO, capture_output=True,
                            text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    label, figures, found = json.loads(result.stdout.splitlines()[-1])
    assert label == "attention forward"
    (variant,) = found.pop("attention_kernel._forward_kernel")
    assert all(variants == [] for variants in found.values()) and len(found) == 4
    assert variant.pop("constants") == {"D": 512, "BLOCK_H": 32, "BLOCK_N": 16, "N_WINDOW_TILES": 8,
                                        "ENTRY_SLOTS": 512, "UPCAST": False, "MASS": False}
    assert variant == figures and figures["registers"] > 0
