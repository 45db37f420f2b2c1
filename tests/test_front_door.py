"""What a new user meets first: the package with its declared dependencies only, the launchers' one-message
config errors, the first install's notice, the end-of-run summary, and docs that name files that exist."""

import json
import os
import re
import socket
import subprocess
import sys
import textwrap

import pytest

from launch import DEBUG_TOML, REPO, launcher_env, training_command

OPTIONAL = ("triton", "transformers", "tensorboard", "wandb", "pyarrow", "zstandard")


def test_declared_dependencies_are_enough(tmp_path):
    """With every optional package unimportable (Triton, the test and logging extras), the entry points import,
    the planner plans a config that asks for TensorBoard, and the trainer trains a step."""
    script = textwrap.dedent(f"""
        import sys
        for name in {OPTIONAL!r}:
            sys.modules[name] = None  # import fails as if not installed
        import titan_dsv4.check, titan_dsv4.convert, titan_dsv4.plan, titan_dsv4.pretokenize, titan_dsv4.train
        from titan_dsv4.models.deepseek_v4 import attention_kernel
        assert attention_kernel.triton is None
        assert titan_dsv4.plan.main(["--job.config_file", {DEBUG_TOML!r}, "--device", "cpu", "--ngpu", "2",
                                     "--metrics.enable_tensorboard", "true"]) == 0
        assert titan_dsv4.train.main(["--job.config_file", {DEBUG_TOML!r}, "--job.dump_folder", {str(tmp_path)!r},
                                      "--parallelism.pipeline_parallel_degree", "1", "--training.steps", "1",
                                      "--training.seq_len", "64", "--validation.enable", "false"]) == 0
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0 and result.stdout.endswith("ok\n"), result.stdout[-2000:] + result.stderr[-3000:]
    assert "pp rank  stages" in result.stdout and "finished step 1" in result.stdout


@pytest.mark.parametrize("argv,env,message", [
    (["--training.steps", "0"], {}, "titan_dsv4: config error: `training.steps` = 0 is invalid: must be >= 1"),
    ([], {"NGPU": "3"}, "3"),  # PP=2 does not divide the 3 processes about to start
])
def test_run_train_checks_the_config_before_torchrun(argv, env, message):
    result = subprocess.run(["bash", "scripts/run_train.sh", *argv], cwd=REPO, env=launcher_env(**env),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0] and "config error" in lines[0], result.stderr
    assert not result.stdout


def test_inside_a_launched_job_only_rank_0_prints_a_config_error(tmp_path):
    """torchrun started by hand (no launcher check): every rank exits 2, the message is printed once."""
    cmd, env = training_command(tmp_path, "--training.steps", "0", nproc=2)
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert output.count("titan_dsv4: config error: `training.steps` = 0 is invalid: must be >= 1") == 1, output


@pytest.mark.parametrize("argv,rc,stderr", [
    (["--parallelism.data_parallel_shard_degree", "1"], 0, ""),  # PP 2 x FSDP 1: the config names 2 ranks
    (["--ngpu", "4", "--parallelism.data_parallel_shard_degree", "1"], 2, "titan_dsv4: config error: "),
    ([], 2, "`parallelism.data_parallel_shard_degree` = -1 takes what the world size leaves: pass --ngpu N"),
])
def test_the_check_takes_the_world_size_from_the_config_or_ngpu(tmp_path, argv, rc, stderr):
    result = subprocess.run([sys.executable, "-m", "titan_dsv4.check", "--job.config_file", DEBUG_TOML,
                             "--job.dump_folder", str(tmp_path), *argv], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == rc and stderr in result.stderr and not result.stdout, result.stderr
    assert len(result.stderr.splitlines()) == (1 if rc else 0)


def test_run_train_help_prints_once():
    result = subprocess.run(["bash", "scripts/run_train.sh", "--help"], cwd=REPO, env=launcher_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.count("usage: python -m titan_dsv4.train") == 1, result.stderr


def test_node_script_dry_run_outside_slurm(tmp_path):
    result = subprocess.run(["bash", "scripts/slurm/node.sh", DEBUG_TOML, "--job.dump_folder", str(tmp_path)],
                            cwd=REPO, env=launcher_env(DRY_RUN="1", NPROC_PER_NODE="2"), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    out = result.stdout.split()
    assert out[out.index("--nnodes") + 1] == "1" and out[out.index("--node_rank") + 1] == "0"
    assert out[out.index("--rdzv_endpoint") + 1] == f"{socket.gethostname()}:29500"
    assert out[out.index("--rdzv_id") + 1] == "local"


@pytest.mark.parametrize("node,printed", [("0", True), ("1", False)])
def test_node_script_refuses_a_bad_config_once_per_job(node, printed):
    env = launcher_env(SLURM_JOB_ID="9", SLURM_NNODES="2", SLURM_NODEID=node, NPROC_PER_NODE="1", MASTER_ADDR="h0")
    result = subprocess.run(["bash", "scripts/slurm/node.sh", DEBUG_TOML, "--training.steps", "0"], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and not result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == (["titan_dsv4: config error: `training.steps` = 0 is invalid: must be >= 1"] if printed else [])


def test_the_first_install_says_what_it_does(tmp_path):
    """The bootstrap tells the user why the first command is quiet for a while, once."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    calls = tmp_path / "calls"
    (venv / "bin" / "python").write_text(f"#!/bin/bash\necho \"$*\" >> {calls}\n")
    (venv / "bin" / "python").chmod(0o755)
    command = "source scripts/_bootstrap.sh '' && echo \"PY=$PY\""
    env = {**os.environ, "VENV": str(venv), "USE_VENV": "1"}
    first = subprocess.run(["bash", "-c", command], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    second = subprocess.run(["bash", "-c", command], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0 and f"PY={venv}/bin/python" in first.stdout, first.stderr
    assert f"titan_dsv4: installing the package into {venv}" in first.stderr
    assert "installing" not in second.stderr  # installed once
    assert "-m pip install" in calls.read_text()


def test_a_new_run_keeps_the_earlier_runs_metrics_apart(tmp_path):
    """A run that resumes nothing starts its own metrics.jsonl (the earlier one is kept as metrics-1.jsonl);
    a resumed run appends. One process saves checkpoints without torch's warnings, and the run ends with a
    summary naming its outputs."""
    small = ("--training.seq_len", "64", "--training.local_batch_size", "2", "--validation.enable", "false")

    def run(*args):
        cmd, env = training_command(tmp_path, *small, *args)
        result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    def steps(name="metrics.jsonl"):
        return [json.loads(line)["step"] for line in (tmp_path / name).read_text().splitlines()]

    run("--training.steps", "2")
    run("--training.steps", "1")
    assert steps() == [1] and steps("metrics-1.jsonl") == [1, 2]
    first = run("--training.steps", "2", "--checkpoint.enable", "--checkpoint.interval", "1")
    assert steps() == [1, 2] and steps("metrics-2.jsonl") == [1]
    resumed = run("--training.steps", "3", "--checkpoint.enable", "--checkpoint.interval", "1")
    assert steps() == [1, 2, 3] and not (tmp_path / "metrics-3.jsonl").exists()
    for result in (first, resumed):
        assert "Warning" not in result.stderr, result.stderr
    lines = resumed.stdout.splitlines()
    end = lines.index(next(line for line in lines if line.startswith("titan_dsv4: finished step 3: loss ")))
    assert lines[end + 1].startswith("  1 steps in ") and "tokens/s" in lines[end + 1]
    assert lines[end + 2:] == [f"  metrics:    {tmp_path / 'metrics.jsonl'}",
                               f"  checkpoint: {tmp_path / 'checkpoint' / 'step-3'}"]


def test_convert_help_describes_every_argument():
    out = subprocess.run([sys.executable, "-m", "titan_dsv4.convert", "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    for needle in ("which way to convert", "the Hugging Face folder (hf-to-dcp)", "the folder to write",
                   "dtype of the written tensors", "MTP depths to keep", "Base release's FP8", "largest output"):
        assert needle in " ".join(out.split()), needle


def test_every_file_the_docs_and_scripts_name_exists():
    """Paths of configs, scripts and docs pages named in the README, docs/, scripts/ and the configs."""
    texts = [REPO / "README.md", *(REPO / "docs").glob("*.md"), *(REPO / "scripts").rglob("*.sh"),
             REPO / "scripts" / "slurm" / "train.sbatch", *(REPO / "train_configs").glob("*.toml")]
    pattern = re.compile(r"(?<![\w/.])((?:train_configs|scripts|docs|tests)/[\w./-]+\.(?:toml|csv|sh|sbatch|md|py))")
    missing = {(text.name, name) for text in texts for name in pattern.findall(text.read_text())
               if not (REPO / name).exists()}
    assert not missing, sorted(missing)
    output = re.search(r"#SBATCH --output=(\S+)/", (REPO / "scripts/slurm/train.sbatch").read_text()).group(1)
    assert (REPO / output).is_dir()  # SLURM does not create it
