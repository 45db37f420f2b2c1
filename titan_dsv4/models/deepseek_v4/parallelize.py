"""``parallelize_fn`` for DeepSeek-V4: expert parallelism, activation checkpointing, compile and FSDP2,
per block, applied to one pipeline model part from the outside. Backbone blocks and MTP blocks are treated
alike."""

from __future__ import annotations

import functools
from typing import Iterator

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint

from ...config.job_config import JobConfig
from ...distributed.expert_parallel import apply_expert_parallel
from ...distributed.parallel_dims import ParallelDims
from .attention import Attention, Compressor
from .head_loss import compile_cross_entropy
from .hyper_connection import HyperConnection, HyperHead
from .lora import is_adapter
from .moe import RoutedExperts
from .running_stats import checkpoint_contexts

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def block_containers(model: nn.Module) -> list[nn.ModuleDict]:
    return [c for c in (getattr(model, "layers", None), getattr(model, "mtp", None)) if c is not None]


def routed_experts(module: nn.Module) -> list[RoutedExperts]:
    return [m for m in module.modules() if isinstance(m, RoutedExperts)]


def experts_apart(parallel_dims: ParallelDims) -> bool:
    """Whether the routed experts are an FSDP unit of their own (expert parallelism under FSDP)."""
    return parallel_dims.ep_enabled and parallel_dims.dp_enabled


def apply_activation_checkpointing(model: nn.Module, mode: str, selective_option: str = "2",
                                   compiled: bool = False, experts_apart: bool = False) -> None:
    """``full``: recompute each block. ``selective`` with ``selective_option`` ``"N"``: recompute every N-th
    block whole (torchtitan's layer SAC: the N-th, 2N-th, ... block, decoder then MTP blocks); ``"op"``:
    every block keeps its projection GEMMs' outputs and recomputes the rest
    (``running_stats._save_projections``). ``compiled``: the blocks will be compiled whole afterwards.

    ``experts_apart``: the routed experts are an FSDP unit of their own (expert parallelism). Selective
    checkpointing needs the recompute to dispatch the very ops the forward did, and the experts' FSDP hooks
    do not: whether they gather again depends on the resharding policy (not under PP), and compiled parts
    show the forward none of their ops. So ``op`` then checkpoints each part around the experts on its own
    (what ``apply_compile`` compiles) and the experts' own forward inside their hooks (FSDP's gathers and
    EP's all-to-all stay outside, and are not repeated in backward)."""
    if mode == "none":
        return
    per_op = mode == "selective" and selective_option == "op"
    every = 1 if mode == "full" or per_op else int(selective_option)
    count = 0
    for container in block_containers(model):
        for name, block in list(container.items()):
            count += 1
            if count % every:
                continue
            if per_op and experts_apart:
                for parent, part_name, part in list(_parts_without(block, set(routed_experts(block)))):
                    setattr(parent, part_name, checkpoint_wrapper(part, preserve_rng_state=False,
                                                                  context_fn=checkpoint_contexts(compiled, True)))
                for experts in routed_experts(block):
                    _checkpoint_forward(experts, checkpoint_contexts(compiled, True))
            else:
                container[name] = checkpoint_wrapper(block, preserve_rng_state=False,
                                                     context_fn=checkpoint_contexts(compiled, per_op))


def _checkpoint_forward(module: nn.Module, context_fn) -> None:
    """Checkpoint ``module.forward`` itself, in place: its forward hooks run outside the checkpoint."""
    @functools.wraps(module.forward)
    def checkpointed(*args):  # the class's forward at call time (the planner swaps it for a shape-only one)
        return checkpoint(type(module).forward, module, *args, use_reentrant=False, preserve_rng_state=False,
                          context_fn=context_fn)
    module.forward = checkpointed


def apply_compile(model: nn.Module, backend: str = "inductor", experts_apart: bool = False) -> None:
    """``torch.compile`` each decoder and MTP block on its own (same code, so recompiles are rare).

    ``experts_apart``: the routed experts are an FSDP unit of their own (expert parallelism). FSDP2's hooks
    are dynamo-disabled, so a compiled block would break into graphs around them, and its checkpoint would
    run eagerly under the compiled selective-checkpoint contexts, which then fail on FSDP's profiler ranges
    (recorded differently in forward and recompute). Instead the largest parts of each block without the
    experts are compiled (attention, mHC sites, norms, router, shared expert), in place, so FQNs stay.
    """
    # The statistics buffers' updates (running_stats.py) are the only side effects in a block; a checkpointed
    # block must not replay them while recomputing, so compiled checkpointing may skip them there.
    torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    # One graph per kind of block (attention type x routing x MTP: ~6 for the released models), and again
    # for validation (eval mode, no gradients): past the default limit of 8, dynamo would run the rest eagerly.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 16)
    for container in block_containers(model):
        for name, block in list(container.items()):
            if experts_apart:
                _compile_around(block, set(routed_experts(block)), backend)
            else:
                container[name] = torch.compile(block, backend=backend, fullgraph=False)


def _compile_around(module: nn.Module, skip: set[nn.Module], backend: str) -> None:
    """Compile in place every largest submodule of ``module`` that holds none of ``skip``."""
    for _, _, part in _parts_without(module, skip):
        part.compile(backend=backend, fullgraph=False)


