"""torchtitan 0.2.x keys that have no field here, and what each of their values means for this project.

A torchtitan train config should run here with only its model and dataset edited. Each torchtitan key without
a field of ours is one of:

* an :class:`Alias`: renamed or moved here (``debug.seed`` is ``training.seed``); the value goes to our key;
* an :class:`Inert` key: the values it ``accepts`` ask for nothing this project lacks (``tensor_parallel_degree
  = 1``, a float8 section while no converter enables it) and change nothing; any other value is refused with
  ``instead``, what to use here.

The docs page ``docs/torchtitan.md`` lists every entry; ``tests/test_torchtitan_config.py`` loads a torchtitan
config written from these keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

Check = Callable[[Any, Any], bool]  # (value, the loaded JobConfig) -> accepted


@dataclass(frozen=True)
class Alias:
    target: str  # our dotted key


@dataclass(frozen=True)
class Inert:
    accepts: Check
    instead: str  # what to use here, said when a value is refused


def _is(*allowed: Any) -> Check:
    """Exactly these values (``1`` is not ``true``)."""
    return lambda value, config: any(type(value) is type(a) and value == a for a in allowed)


def _anything(value: Any, config: Any) -> bool:
    return True


def _empty(value: Any, config: Any) -> bool:
    return not value


def _as_training(key: str) -> Check:
    return lambda value, config: value == getattr(config.training, key)


NO_TP = ("no tensor parallelism here (DeepSeek-V4's attention has one shared KV head): shard with "
         "data_parallel_shard_degree (FSDP) and expert_parallel_degree")
NO_FP8 = ("no float8/MX training here: model.expert_qat = 'fp4' or 'fp8' trains the routed experts "
          "quantisation-aware in the released formats")

TORCHTITAN_KEYS: dict[str, Alias | Inert] = {
    # [job]
    "job.print_args": Alias("job.print_config"),
    "job.use_for_integration_test": Inert(_anything, ""),
    "job.custom_config_module": Inert(_empty, "the job config is titan_dsv4/config/job_config.py; extend it there"),
    # [metrics]
    "metrics.save_for_all_ranks": Inert(_is(False), "rank 0 logs the values reduced over every rank"),
    # [model]
    "model.converters": Inert(_empty, NO_FP8),
    "model.print_after_conversion": Inert(_anything, ""),
    # [optimizer]
    "optimizer.early_step_in_backward": Inert(_is(False), "the optimizer steps after the backward (gradient "
                                          "clipping needs every gradient)"),
    # [lr_scheduler]
    "lr_scheduler.lr_min": Alias("lr_scheduler.min_lr_factor"),
    # [training]
    "training.compile": Alias("compile.enable"),
    "training.enable_cpu_offload": Inert(_is(False), "no CPU offload here: plan the memory with python -m "
                                         "titan_dsv4.plan and use more FSDP ranks or activation checkpointing"),
    "training.dtype": Inert(_is("float32"), "parameters stay fp32 here; training.mixed_precision_param = "
                            "'bfloat16' computes in bf16"),
    "training.gc_debug": Inert(_is(False), "use training.gc_freq"),
    # the loader tokenizes on every core and reads a step ahead in a thread: worker settings change nothing
    "training.dataloader.*": Inert(_anything, ""),
    # [debug] (torchtitan 0.2 moved these from [training])
    "debug.seed": Alias("training.seed"),
    "debug.deterministic": Alias("training.deterministic"),
    "debug.deterministic_warn_only": Inert(_is(False), "training.deterministic = true"),
    "debug.moe_force_load_balance": Inert(_is(False), "no forced round-robin routing here"),
    # [parallelism]
    "parallelism.tensor_parallel_degree": Inert(_is(1), NO_TP),
    "parallelism.expert_tensor_parallel_degree": Inert(_is(1), NO_TP),
    "parallelism.enable_async_tensor_parallel": Inert(_is(False), NO_TP),
    "parallelism.disable_loss_parallel": Inert(_anything, ""),  # loss parallelism exists only with TP
    "parallelism.enable_compiled_autograd": Inert(_is(False), "compile.enable compiles each block's backward too"),
    "parallelism.pipeline_parallel_split_points": Inert(_empty, "parallelism.module_fqns_per_model_part (module "
                                                        "names per stage) or pipeline_parallel_layers_per_stage"),
    # a DualPipeV optimisation of torchtitan's; its default is true, and it changes no result
    "parallelism.pipeline_parallel_expert_parallel_overlap": Inert(_anything, ""),
    # sequences are split into contiguous shards; sliding-window and compressed attention cost the same per token,
    # so no shard needs balancing
    "parallelism.context_parallel_load_balancer": Inert(_anything, ""),
    "parallelism.context_parallel_rotate_method": Inert(_is("allgather"), "context parallelism here all-gathers "
                                                        "the compressed entries ('allgather')"),
    "parallelism.expert_parallel_comm_backend": Inert(_is("standard"), "expert parallelism here uses torch's "
                                                      "all-to-all ('standard')"),
    # [checkpoint]
    "checkpoint.enable_checkpoint": Alias("checkpoint.enable"),
    "checkpoint.enable_ft_dataloader_checkpoints": Inert(_anything, ""),  # torchft only; the loader is always saved
    "checkpoint.initial_load_in_hf_quantized": Inert(_anything, ""),  # released FP8/FP4 weights always dequantise
    "checkpoint.exclude_from_loading": Inert(_empty, "checkpoint.initial_load_model_only = true loads the weights "
                                         "alone"),
    "checkpoint.create_seed_checkpoint": Inert(_is(False), "not needed: weights are drawn per parameter name, the "
                                           "same under every layout"),
    "checkpoint.load_only": Inert(_is(False), "checkpoint.enable = false with checkpoint.initial_load_path"),
    # [activation_checkpoint]
    "activation_checkpoint.per_op_sac_force_recompute_mm_shapes_by_fqns": Inert(_anything, ""),
    "activation_checkpoint.early_stop": Inert(_anything, ""),
    "activation_checkpoint.memory_budget": Inert(_anything, ""),  # read only by mode 'memory_budget'
    "activation_checkpoint.visualize_memory_budget_pareto": Inert(_is(False), "mode 'full' or 'selective'"),
    "activation_checkpoint.preserve_rng_state": Inert(_anything, ""),  # the model draws no random numbers
    "activation_checkpoint.determinism_check": Inert(_is("default"), "leave it 'default'"),
    "activation_checkpoint.debug": Inert(_is(False), "profiling.enable_profiling shows what is recomputed"),
    # float8 / MX: configured here, enabled only through model.converters (refused above)
    "quantize.*": Inert(_anything, ""),
    "float8.*": Inert(_anything, ""),
    "mx.*": Inert(_anything, ""),
    # [comm]: NCCL's flight recorder is configured by its environment (scripts/slurm/node.sh sets it)
    "comm.trace_buf_size": Inert(_anything, ""),
    "comm.save_traces_folder": Inert(_anything, ""),
    "comm.save_traces_file_prefix": Inert(_anything, ""),
    "comm.mode": Inert(_is("default"), "python -m titan_dsv4.plan checks a layout without GPUs"),
    # [memory_estimation]
    "memory_estimation.enable": Inert(_is(False), "python -m titan_dsv4.plan --job.config_file X.toml"),
    "memory_estimation.disable_fake_mode": Inert(_anything, ""),
    # [fault_tolerance]
    "fault_tolerance.enable": Inert(_is(False), "no torchft here: checkpoints resume exactly after a restart"),
    "fault_tolerance.*": Inert(_anything, ""),
    # [experimental]
    "experimental.custom_import": Inert(_empty, "the model is chosen by model.name"),
    "experimental.custom_args_module": Inert(_empty, "the job config is titan_dsv4/config/job_config.py"),
    # [validation]: it runs on training's batch shape
    "validation.local_batch_size": Inert(_as_training("local_batch_size"), "validation uses training."
                                         "local_batch_size: remove the key or set it equal"),
    "validation.seq_len": Inert(_as_training("seq_len"), "validation uses training.seq_len: remove the key or set "
                                "it equal"),
    "validation.dataloader.*": Inert(_anything, ""),
}

# torchtitan values of keys we have, spelled our way
TORCHTITAN_VALUES: dict[str, dict[Any, Any]] = {
    "checkpoint.async_mode": {"async_with_pinned_mem": "async"},
}


def torchtitan_rule(dotted: str) -> Alias | Inert | None:
    """The entry for a torchtitan key (``section.key``, nested keys dotted), exact or by a ``prefix.*`` entry."""
    if dotted in TORCHTITAN_KEYS:
        return TORCHTITAN_KEYS[dotted]
    parts = dotted.split(".")
    for end in range(len(parts) - 1, 0, -1):
        rule = TORCHTITAN_KEYS.get(".".join(parts[:end]) + ".*")
        if rule is not None:
            return rule
    return None


def torchtitan_value(dotted: str, value: Any) -> Any:
    """A torchtitan spelling of a value of one of our keys, ours (selective_ac_option may be a TOML integer)."""
    if dotted == "activation_checkpoint.selective_ac_option" and type(value) is int:
        return str(value)
    try:
        return TORCHTITAN_VALUES.get(dotted, {}).get(value, value)
    except TypeError:  # a list or table: not hashable, not one of these
        return value
