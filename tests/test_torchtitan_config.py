"""A torchtitan 0.2.x train config (tests/assets/torchtitan_debug_model.toml: every section and key torchtitan's
JobConfig documents, only the model and dataset edited) trains here; values asking for what this project lacks
are refused all in one message."""

import json
import subprocess
import textwrap
from pathlib import Path

import pytest

from launch import launcher_env
from titan_dsv4.config import ConfigError, load_config
from titan_dsv4.config.torchtitan_keys import TORCHTITAN_KEYS

REPO = Path(__file__).resolve().parent.parent
TORCHTITAN_TOML = str(REPO / "tests" / "assets" / "torchtitan_debug_model.toml")


@pytest.mark.slow
def test_a_torchtitan_config_trains_pipeline_parallel(tmp_path):
    """Through the README's launcher: 2 processes, PP=2 with MTP, op-level checkpointing, the first-step
    checkpoint, print_config and save_config_file honoured, [debug] seed mapped onto training.seed."""
    result = subprocess.run(["bash", "scripts/run_train.sh", "--job.dump_folder", str(tmp_path)], cwd=REPO,
                            env=launcher_env(CONFIG_FILE=TORCHTITAN_TOML), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and records[-1]["validation"] is not None
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == ["step-1", "step-3"]
    saved = json.loads((tmp_path / "job_config.json").read_text())
    assert saved["training"]["seed"] == 42 and saved["activation_checkpoint"]["selective_ac_option"] == "op"
    assert result.stdout.count("titan_dsv4: config\n{") == 1  # print_config, rank 0 only
    assert "titan_dsv4: finished step 3:" in result.stdout and str(tmp_path / "checkpoint" / "step-3") in result.stdout


def test_values_asking_for_missing_features_are_refused_in_one_message():
    argv = ["--job.config_file", TORCHTITAN_TOML, "--parallelism.tensor_parallel_degree", "2",
            "--model.converters", "quantize.linear.float8", "--training.enable_cpu_offload",
            "--parallelism.pipeline_parallel_split_points", "layers.2", "--validation.seq_len", "256",
            "--training.stpes", "4"]
    with pytest.raises(ConfigError) as info:
        load_config(argv)
    message = str(info.value)
    lines = message.splitlines()
    assert lines[0] == "6 problems in the configuration:" and len(lines) == 7, message
    for key, instead in [("parallelism.tensor_parallel_degree` = 2", "expert_parallel_degree"),
                         ("model.converters` = 'quantize.linear.float8'", "model.expert_qat"),
                         ("training.enable_cpu_offload` = True", "python -m titan_dsv4.plan"),
                         ("parallelism.pipeline_parallel_split_points` = 'layers.2'", "module_fqns_per_model_part"),
                         ("validation.seq_len` = 256", "validation uses training.seq_len"),
                         ("training.stpes", "did you mean `steps`")]:
        assert any(key in line and instead in line for line in lines), (key, message)


def test_renamed_keys_and_values_map_onto_ours(tmp_path):
    path = tmp_path / "old.toml"
    path.write_text(textwrap.dedent("""
        [job]
        print_args = true
        [checkpoint]
        enable_checkpoint = true
        async_mode = "async_with_pinned_mem"
        [lr_scheduler]
        lr_min = 0.1
        [training]
        compile = true
        [activation_checkpoint]
        mode = "selective"
        selective_ac_option = 3
        [debug]
        seed = 7
        deterministic = true
        [float8]
        enable_fsdp_float8_all_gather = true
    """))
    config = load_config(["--job.config_file", str(path), "--checkpoint.no_initial_load_model_only"])
    assert config.job.print_config and config.checkpoint.enable and config.checkpoint.async_mode == "async"
    assert config.lr_scheduler.min_lr_factor == 0.1 and config.compile.enable
    assert config.activation_checkpoint.selective_ac_option == "3"
    assert config.training.seed == 7 and config.training.deterministic
    assert config.checkpoint.initial_load_model_only is False


@pytest.mark.parametrize("argv,hint", [
    (["--training.stpes", "3"], "(did you mean `steps`?)"),
    (["--parallelism.pipeline_paralel_degree", "2"], "(did you mean `pipeline_parallel_degree`?)"),
    (["--parallelism.tensor_parallelism", "2"], None),  # no key is a close spelling of it
    (["--parallelism.sequence_parallel", "true"], None),
])
def test_did_you_mean_only_for_close_spellings(argv, hint):
    with pytest.raises(ConfigError) as info:
        load_config(argv)
    assert (hint in str(info.value)) if hint else ("did you mean" not in str(info.value)), str(info.value)


def test_the_docs_page_lists_every_torchtitan_key():
    page = (REPO / "docs" / "torchtitan.md").read_text()
    missing = [key for key in TORCHTITAN_KEYS if f"`{key}`" not in page]
    assert not missing, missing
