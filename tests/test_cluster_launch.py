"""Cluster launch: the SLURM scripts (with stand-ins for srun/scontrol) and a two-"node" torchrun rehearsal
on this machine matching the single-node run."""

import os
import signal
import subprocess
import sys
import time

import pytest

from launch import DEBUG_TOML, REPO, free_port, read_metrics, run_training


def fake_tools(tmp_path, **scripts) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in scripts.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + body)
        (bin_dir / name).chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


def test_slurm_node_script_builds_the_torchrun_command(tmp_path):
    env = fake_tools(tmp_path, scontrol='[ "$1 $2 $3" = "show hostnames gpu[07-10]" ] && '
                                       'printf "gpu07\\ngpu08\\ngpu09\\ngpu10\\n"\n')
    env.update(SLURM_JOB_ID="4242", SLURM_NNODES="4", SLURM_NODEID="2", SLURM_JOB_NODELIST="gpu[07-10]",
               SLURM_GPUS_ON_NODE="8", DRY_RUN="1", PYTHON=sys.executable)
    args = [DEBUG_TOML, "--job.dump_folder", str(tmp_path / "out"), "--training.steps", "9"]  # valid for 32 ranks
    out = subprocess.run(["bash", "scripts/slurm/node.sh", *args], cwd=REPO,
                         env=env, capture_output=True, text=True, check=True).stdout.split()
    assert out[:3] == [sys.executable, "-m", "torch.distributed.run"]

    def value(flag):
        return out[out.index(flag) + 1]

    assert value("--nnodes") == "4" and value("--node_rank") == "2" and value("--nproc_per_node") == "8"
    assert value("--rdzv_backend") == "c10d" and value("--rdzv_endpoint") == "gpu07:29500"
    assert value("--rdzv_id") == "4242" and value("--log_dir") == "logs/4242/node2"
    assert out[-8:] == ["-m", "titan_dsv4.train", "--job.config_file", *args]
    env["MASTER_ADDR"], env["MASTER_PORT"] = "10.0.0.1", "6000"
    out = subprocess.run(["bash", "scripts/slurm/node.sh", *args], cwd=REPO, env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    assert value("--rdzv_endpoint") == "10.0.0.1:6000"


def test_sbatch_script_forwards_the_warning_signal_and_requeues(tmp_path):
    log = tmp_path / "calls.log"
    env = fake_tools(
        tmp_path,
        srun=f'trap \'echo "srun got TERM" >> {log}; exit 0\' TERM\necho "srun $*" >> {log}\n'
             'while true; do sleep 0.1; done\n',
        scontrol=f'echo "scontrol $*" >> {log}\n')
    env.update(SLURM_JOB_ID="77", SLURM_SUBMIT_DIR=str(REPO))
    proc = subprocess.Popen(["bash", "scripts/slurm/train.sbatch", "cfg.toml", "--training.steps", "5"],
                            cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while not (log.is_file() and "srun" in log.read_text()) and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)  # SLURM's --signal=B:USR1@300
    _, err = proc.communicate(timeout=30)
    calls = log.read_text().splitlines()
    assert proc.returncode == 0, err
    assert calls[0].startswith("srun ") and "scripts/slurm/node.sh cfg.toml --training.steps 5" in calls[0]
    assert calls[1:] == ["srun got TERM", "scontrol requeue 77"]


@pytest.mark.slow
def test_two_node_rehearsal_matches_the_single_node_run(tmp_path):
    """torchrun --nnodes 2 with c10d rendezvous on localhost, 2 processes per "node": PP=2 x DP=2 with MTP."""
    run = ("--training.steps", "3", "--training.seq_len", "128", "--training.local_batch_size", "4",
           "--parallelism.pipeline_parallel_degree", "2")
    single = run_training(tmp_path / "single", *run, nproc=4)
    port = free_port()
    dump = tmp_path / "two_nodes"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    agents = []
    for node in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "2",
               "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "rehearsal",
               "--rdzv_conf", f"is_host={'true' if node == 0 else 'false'}",
               "-m", "titan_dsv4.train", "--job.config_file", DEBUG_TOML, "--job.dump_folder", str(dump),
               "--metrics.log_freq", "1", *run]
        agents.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True))
    for agent in agents:
        _, err = agent.communicate(timeout=600)
        assert agent.returncode == 0, err[-4000:]
    two = read_metrics(dump)
    for a, b in zip(single, two, strict=True):
        for key in ("loss", "total_loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-6), key
        assert b["mtp_losses"] == pytest.approx(a["mtp_losses"], rel=1e-6)
