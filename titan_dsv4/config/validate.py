"""Check a JobConfig for meaning and resolve everything derived from it — before any process group,
model weight or data exists. Every failure is a one-line :class:`ConfigError`."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..components.dataloader import (DATA_SUFFIXES, DATASETS, FORMATS, OPTIONAL_READERS, DataError, data_files,
                                     data_suffix)
from ..components.pretokenized import check_tokenizer, pretokenized_parts
from ..components.quantization import FP4_GROUP, QUANTIZE_FORMATS
from ..models.deepseek_v4.args import EXPERT_STORAGE
from ..models.deepseek_v4.lora import LORA_TARGETS
from ..models.deepseek_v4.qat import attention_qat_mismatch
from .job_config import JobConfig
from .manager import ConfigError

AC_MODES = ("none", "full", "selective")
KERNEL_CHOICES = ("auto", "torch")
RESHARD_POLICIES = ("default", "always", "never")
DTYPES = ("float32", "bfloat16", "float16")
OPTIMIZER_IMPLS = ("for-loop", "foreach", "fused")


@dataclass
class RunSetup:
    """What the trainer builds from: validated and resolved."""

    spec: Any  # TrainSpec
    model_args: Any
    tokenizer: Any
    parallel_dims: Any
    grad_accum_steps: int
    global_batch_size: int
    pipeline_plan: Any | None
    meta_model: Any | None  # the meta-device model the plan was made on (its hooks may have added modules)


def _with_adapters(model_args: Any, lora: Any) -> Any:
    """The model args with the ``[lora]`` section's adapters (the section decides, whatever a checkpoint's
    config.json says)."""
    _at_least("lora.rank", lora.rank, 0)
    if lora.rank:
        if not lora.alpha > 0:
            raise ConfigError(f"`lora.alpha` = {lora.alpha!r} is invalid: must be > 0")
        if not lora.target_modules:
            raise ConfigError("`lora.target_modules` = [] is invalid: name at least one of " + ", ".join(LORA_TARGETS))
        for target in lora.target_modules:
            _choice("lora.target_modules", target, LORA_TARGETS)
        experts = [t for t in lora.target_modules if t.startswith("ffn.experts.")]
        if experts and lora.rank % 8:  # torch._grouped_mm's operands need 16-byte aligned rows
            raise ConfigError(f"`lora.rank` = {lora.rank} is invalid with adapters on {', '.join(experts)}: the "
                              "experts' grouped GEMMs need a multiple of 8")
    return dataclasses.replace(model_args, lora_rank=lora.rank, lora_alpha=lora.alpha,
                               lora_targets=list(lora.target_modules), expert_storage=lora.expert_storage)


def _choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"`{key}` = {value!r} is invalid: allowed {', '.join(map(str, allowed))}")


def _at_least(key: str, value: float, low: float) -> None:
    if value < low:
        raise ConfigError(f"`{key}` = {value!r} is invalid: must be >= {low}")


def validate(config: JobConfig, world_size: int) -> RunSetup:
    from ..components.optimizer import DECAY_TYPES
    from ..components.tokenizer import Tokenizer
    from ..distributed.parallel_dims import ParallelDims
    from ..protocols.train_spec import get_train_spec, list_train_specs

    t, p = config.training, config.parallelism
    for key, low in (("training.steps", 1), ("training.seq_len", 1), ("training.local_batch_size", 1),
                     ("metrics.log_freq", 1), ("lr_scheduler.warmup_steps", 0), ("optimizer.lr", 0.0),
                     ("optimizer.weight_decay", 0.0), ("mtp.loss_scaling_factor", 0.0),
                     ("training.expert_bias_update_speed", 0.0), ("training.indexer_loss_coeff", 0.0),
                     ("checkpoint.interval", 1), ("training.gc_freq", 1),
                     ("checkpoint.keep_latest_k", 0), ("checkpoint.preemption_grace_s", 0.0),
                     ("comm.init_timeout_seconds", 1), ("comm.train_timeout_seconds", 1)):
        section, name = key.split(".")
        _at_least(key, getattr(getattr(config, section), name), low)
    lr = config.lr_scheduler
    if lr.total_steps is not None:
        _at_least("lr_scheduler.total_steps", lr.total_steps, 1)
    if lr.decay_ratio is not None and not 0.0 <= lr.decay_ratio <= 1.0:
        raise ConfigError(f"`lr_scheduler.decay_ratio` = {lr.decay_ratio} is invalid: must be in [0, 1] or unset")
    if not 0.0 <= lr.min_lr_factor <= 1.0:
        raise ConfigError(f"`lr_scheduler.min_lr_factor` = {lr.min_lr_factor} is invalid: must be in [0, 1]")
    _choice("lr_scheduler.decay_type", lr.decay_type, DECAY_TYPES)
    _choice("optimizer.name", config.optimizer.name, ("AdamW", "Muon"))
    if not 0.0 <= config.optimizer.muon_momentum < 1.0:
        raise ConfigError(f"`optimizer.muon_momentum` = {config.optimizer.muon_momentum!r} is invalid: must be in "
                          "[0, 1)")
    if not config.optimizer.muon_update_rms > 0.0:
        raise ConfigError(f"`optimizer.muon_update_rms` = {config.optimizer.muon_update_rms!r} is invalid: must be "
                          "> 0")
    _choice("optimizer.implementation", config.optimizer.implementation, OPTIMIZER_IMPLS)
    _choice("activation_checkpoint.mode", config.activation_checkpoint.mode, AC_MODES)
    _choice("model.attention_kernel", config.model.attention_kernel, KERNEL_CHOICES)
    _choice("model.sinkhorn_kernel", config.model.sinkhorn_kernel, KERNEL_CHOICES)
    _choice("model.expert_qat", config.model.expert_qat, ("none", *QUANTIZE_FORMATS))
    option = config.activation_checkpoint.selective_ac_option
    if not (option == "op" or (option.isdigit() and int(option) >= 1)):
        raise ConfigError(f"`activation_checkpoint.selective_ac_option` = {option!r} is invalid: allowed 'op' or "
                          "a positive integer N (recompute every N-th block)")
    _choice("parallelism.fsdp_reshard_after_forward", p.fsdp_reshard_after_forward, RESHARD_POLICIES)
    _choice("training.mixed_precision_param", t.mixed_precision_param, DTYPES)
    _choice("training.mixed_precision_reduce", t.mixed_precision_reduce, DTYPES)
    _choice("checkpoint.async_mode", config.checkpoint.async_mode, ("disabled", "async"))
    if p.pipeline_parallel_degree > 1 and not p.pipeline_parallel_schedule_csv:
        from ..distributed.pipeline import SCHEDULES

        _choice("parallelism.pipeline_parallel_schedule", p.pipeline_parallel_schedule, SCHEDULES)
    for component in config.compile.components:
        _choice("compile.components", component, ("model", "loss"))
    if config.compile.enable:
        _choice("compile.backend", config.compile.backend,
                sorted({"eager", "aot_eager", *torch._dynamo.list_backends()}))
    _check_profiling(config.profiling)
    sources = [("training", t.dataset, t.dataset_path)]
    if config.validation.enable:
        v = config.validation
        _at_least("validation.freq", v.freq, 1)
        if v.steps == 0 or v.steps < -1:
            raise ConfigError(f"`validation.steps` = {v.steps} is invalid: a number of batches >= 1, or -1 for "
                              "one pass over the dataset")
        sources.append(("validation", v.dataset, v.dataset_path))
    if t.shuffle and t.dataset != "pretokenized":
        raise ConfigError(f"`training.shuffle` = true needs random access to the documents: dataset "
                          f"'pretokenized' (python -m titan_dsv4.pretokenize), not {t.dataset!r}")
    for section, dataset, path in sources:
        _choice(f"{section}.dataset", dataset, DATASETS)
        if dataset == "pydocs" and path:
            raise ConfigError(f"`{section}.dataset_path` = {path!r} is set, but `{section}.dataset` = 'pydocs' (the "
                              "embedded corpus) reads no files: set it to 'text' (documents), 'chat' "
                              "(conversations) or 'pretokenized'")
        if dataset in FORMATS:
            _check_dataset_files(f"{section}.dataset_path", path, dataset)
        elif dataset == "pretokenized":
            _check_pretokenized(f"{section}.dataset_path", path)

    try:
        spec = get_train_spec(config.model.name)
    except KeyError:
        raise ConfigError(f"`model.name` = {config.model.name!r} is invalid: allowed "
                          f"{', '.join(list_train_specs())}") from None
    if config.model.flavor not in spec.model_args:
        raise ConfigError(f"`model.flavor` = {config.model.flavor!r} is invalid: allowed "
                          f"{', '.join(spec.model_args)}")
    model_args = spec.model_args[config.model.flavor]
    ck = config.checkpoint
    if ck.initial_load_in_hf and not ck.initial_load_path:  # as torchtitan: the HF assets hold the weights
        if not config.model.hf_assets_path:
            raise ConfigError("`checkpoint.initial_load_in_hf` = true needs the Hugging Face folder: set "
                              "checkpoint.initial_load_path or model.hf_assets_path")
        ck.initial_load_path = config.model.hf_assets_path
    if ck.initial_load_path:
        hf_config = Path(ck.initial_load_path) / "config.json"
        if not ck.initial_load_in_hf and not (Path(ck.initial_load_path) / ".metadata").is_file():
            raise ConfigError(f"`checkpoint.initial_load_path` = {ck.initial_load_path!r} is invalid: no DCP "
                              "checkpoint there (.metadata); for a Hugging Face folder set initial_load_in_hf")
        if not ck.initial_load_model_only and (ck.initial_load_in_hf or not ck.enable):
            raise ConfigError("`checkpoint.initial_load_model_only` = false loads a whole training state: it "
                              "needs a DCP checkpoint (initial_load_in_hf = false) and checkpoint.enable = true")
        if ck.initial_load_in_hf and not hf_config.is_file():
            raise ConfigError(f"`checkpoint.initial_load_path` = {ck.initial_load_path!r} is invalid: "
                              "no config.json there (a Hugging Face checkpoint folder is expected)")
        if hf_config.is_file():
            try:  # the checkpoint decides the shape; model.flavor is ignored
                model_args = type(model_args).from_hf_config(hf_config)
            except ValueError as e:
                raise ConfigError(f"{hf_config}: {e}") from None
            if model_args.lora_rank and config.lora.rank != model_args.lora_rank:  # adapters would be dropped
                raise ConfigError(f"`checkpoint.initial_load_path` = {ck.initial_load_path!r} holds LoRA adapters "
                                  f"of rank {model_args.lora_rank} (its config.json): set lora.rank = "
                                  f"{model_args.lora_rank} to train them on, or start from its merged weights "
                                  "(python -m titan_dsv4.convert dcp-to-hf, then initial_load_in_hf)")
            # a model-only load re-encodes the experts; a whole training state continues as it was stored
            if (not ck.initial_load_in_hf and not ck.initial_load_model_only
                    and model_args.expert_storage != config.lora.expert_storage):
                raise ConfigError(f"`checkpoint.initial_load_path` = {ck.initial_load_path!r} stores its routed "
                                  f"experts as {model_args.expert_storage!r} (its config.json): set "
                                  f"lora.expert_storage = {model_args.expert_storage!r}, or load its model only "
                                  "(checkpoint.initial_load_model_only = true)")
    if ck.enable and ck.load_step >= 0:
        from ..components.checkpoint import complete_steps

        steps = complete_steps(Path(config.job.dump_folder) / ck.folder)
        if ck.load_step not in steps:
            raise ConfigError(f"`checkpoint.load_step` = {ck.load_step} is invalid: complete checkpoints in "
                              f"{Path(config.job.dump_folder) / ck.folder}: {steps or 'none'}")
    _choice("checkpoint.export_dtype", ck.export_dtype, DTYPES)
    _choice("checkpoint.export_quantize", ck.export_quantize, ("none", *QUANTIZE_FORMATS))
    if ck.export_quantize != "none" and not ck.last_save_in_hf:
        raise ConfigError(f"`checkpoint.export_quantize` = {ck.export_quantize!r} formats the final Hugging Face "
                          "export: set checkpoint.last_save_in_hf = true (or convert a checkpoint later with "
                          "python -m titan_dsv4.convert dcp-to-hf --quantize)")
    _choice("lora.expert_storage", config.lora.expert_storage, EXPERT_STORAGE)
    if config.lora.expert_storage == "fp4":
        if not config.lora.rank:
            raise ConfigError("`lora.expert_storage` = 'fp4' stores the routed experts frozen: set lora.rank > 0 "
                              "(LoRA), or 'dense' to train them")
        if config.model.expert_qat == "fp8":
            raise ConfigError("`model.expert_qat` = 'fp8' would round FP4-stored experts (`lora.expert_storage` = "
                              "'fp4') to FP8: set it to 'none' or 'fp4'")
    for key, fmt in (("model.expert_qat", config.model.expert_qat), ("checkpoint.export_quantize", ck.export_quantize),
                     ("lora.expert_storage", config.lora.expert_storage)):
        if fmt == "fp4" and (model_args.hidden_size % FP4_GROUP or model_args.moe_intermediate_size % FP4_GROUP):
            raise ConfigError(f"`{key}` = 'fp4' needs the experts' input widths (hidden_size "
                              f"{model_args.hidden_size}, moe_intermediate_size {model_args.moe_intermediate_size}) "
                              f"to be multiples of {FP4_GROUP}, the FP4 scale group")
    if config.model.attention_qat and (problem := attention_qat_mismatch(model_args)):
        raise ConfigError(f"`model.attention_qat` = true needs the released attention's shapes: {problem}")
    if config.mtp.num_layers is not None:
        _at_least("mtp.num_layers", config.mtp.num_layers, 0)
        model_args = model_args.with_mtp_layers(config.mtp.num_layers)
    model_args = _with_adapters(model_args, config.lora)
    if config.lora.rank and t.indexer_loss_coeff > 0:
        raise ConfigError(f"`training.indexer_loss_coeff` = {t.indexer_loss_coeff} trains the lightning indexer, but "
                          "`lora.rank` > 0 freezes every weight but the adapters: set it to 0")

    tokenizer_path = config.model.tokenizer_path or config.model.hf_assets_path
    try:
        tokenizer = Tokenizer(tokenizer_path)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"`model.tokenizer_path` = {tokenizer_path!r} is invalid: {e}") from None
    if tokenizer.vocab_size > model_args.vocab_size:
        raise ConfigError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens but model flavor "
                          f"{config.model.flavor!r} has vocab_size {model_args.vocab_size}")
    for section, dataset, path in sources:
        if dataset == "pretokenized":
            try:
                check_tokenizer(path, tokenizer)
            except DataError as e:
                raise ConfigError(f"`{section}.dataset_path` = {path!r}: {e}") from None

    parallel_dims = ParallelDims(dp_replicate=p.data_parallel_replicate_degree,
                                 dp_shard=p.data_parallel_shard_degree, pp=p.pipeline_parallel_degree,
                                 ep=p.expert_parallel_degree, world_size=world_size, cp=p.context_parallel_degree)
    _check_context_parallel(parallel_dims.cp, t.seq_len, model_args)
    _check_torch_supports(parallel_dims, config.lora.expert_storage)
    if model_args.n_routed_experts % parallel_dims.ep:
        raise ConfigError(f"`parallelism.expert_parallel_degree` = {parallel_dims.ep} is invalid: it must divide "
                          f"the model's n_routed_experts ({model_args.n_routed_experts})")
    per_step = t.local_batch_size * parallel_dims.dp
    global_batch = t.global_batch_size if t.global_batch_size > 0 else per_step
    if global_batch % per_step:
        raise ConfigError(f"`training.global_batch_size` = {global_batch} is invalid: must be a multiple of "
                          f"local_batch_size x data-parallel degree = {per_step}")
    plan = meta_model = None
    if parallel_dims.pp_enabled:
        from ..distributed.pipeline import plan_pipeline

        if p.pipeline_parallel_layers_per_stage:  # unset or 0: one stage per rank (two for looped schedules)
            _at_least("parallelism.pipeline_parallel_layers_per_stage", p.pipeline_parallel_layers_per_stage, 1)

        with torch.device("meta"):
            meta_model = spec.model_cls(model_args)
        plan = plan_pipeline(meta_model, config, parallel_dims.pp, t.local_batch_size)
        _check_checkpointing_fits_the_schedule(config, plan)
    elif p.module_fqns_per_model_part:
        raise ConfigError("`parallelism.module_fqns_per_model_part` needs pipeline_parallel_degree > 1")
    return RunSetup(spec=spec, model_args=model_args, tokenizer=tokenizer, parallel_dims=parallel_dims,
                    grad_accum_steps=global_batch // per_step, global_batch_size=global_batch,
                    pipeline_plan=plan, meta_model=meta_model)


def _check_context_parallel(cp: int, seq_len: int, model_args) -> None:
    """Each shard's attention reads the previous shard's last ``context_parallel_halo`` tokens, so a shard must
    hold that many."""
    if cp == 1:
        return
    if seq_len % cp:
        raise ConfigError(f"`parallelism.context_parallel_degree` = {cp} is invalid: it must divide training.seq_len "
                          f"({seq_len}) into equal shards")
    halo = model_args.context_parallel_halo
    if seq_len // cp < halo:
        raise ConfigError(f"`parallelism.context_parallel_degree` = {cp} is invalid: shards of training.seq_len / "
                          f"{cp} = {seq_len // cp} tokens are shorter than the {halo} tokens of the previous shard "
                          f"each shard's attention reads (sliding window, compressor windows); at most "
                          f"{max(1, seq_len // halo)} shards of this sequence length")


def _check_torch_supports(dims, expert_storage: str) -> None:
    """The package asks for torch >= 2.13, but an older one on ``PYTHONPATH`` (a GPU image's 2.11, say) runs
    one-process layouts. These need 2.13: before it, the pipeline schedules cannot split the step's 0-dim
    token count into microbatches, the context-parallel all-gather's backward rejects a non-contiguous
    gradient, and FSDP2 cannot shard the integer bytes of FP4-stored experts (found under torch 2.11.0)."""
    if tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 13):  # 2.13.0a0 builds (NGC) too
        return
    for key, value, used in (("parallelism.pipeline_parallel_degree", dims.pp, dims.pp > 1),
                             ("parallelism.context_parallel_degree", dims.cp, dims.cp > 1),
                             ("lora.expert_storage", "'fp4'", expert_storage == "fp4" and dims.world_size > 1)):
        if used:
            raise ConfigError(f"`{key}` = {value} needs torch >= 2.13 (this is {torch.__version__}): upgrade "
                              "torch, or train in one process")


def _check_checkpointing_fits_the_schedule(config: JobConfig, plan) -> None:
    """Op-level selective checkpointing allows one backward through each checkpointed region (torch refuses
    a second: "Trying to backward an extra time"); zero-bubble schedules take a stage's backward in two,
    input gradients (I) then weight gradients (W). Whole-block recompute allows both."""
    from ..distributed.pipeline import schedule_actions

    ac = config.activation_checkpoint
    if not (ac.mode == "selective" and ac.selective_ac_option == "op"):
        return
    if any(kind == "W" for rank in range(plan.pp) for kind, _ in schedule_actions(plan, rank)):
        raise ConfigError(f"`activation_checkpoint.selective_ac_option` = 'op' does not work with pipeline schedule "
                          f"{plan.schedule}: it splits each backward into input and weight passes, and torch's "
                          "selective checkpointing allows one; use mode 'full', selective_ac_option 'N', or a "
                          "schedule without W actions (1F1B, GPipe, Interleaved1F1B, LoopedBFS)")


def validate_run(config: JobConfig, world_size: int) -> RunSetup:
    """Everything the trainer checks before it starts, which ``python -m titan_dsv4.check`` runs for launchers."""
    setup = validate(config, world_size)
    check_run_environment(config)
    return setup


def check_run_environment(config: JobConfig) -> None:
    """What a run needs of this machine beyond a valid config (the planner needs none of it): the logging
    packages it asks for, and a dump folder it can write (every rank writes checkpoints there; rank 0 the
    metrics)."""
    for key, package, extra in (("enable_tensorboard", "tensorboard", "metrics"), ("enable_wandb", "wandb", "wandb")):
        if getattr(config.metrics, key) and importlib.util.find_spec(package) is None:
            raise ConfigError(f"`metrics.{key}` = true needs the {package} package: pip install "
                              f"'titan_dsv4[{extra}]'")
    dump_folder = config.job.dump_folder
    folder = Path(dump_folder)
    probe = folder / f".write-test-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"`job.dump_folder` = {dump_folder!r} is not writable: {e.strerror or e}") from None


def _check_profiling(prof) -> None:
    if prof.enable_profiling:
        _at_least("profiling.profiler_warmup", prof.profiler_warmup, 0)
        _at_least("profiling.profiler_active", prof.profiler_active, 1)
        if prof.profile_freq < prof.profiler_warmup + prof.profiler_active:
            raise ConfigError(f"`profiling.profile_freq` = {prof.profile_freq} is invalid: a cycle needs "
                              f"profiler_warmup + profiler_active = {prof.profiler_warmup + prof.profiler_active} "
                              "steps or more")
    if prof.enable_memory_snapshot:
        _at_least("profiling.profile_freq", prof.profile_freq, 1)
        if not torch.cuda.is_available():
            raise ConfigError("`profiling.enable_memory_snapshot` = true records the CUDA allocator: this machine "
                              "has no CUDA device (profiling.enable_profiling traces CPU runs)")


def _check_pretokenized(key: str, path: str | None) -> None:
    """The path is a complete pretokenized dataset (its tokenizer is checked once the run's is known)."""
    if not path:
        raise ConfigError(f"`{key}` is unset: dataset 'pretokenized' needs the folder python -m "
                          "titan_dsv4.pretokenize wrote")
    try:
        pretokenized_parts(path)
    except DataError as e:
        raise ConfigError(f"`{key}` = {path!r} is invalid: {e}") from None


def _check_dataset_files(key: str, path: str | None, dataset: str) -> None:
    """The path holds document files this reader can open (their contents are checked when read)."""
    files = data_files(path) if path and Path(path).exists() else []
    suffixes = [s for s in DATA_SUFFIXES if dataset == "text" or s != ".txt"]  # conversations are records
    if not files:
        raise ConfigError(f"`{key}` = {path!r} is invalid: dataset {dataset!r} needs an existing "
                          f"{'/'.join(suffixes)} file or a folder holding some")
    text_files = [f for f in files if data_suffix(f) not in suffixes]
    if text_files:
        raise ConfigError(f"`{key}` = {path!r} holds .txt files ({text_files[0]}): dataset {dataset!r} reads "
                          f"{'/'.join(suffixes)} records")
    for suffix, package in OPTIONAL_READERS.items():
        if any(data_suffix(f) == suffix for f in files) and importlib.util.find_spec(package) is None:
            raise ConfigError(f"`{key}` = {path!r} holds {suffix} files: reading them needs {package} "
                              "(pip install 'titan_dsv4[data]')")


def describe_run(config: JobConfig, setup: RunSetup, world: int) -> str:
    """One line: the job, the model and the layout it runs in."""
    args, dims, t, ac = setup.model_args, setup.parallel_dims, config.training, config.activation_checkpoint
    p = config.parallelism
    schedule = (f"CSV schedule {Path(p.pipeline_parallel_schedule_csv).name}" if p.pipeline_parallel_schedule_csv
                else p.pipeline_parallel_schedule)
    layout = f"PP {dims.pp} ({schedule}) x DP {dims.dp}" if dims.pp > 1 else f"DP {dims.dp}"
    if dims.cp > 1:
        layout += f", CP {dims.cp} ({t.seq_len // dims.cp} tokens per rank)"
    if dims.ep > 1:
        layout += f", EP {dims.ep}"
    checkpointing = ac.mode + (f" ({ac.selective_ac_option})" if ac.mode == "selective" else "")
    compiled = "on" if config.compile.enable else "off"
    trained = "" if config.model.expert_qat == "none" else f", experts trained {config.model.expert_qat.upper()}-aware"
    if config.model.attention_qat:
        trained += ", attention trained as the released model quantises it"
    if args.lora_rank:
        trained += f", LoRA rank {args.lora_rank} on {', '.join(args.lora_targets)} (all else frozen)"
        if args.expert_storage == "fp4":
            trained += ", frozen experts stored as FP4"
    return (f"{config.job.description}: {config.model.flavor}, {_count(args.num_params())} parameters "
            f"({_count(args.num_active_params())} active), MTP depth {args.num_nextn_predict_layers}{trained}; "
            f"{world} process{'es' if world > 1 else ''}: {layout}; activation checkpointing {checkpointing}, "
            f"compile {compiled}; {t.steps} step{'s' if t.steps > 1 else ''} of {setup.global_batch_size} x "
            f"{t.seq_len} tokens")


def _count(n: int) -> str:
    return next(f"{n / scale:.4g}{unit}" for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k"), (1, ""))
                if n >= scale or scale == 1)


def world_from_degrees(config: JobConfig) -> int:
    """The world size a config's parallel degrees name (``--ngpu``'s default in the planner and the check)."""
    p = config.parallelism
    if p.data_parallel_shard_degree < 1:
        raise ConfigError("`parallelism.data_parallel_shard_degree` = -1 takes what the world size leaves: pass "
                          "--ngpu N (the GPUs the job will have), or set the degree in the config")
    return (p.pipeline_parallel_degree * p.data_parallel_replicate_degree * p.data_parallel_shard_degree
            * p.context_parallel_degree)
