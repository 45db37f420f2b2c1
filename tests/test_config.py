"""Job config: precedence, parsing, and every bad-input class through the real CLI."""

import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from titan_dsv4.config import ConfigError, JobConfig, load_config
from titan_dsv4.config.manager import field_docs

REPO = Path(__file__).resolve().parent.parent


def write_toml(tmp_path, text):
    path = tmp_path / "job.toml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_defaults_then_toml_then_cli(tmp_path):
    path = write_toml(tmp_path, """
        [training]
        steps = 7
        seq_len = 64
        [parallelism]
        module_fqns_per_model_part = [["embed", "layers.0"], ["layers.1"]]
        [compile]
        components = ["model"]
    """)
    config = load_config(["--job.config_file", path, "--training.seq_len=128", "--checkpoint.enable",
                          "--optimizer.lr", "1e-3", "--mtp.num_layers", "2", "--lr_scheduler.decay_ratio", "none",
                          "--metrics.enable_tensorboard", "false"])
    assert config.training.steps == 7  # TOML over default
    assert config.training.seq_len == 128  # CLI over TOML
    assert config.training.local_batch_size == 8  # default
    assert config.checkpoint.enable is True  # bare flag
    assert config.optimizer.lr == 1e-3 and config.mtp.num_layers == 2
    assert config.lr_scheduler.decay_ratio is None and config.metrics.enable_tensorboard is False
    assert config.parallelism.module_fqns_per_model_part == [["embed", "layers.0"], ["layers.1"]]
    assert load_config(["--compile.components", "model,loss"]).compile.components == ["model", "loss"]


@pytest.mark.parametrize("argv,needle", [
    (["--trainingg.steps", "3"], "did you mean `training`"),
    (["--training.stpes", "3"], "did you mean `steps`"),
    (["--training.steps", "three"], "`training.steps` = 'three' is invalid: expected an integer"),
    (["--checkpoint.enable", "maybe"], "`checkpoint.enable`"),
    (["training.steps"], "unexpected argument"),
])
def test_parse_errors(argv, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        load_config(argv)


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "titan_dsv4.train", *args], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=120)