def _parts_without(module: nn.Module, skip: set[nn.Module]) -> Iterator[tuple[nn.Module, str, nn.Module]]:
    """``(parent, name, part)`` for every largest submodule of ``module`` that holds none of ``skip``."""
    for name, child in module.named_children():
        if child in skip:
            continue
        if any(m in skip for m in child.modules()):
            yield from _parts_without(child, skip)
        else:
            yield module, name, child


def fp32_replicated_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters the released model stores and computes in fp32 (dsv4-spec.md §4-5: the mHC mixes,
    attention sinks, compressor position biases). FSDP leaves them out: its mixed precision would gather
    them in bf16, and they are small (~1M per layer), so every data-parallel rank keeps them whole in fp32
    and their gradients are summed over the data-parallel group (``reduce_replicated_grads``). As plain
    tensors inside compiled blocks they cost no FSDP hook, hence no graph break."""
    params = [p for m in model.modules() if isinstance(m, (HyperConnection, HyperHead))
              for p in m.parameters(recurse=False)]
    params += [m.attn_sink for m in model.modules() if isinstance(m, Attention)]
    params += [m.ape for m in model.modules() if isinstance(m, Compressor)]
    return params


@torch.no_grad()
def cast_to_compute_dtypes(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> None:
    """Cast ``model`` in place to the dtypes FSDP's mixed precision computes it in: parameters in ``dtype``,
    the fp32-kept ones (``fp32_replicated_parameters``) and every buffer (expert biases and load counts) as
    they are. For one-device runs that stand for FSDP training: the GPU benchmark, the kernel tests."""
    keep = {id(p) for p in fp32_replicated_parameters(model)}
    for p in model.parameters():
        if id(p) not in keep and p.is_floating_point():  # FP4-stored experts stay bytes
            p.data = p.data.to(dtype)


@torch.no_grad()
def store_frozen_weights_in(model: nn.Module, dtype: torch.dtype) -> None:
    """LoRA: the weights that do not train are only ever read in the compute dtype, so they are stored in it
    (half the memory of fp32 copies, the same values FSDP's cast would give; the release's FP8 and bf16
    weights are exact in bf16). The adapters and the fp32-kept tensors stay fp32."""
    keep = {id(p) for p in fp32_replicated_parameters(model)}
    for name, p in model.named_parameters():
        if id(p) not in keep and not is_adapter(name) and p.is_floating_point():  # FP4-stored experts stay bytes
            p.data = p.data.to(dtype)


def apply_fsdp(model: nn.Module, parallel_dims: ParallelDims, job_config: JobConfig, device: torch.device,
               param_dtype: torch.dtype | None = None) -> None:
    """FSDP2 per block (experts their own unit under EP), embeddings, head, root. ``param_dtype``: the
    dtype parameters are gathered in for compute (bf16 on GPUs; None keeps theirs)."""
    # Inputs are not cast: the stream is already in the compute dtype, and casting would also turn the
    # attention context's fp32 RoPE tables (FSDP recurses into dataclasses) into bf16.
    reduce_dtype = _DTYPES[job_config.training.mixed_precision_reduce]
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    policy = job_config.parallelism.fsdp_reshard_after_forward
    # Under PP, resharding after forward silently corrupts zero-bubble schedules' gradients (prior-art.md).
    reshard = policy == "always" or (policy == "default" and not parallel_dims.pp_enabled)
    kwargs = dict(mesh=parallel_dims.fsdp_mesh(), mp_policy=mp, reshard_after_forward=reshard,
                  ignored_params=set(fp32_replicated_parameters(model)))
    if job_config.lora.rank and param_dtype is not None:
        store_frozen_weights_in(model, param_dtype)
    for container in block_containers(model):
        for block in container.values():
            if parallel_dims.ep_enabled:  # expert weights: their own unit over the ranks EP left to FSDP
                for experts in routed_experts(block):
                    fully_shard(experts, **dict(kwargs, mesh=parallel_dims.expert_fsdp_mesh()))
            fully_shard(block, **kwargs)
    for name in ("embed", "mtp_embed"):
        if getattr(model, name, None) is not None:
            fully_shard(getattr(model, name), **kwargs)
    head_part = [m for m in (model.hc_head, model.norm, model.head) if m is not None]
    if head_part:
        fully_shard(head_part, **dict(kwargs, reshard_after_forward=False))
    fully_shard(model, **kwargs)
    # The loss is already normalised by the global token count: gradients must be summed, not averaged.
    # Set on every FSDP module (each only affects itself); gloo also needs the plain SUM op.
    gloo = device.type == "cpu"
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            if gloo:
                module.set_force_sum_reduction_for_comms(True)


def parallelize_deepseek_v4(model: nn.Module, parallel_dims: ParallelDims, job_config: JobConfig,
                            device: torch.device) -> nn.Module:
    if parallel_dims.ep_enabled:
        for experts in routed_experts(model):
            apply_expert_parallel(experts, parallel_dims.ep_mesh())
    compiled = job_config.compile.enable and "model" in job_config.compile.components
    if job_config.compile.enable and "loss" in job_config.compile.components:
        compile_cross_entropy(job_config.compile.backend)
    apart = experts_apart(parallel_dims)
    ac = job_config.activation_checkpoint
    apply_activation_checkpointing(model, ac.mode, ac.selective_ac_option, compiled and not apart, apart)
    if compiled:
        apply_compile(model, job_config.compile.backend, apart)
    if parallel_dims.dp_enabled:
        param_dtype = _DTYPES[job_config.training.mixed_precision_param] if device.type == "cuda" else None
        apply_fsdp(model, parallel_dims, job_config, device, param_dtype)
    return model
