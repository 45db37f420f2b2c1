"""Helpers to run the real CLI, alone or under torchrun, and read its metrics.jsonl."""

from __future__ import annotations

import faulthandler
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEBUG_TOML = str(REPO / "train_configs" / "debug_model.toml")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def training_command(dump: Path, *overrides: str, nproc: int = 1,
                     module: tuple[str, ...] = ("-m", "titan_dsv4.train")) -> tuple[list[str], dict]:
    """The CLI command (under torchrun when ``nproc > 1``) and its environment."""
    args = [*module, "--job.config_file", DEBUG_TOML, "--job.dump_folder", str(dump),
            "--metrics.log_freq", "1", "--parallelism.pipeline_parallel_degree", "1", *overrides]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{free_port()}", *args]
    else:
        cmd = [sys.executable, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1" if nproc > 1 else os.environ.get("OMP_NUM_THREADS", "2")}
    return cmd, env


def launcher_env(**extra: str) -> dict:
    """The environment for scripts/run_train.sh and the SLURM node script to use this interpreter (no venv of
    their own)."""
    return {**os.environ, "USE_VENV": "0", "PYTHON": sys.executable,
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", **extra}


def read_metrics(dump: Path) -> list[dict]:
    return [json.loads(line) for line in (dump / "metrics.jsonl").read_text().splitlines()]


def run_training(dump: Path, *overrides: str, nproc: int = 1, timeout: int = 600) -> list[dict]:
    """Train through the CLI and return the metrics.jsonl records."""
    cmd, env = training_command(dump, *overrides, nproc=nproc)
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return read_metrics(dump)


def finish_worker(out: str, results: dict | list) -> None:
    """A worker's end: rank 0 (or the only process) writes the results as JSON, then every rank leaves the
    group."""
    import torch.distributed as dist

    from titan_dsv4.distributed.utils import shutdown_distributed

    if not dist.is_initialized() or dist.get_rank() == 0:
        Path(out).write_text(json.dumps(results, indent=1))
    shutdown_distributed()


def run_worker(main) -> None:
    """A torchrun worker's life: ``main()`` (which ends in ``finish_worker``), then exit without interpreter
    teardown. ``shutdown_distributed`` frees the process groups of plain and DTensor runs, but larger runs
    (a compiled one at least) still hold some, and their gloo threads ran on into interpreter exit, where a
    rank aborted once in CI ("terminate called without an active exception"). A fault prints every
    thread's Python stack."""
    faulthandler.enable()
    main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def gloo_threads() -> list[str]:
    """Names of this process's running gloo threads (Linux)."""
    tasks = Path("/proc/self/task")
    if not tasks.exists():
        return []
    return sorted(name for name in ((tasks / t / "comm").read_text().strip() for t in os.listdir(tasks))
                  if "gloo" in name)