BAD_RUNS = [
    (["--training.stpes", "3"], "unknown config key `training.stpes` (did you mean `steps`?)"),
    (["--nosuch.key", "3"], "unknown config section `nosuch`"),
    (["--training.steps", "x"], "`training.steps` = 'x' is invalid"),
    (["--training.steps", "0"], "`training.steps` = 0 is invalid: must be >= 1"),
    (["--model.flavor", "huge"], "`model.flavor` = 'huge' is invalid: allowed debugmodel"),
    (["--lr_scheduler.decay_type", "step"], "allowed linear, sqrt, cosine"),
    (["--parallelism.pipeline_parallel_schedule", "Zigzag", "--parallelism.pipeline_parallel_degree", "2"],
     "`parallelism.pipeline_parallel_schedule` = 'Zigzag' is invalid"),
    (["--parallelism.pipeline_parallel_degree", "2"], "launched"),  # 1 process, pp 2
    (["--training.global_batch_size", "12"], "multiple of local_batch_size"),
    (["--parallelism.expert_parallel_degree", "2"], "must divide data_parallel_shard_degree x "
     "context_parallel_degree (1)"),
    (["--mtp.num_layers", "-1"], "`mtp.num_layers` = -1 is invalid"),
    (["--activation_checkpoint.selective_ac_option", "0"],
     "`activation_checkpoint.selective_ac_option` = '0' is invalid: allowed 'op' or a positive integer"),
    (["--model.attention_kernel", "flash"], "`model.attention_kernel` = 'flash' is invalid: allowed auto, torch"),
    (["--model.sinkhorn_kernel", "cuda"], "`model.sinkhorn_kernel` = 'cuda' is invalid: allowed auto, torch"),
    (["--model.expert_qat", "int4"], "`model.expert_qat` = 'int4' is invalid: allowed none, fp8, fp4"),
    (["--model.attention_qat"], "`model.attention_qat` = true needs the released attention's shapes: head_dim - "
     "qk_rope_head_dim = 16 must be a multiple of 64"),
    (["--checkpoint.export_quantize", "fp6"],
     "`checkpoint.export_quantize` = 'fp6' is invalid: allowed none, fp8, fp4"),
    (["--checkpoint.export_quantize", "fp4"], "`checkpoint.export_quantize` = 'fp4' formats the final Hugging Face "
     "export: set checkpoint.last_save_in_hf = true"),
    (["--lora.rank", "4", "--lora.target_modules", "attn.wo_a"],
     "`lora.target_modules` = 'attn.wo_a' is invalid: allowed attn.wq_a, attn.wq_b"),
    (["--lora.rank", "12", "--lora.target_modules", "attn.wq_a,ffn.experts.w1"],
     "`lora.rank` = 12 is invalid with adapters on ffn.experts.w1: the experts' grouped GEMMs need a multiple of 8"),
    (["--lora.expert_storage", "fp4"],
     "`lora.expert_storage` = 'fp4' stores the routed experts frozen: set lora.rank > 0"),
    (["--lora.rank", "8", "--lora.expert_storage", "fp4", "--model.expert_qat", "fp8"],
     "`model.expert_qat` = 'fp8' would round FP4-stored experts"),
    (["--lora.rank", "8", "--lora.expert_storage", "int4"],
     "`lora.expert_storage` = 'int4' is invalid: allowed dense, fp4"),
    (["--lora.rank", "4", "--training.indexer_loss_coeff", "1"],
     "`training.indexer_loss_coeff` = 1.0 trains the lightning indexer, but `lora.rank` > 0 freezes"),
    (["--optimizer.name", "Lion"], "`optimizer.name` = 'Lion' is invalid: allowed AdamW, Muon"),
    (["--optimizer.muon_momentum", "1"], "`optimizer.muon_momentum` = 1.0 is invalid: must be in [0, 1)"),
    (["--job.config_file", "/nonexistent.toml"], "no such file"),
    (["--training.dataset", "text", "--training.dataset_path", "/nonexistent"], "`training.dataset_path`"),
    (["--training.dataset_path", "corpus.txt"], "`training.dataset_path` = 'corpus.txt' is set, but "
     "`training.dataset` = 'pydocs' (the embedded corpus) reads no files: set it to 'text'"),
    (["--job.dump_folder", "README.md/out"], "`job.dump_folder` = 'README.md/out' is not writable: Not a directory"),
    (["--lr_scheduler.total_steps", "0"], "`lr_scheduler.total_steps` = 0 is invalid: must be >= 1"),
    (["--validation.enable", "--validation.steps", "0"], "`validation.steps` = 0 is invalid"),
    (["--training.shuffle"], "`training.shuffle` = true needs random access to the documents: dataset 'pretokenized'"),
    (["--validation.enable", "--validation.dataset", "text"], "`validation.dataset_path` = None is invalid"),
    (["--training.gc_freq", "0"], "`training.gc_freq` = 0 is invalid: must be >= 1"),
    (["--comm.train_timeout_seconds", "0"], "`comm.train_timeout_seconds` = 0 is invalid: must be >= 1"),
    (["--profiling.enable_profiling", "--profiling.profile_freq", "2"],
     "`profiling.profile_freq` = 2 is invalid: a cycle needs profiler_warmup + profiler_active = 4 steps or more"),
    (["--validation.enable", "--validation.steps", "1000"],  # 60 held-out documents: 5 batches of 8 x 256
     "`validation.dataset` = 'pydocs' (steps = 1000): the dataset holds 5 full global batches of 8 x 256"),
]


@pytest.mark.parametrize("argv,message", BAD_RUNS, ids=[m[:30] for _, m in BAD_RUNS])
def test_bad_input_exits_2_with_one_line(argv, message):
    result = run_cli("--job.config_file", str(REPO / "train_configs/debug_model.toml"),
                     "--parallelism.pipeline_parallel_degree", "1", *argv)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not result.stdout


