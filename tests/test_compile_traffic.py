"""``scripts/compile_traffic.py``: inductor's byte count of compiled blocks, through the GPU code paths (the
Triton kernels as opaque ops), beside the eager count and the fusion bound of the same block."""

import subprocess
import sys

import pytest

from launch import REPO


@pytest.mark.slow
def test_compiled_blocks_move_less_than_eager_and_take_the_gpu_kernels():
    pytest.importorskip("triton")  # the kernels' ops are defined where Triton is installed
    command = [sys.executable, "scripts/compile_traffic.py", "--seq", "128", "--batch", "1", "--blocks", "mhc,csa"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    # (the script refuses a block whose attention did not call the fused kernel's op, or whose mHC did not
    # call the Sinkhorn kernel's and the bf16 GEMMs': the ops the GPU runs, not the torch paths)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {line.split()[0]: [float(v.replace(",", "")) for v in line.split()[1:]]
            for line in result.stdout.splitlines() if line.split()[0] in ("mhc", "csa")}
    assert rows.keys() == {"mhc", "csa"}, result.stdout
    for kind, (eager_gb, eager_kernels, compiled_gb, compiled_kernels, bound_gb, _, _) in rows.items():
        # fusion keeps temporaries on chip and merges kernels; the bound is what no fusion avoids (a compiled
        # block below it would prove the bound's model wrong)
        assert bound_gb <= compiled_gb < eager_gb, (kind, rows[kind])
        assert compiled_kernels < eager_kernels, (kind, rows[kind])