@pytest.mark.parametrize("argv,world_size,key", [
    (["--parallelism.pipeline_parallel_degree", "2"], 2, "parallelism.pipeline_parallel_degree` = 2"),
    (["--parallelism.context_parallel_degree", "2"], 2, "parallelism.context_parallel_degree` = 2"),
    (["--lora.rank", "8", "--lora.expert_storage", "fp4"], 2, "lora.expert_storage` = 'fp4'"),
])
def test_layouts_needing_torch_2_13_are_refused_on_an_older_torch(monkeypatch, argv, world_size, key):
    """Each failed inside torch 2.11 (the lent GPU image's, the repository on PYTHONPATH) at its first step;
    one process trains there."""
    from torch.torch_version import TorchVersion

    from titan_dsv4.config.validate import validate

    base = ["--job.config_file", str(REPO / "train_configs/debug_model.toml"), "--parallelism.pipeline_parallel_degree",
            "1"]
    for version in (torch.__version__, "2.13.0a0+git1234"):  # this torch; a pre-release build (NGC containers')
        monkeypatch.setattr(torch, "__version__", TorchVersion(version))
        validate(load_config([*base, *argv]), world_size)
    monkeypatch.setattr(torch, "__version__", TorchVersion("2.11.0+cu130"))
    with pytest.raises(ConfigError, match=rf"`{key} needs torch >= 2.13 \(this is 2.11.0\+cu130\)"):
        validate(load_config([*base, *argv]), world_size)
    if argv[0].startswith("--lora"):
        validate(load_config([*base, *argv]), 1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has the CUDA allocator to record")
def test_memory_snapshots_without_cuda_exit_2():
    result = run_cli("--job.config_file", str(REPO / "train_configs/debug_model.toml"),
                     "--parallelism.pipeline_parallel_degree", "1", "--profiling.enable_memory_snapshot")
    assert result.returncode == 2
    assert result.stderr.strip() == ("titan_dsv4: config error: `profiling.enable_memory_snapshot` = true records the "
                                     "CUDA allocator: this machine has no CUDA device (profiling.enable_profiling "
                                     "traces CPU runs)")


@pytest.mark.parametrize("section", ["training", "validation"])
def test_unreadable_data_exits_2_before_any_model_is_built(tmp_path, section):
    """A folder without document files (for conversations: with text files) is caught by the config check; a
    jsonl without the dataset's field by reading its first document at start-up: one line naming the key,
    the file and the line, nothing trained."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "data.json").write_text('{"text": "a json file is not jsonl"}')
    (tmp_path / "wrong").mkdir()
    (tmp_path / "wrong" / "d.jsonl").write_text('{"content": "' + "word " * 400 + '"}\n')
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("plain text")
    enable = ["--validation.enable"] if section == "validation" else []
    for dataset, folder, message in [
            ("text", "empty", "is invalid: dataset 'text' needs an existing .txt/.jsonl/.jsonl.gz/.jsonl.zst/.parquet "
                              "file"),
            ("text", "wrong", f"{tmp_path / 'wrong' / 'd.jsonl'}:1: a jsonl record needs a string 'text'"),
            ("chat", "texts", f"holds .txt files ({tmp_path / 'texts' / 'a.txt'}): dataset 'chat' reads .jsonl/"),
            ("chat", "wrong", f"{tmp_path / 'wrong' / 'd.jsonl'}:1: a jsonl record needs a 'messages' list")]:
        path = str(tmp_path / folder)
        result = run_cli("--job.config_file", str(REPO / "train_configs/debug_model.toml"),
                         "--parallelism.pipeline_parallel_degree", "1", *enable, f"--{section}.dataset", dataset,
                         f"--{section}.dataset_path", path)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2 and len(lines) == 1 and not result.stdout, result.stderr
        assert f"`{section}.dataset_path` = {path!r}" in lines[0] and message in lines[0], lines[0]


def test_world_size_mismatch_is_caught_before_any_process_group():
    result = run_cli("--job.config_file", str(REPO / "train_configs/debug_model.toml"),
                     "--parallelism.pipeline_parallel_degree", "1", "--parallelism.data_parallel_shard_degree", "2",
                     env={"WORLD_SIZE": "3"})
    assert result.returncode == 2 and "3 processes were launched" in result.stderr


def test_expert_parallel_degree_must_divide_the_experts():
    result = run_cli("--job.config_file", str(REPO / "train_configs/debug_model.toml"),
                     "--parallelism.pipeline_parallel_degree", "1", "--parallelism.expert_parallel_degree", "3",
                     "--parallelism.data_parallel_shard_degree", "3", env={"WORLD_SIZE": "3"})
    assert result.returncode == 2 and "must divide the model's n_routed_experts (8)" in result.stderr


@pytest.mark.parametrize("world,argv,message", [
    (3, ["--parallelism.context_parallel_degree", "3"], "`parallelism.context_parallel_degree` = 3 is invalid: it "
     "must divide training.seq_len (64)"),
    (4, ["--parallelism.context_parallel_degree", "4"], "shards of training.seq_len / 4 = 16 tokens are shorter "
     "than the 32 tokens of the previous shard"),
    (2, ["--parallelism.context_parallel_degree", "2", "--parallelism.expert_parallel_degree", "4"],
     "must divide data_parallel_shard_degree x context_parallel_degree (2)"),
])
def test_context_parallel_degree_is_checked_before_any_process_group(world, argv, message):
    result = run_cli("--job.config_file", str(REPO / "train_configs/debug_model.toml"), "--training.seq_len", "64",
                     "--parallelism.pipeline_parallel_degree", "1", *argv, env={"WORLD_SIZE": str(world)})
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_help_lists_every_key_with_the_value_this_command_line_gives():
    """``--help`` through the real CLI: every field of every JobConfig section, at the value the file and the
    overrides give (the default noted where it differs); exit 0, no training. Every field is described."""
    config_file = REPO / "train_configs/debug_model.toml"
    result = run_cli("--job.config_file", str(config_file), "--training.steps", "7", "--help")
    assert result.returncode == 0 and not result.stderr, result.stderr
    loaded = load_config(["--job.config_file", str(config_file), "--training.steps", "7"])
    text = result.stdout
    for section in dataclasses.fields(JobConfig):
        body = text.split(f"\n[{section.name}]\n", 1)[1].split("\n[", 1)[0]
        keys = [ln.split(" = ", 1)[0].strip() for ln in body.splitlines() if ln.startswith("  ") and
                not ln.startswith("   ")]
        fields = dataclasses.fields(getattr(loaded, section.name))
        assert keys == [f.name for f in fields], section.name
        docs = field_docs(type(getattr(loaded, section.name)))
        assert all(docs.get(f.name) for f in fields), {f.name for f in fields} - set(docs)
    lines: dict[str, str] = {}  # section.key -> its line and the indented lines continuing it, joined
    section = key = None
    for ln in text.splitlines():
        if ln.startswith("[") and ln.endswith("]"):
            section = ln[1:-1]
        elif ln.startswith("   ") and key:
            lines[key] += " " + ln.strip()
        else:
            key = f"{section}." + ln.split(" = ", 1)[0].strip() if ln.startswith("  ") else None
            if key:
                lines[key] = ln
    assert lines["training.steps"].startswith("  steps = 7 ") and lines["training.steps"].endswith(
        f"[default: {JobConfig().training.steps}]"), lines["training.steps"]
    assert lines["validation.steps"].startswith("  steps = -1 ")  # another section's key of the same name
    assert lines["parallelism.pipeline_parallel_degree"].startswith(
        f"  pipeline_parallel_degree = {loaded.parallelism.pipeline_parallel_degree} ")
    assert lines["model.flavor"].startswith(f'  flavor = "{loaded.model.flavor}"')
    assert lines["job.config_file"].startswith(f'  config_file = "{config_file}"')


def test_help_still_names_a_bad_key_and_the_planner_has_it_too():
    result = run_cli("--training.stpes", "3", "--help")
    assert result.returncode == 2 and "did you mean `steps`" in result.stderr
    plan = subprocess.run([sys.executable, "-m", "titan_dsv4.plan", "-h"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert plan.returncode == 0 and plan.stdout.startswith("usage: python -m titan_dsv4.plan [--ngpu N]")
    assert "  selective_ac_option = " in plan.stdout


def test_help_into_a_reader_that_stopped_is_not_an_error():
    """``--help | head``: the reader is gone before the reference is written; exit 0 without a traceback."""
    process = subprocess.Popen([sys.executable, "-m", "titan_dsv4.train", "--help"], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # before the interpreter has even imported torch
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=120) == 0 and "Traceback" not in stderr, stderr


def test_the_configuration_reference_is_current():
    """docs/configuration.md is generated from the config classes: regenerate it with
    `python -m titan_dsv4.config > docs/configuration.md`."""
    from titan_dsv4.config.manager import reference_markdown

    assert (REPO / "docs" / "configuration.md").read_text() == reference_markdown()
