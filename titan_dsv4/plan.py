"""Per-rank memory plan of a train config, before renting the cluster:

    python -m titan_dsv4.plan --job.config_file X.toml [--section.key value ...] [--ngpu N] \\
        [--gpu-memory-gib 80] [--device cuda|cpu]

For every pipeline rank: model state (parameters, gradients and AdamW moments or Muon momenta, counted from
the shard each rank keeps: FSDP's padded dim-0 shards, EP's expert rows), FSDP's unsharded compute copies
(the whole stage under PP, where parameters stay gathered between forward and backward; two units
otherwise), activations and the backward's transient peak per microbatch, times the microbatches in flight
at the worst moment of the configured torch schedule (simulated from its own action list), and
expert-parallel all-to-all buffers.

Activations are not a formula: each stage runs one microbatch forward and backward on the ``meta`` device
(shapes only, no memory, seconds even for Pro) with activation checkpointing applied as configured, while a
dispatch mode tracks the live bytes of every tensor the ops create. So the mHC streams, MTP depths, the fp32
logits and everything else this code keeps are counted as this code keeps them.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import sys
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from .config import ConfigError, config_help, load_config, print_help
from .config.job_config import JobConfig
from .config.validate import RunSetup, validate, world_from_degrees
from .distributed.pipeline import prune_to_stage, schedule_actions
from .models.deepseek_v4.lora import freeze_all_but_adapters, is_adapter
from .models.deepseek_v4.moe import STACKED_BY_EXPERT

GIB = 2**30
CUDA_RESERVE_GIB = 3.0  # CUDA context, NCCL buffers and cuBLAS workspaces per GPU (not tensors we allocate)
FRAGMENTATION = 0.92  # the share of GPU memory the caching allocator can be expected to fill


class LiveBytes(TorchDispatchMode):
    """Live bytes of the tensors ops create (views share their storage), and their peak; while
    ``forward`` is set, also the bytes of what ops on a parameter output (``param_outputs``)."""

    def __init__(self, existing: list[torch.Tensor] = (), params: list[torch.Tensor] = ()) -> None:
        super().__init__()
        self.storages: dict[int, list[int]] = {}  # storage id -> [tensors alive, bytes]
        self.existing = {t.untyped_storage()._cdata for t in existing}  # views of these are not new bytes
        self.params = {t.untyped_storage()._cdata for t in params}
        self.live = self.peak = self.param_outputs = 0
        self.forward = True
        self.fusing = False

    def fused(self, fn: Callable, *args, **kwargs):
        """``fn`` as one fused GPU kernel (``compiled_on_cuda`` without gradients): its temporaries stay in
        registers, only its outputs are new memory."""
        self.fusing = True
        try:
            out = fn(*args, **kwargs)
        finally:
            self.fusing = False
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.existing:
            return
        if key in self.storages:
            self.storages[key][0] += 1
        else:
            self.storages[key] = [1, storage.nbytes()]
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
        weakref.finalize(tensor, self._release, key)

    def _release(self, key: int) -> None:
        entry = self.storages.get(key)
        if entry is not None:
            entry[0] -= 1
            if entry[0] == 0:
                self.live -= entry[1]
                del self.storages[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.fusing:
            return out
        outputs = [t for t in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(t, torch.Tensor)]
        for t in outputs:
            self._track(t)
        if self.forward and any(isinstance(a, torch.Tensor) and a.untyped_storage()._cdata in self.params
                                for a in args):
            self.param_outputs += sum(t.untyped_storage().nbytes() for t in outputs if t.is_floating_point())
        return out


@dataclass
class StageActivations:
    held: int  # bytes one microbatch keeps from its forward until its backward
    backward_extra: int  # further bytes while that microbatch's backward runs (gradients, recompute)
    # zero-bubble schedules: the gradients of what ops on parameters output, kept from I to W
    weight_grad_inputs: int = 0


@dataclass
class RankPlan:
    pp_rank: int
    stages: list[int]
    params: int
    grads: int
    optimizer: int
    unsharded: int  # FSDP's gathered compute copies (and one unit's unsharded gradients)
    activations: int  # at the schedule's worst moment
    in_flight: dict[int, int]  # stage -> microbatches held at that moment
    all_to_all: int
    newton_schulz_flops: float = 0.0  # Muon's orthogonalizations per step
    model_flops: float = 0.0  # per step: the model's training FLOPs over all ranks / world size

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.unsharded + self.activations + self.all_to_all


def _local_numel(shape: torch.Size, shards: int) -> int:
    """Elements of the largest dim-0 shard (FSDP pads dim 0 to a multiple of the shard count)."""
    if not shape:
        return 1
    return math.ceil(shape[0] / shards) * math.prod(shape[1:])


def _compute_dtype(config: JobConfig, setup: RunSetup, device: str) -> torch.dtype:
    """What the trainer computes in: FSDP's param dtype on GPUs with data parallelism, else fp32."""
    if device == "cuda" and setup.parallel_dims.dp_enabled:
        return getattr(torch, config.training.mixed_precision_param)
    return torch.float32


def _stage_inputs(setup: RunSetup, config: JobConfig, first: bool, dtype: torch.dtype):
    """What a stage receives for one microbatch: token ids (first stage) or the mHC stream; positions and
    the targets (which the last stage's fused head uses) as keywords."""
    args, mb, seq = setup.model_args, _microbatch(config, setup), config.training.seq_len // setup.parallel_dims.cp
    ids = torch.zeros(mb, seq, dtype=torch.long, device="meta")
    kwargs = dict(positions=torch.arange(seq, device="meta").expand(mb, seq),
                  targets=torch.zeros(mb, seq, 1 + args.num_nextn_predict_layers, dtype=torch.long, device="meta"))
    if first:
        return (ids,), kwargs
    stream = torch.zeros(mb, seq, args.hc_mult, args.hidden_size, dtype=dtype, device="meta",
                         requires_grad=True)
    return (stream,), dict(kwargs, input_ids=ids)


class _ShapeOnlyShard:
    """Context parallelism's shapes without its collectives, as the last shard (it sees every entry): what a
    rank's attention holds is its shard after the halo and the gathered entries of the whole sequence."""

    def __init__(self, size: int, halo: int):
        self.index, self.size, self.halo = size - 1, size, halo

    def gather_with_grad(self, t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t] * self.size, dim=1)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        return self.gather_with_grad(t.detach())

    def extend(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[:, : self.halo], x], dim=1)

    def part(self, t: torch.Tensor) -> torch.Tensor:
        return t[:, : t.shape[1] // self.size]


def _microbatch(config: JobConfig, setup: RunSetup) -> int:
    if setup.pipeline_plan is None:
        return config.training.local_batch_size
    return setup.pipeline_plan.microbatch_size


def measure_stage(stage_model: nn.Module, setup: RunSetup, config: JobConfig, first: bool, last: bool,
                  dtype: torch.dtype, gpu: bool) -> StageActivations:
    """One microbatch forward + backward of a (meta) stage under the configured activation checkpointing,
    through the code paths the planned device takes."""
    from .models.deepseek_v4.gpu_paths import meta_as_gpu
    from .models.deepseek_v4.moe import RoutedExperts
    from .models.deepseek_v4.parallelize import apply_activation_checkpointing, experts_apart

    model = stage_model.to(dtype)
    model.train()
    ac = config.activation_checkpoint
    apply_activation_checkpointing(model, ac.mode, ac.selective_ac_option,
                                   experts_apart=experts_apart(setup.parallel_dims))  # as parallelize_fn does
    model.set_mtp_loss_scale(config.mtp.loss_scaling_factor)
    model.set_attention_kernel(config.model.attention_kernel)
    model.set_sinkhorn_kernel(config.model.sinkhorn_kernel)
    model.set_expert_qat(config.model.expert_qat)
    model.set_attention_qat(config.model.attention_qat)
    if setup.parallel_dims.cp_enabled:
        model.set_sequence_shard(_ShapeOnlyShard(setup.parallel_dims.cp, setup.model_args.context_parallel_halo))
    if config.training.indexer_loss_coeff > 0:
        model.set_indexer_loss_scale(1.0)
    if setup.model_args.lora_rank:  # as the trainer
        freeze_all_but_adapters(model)
    for p in model.parameters():  # FSDP frees each unit's unsharded gradient after reduce-scatter: free now
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(lambda param: setattr(param, "grad", None))
    loss_fn = setup.spec.build_loss_fn(config, setup.model_args)
    original, deterministic = RoutedExperts.forward, torch.are_deterministic_algorithms_enabled()
    ep = setup.parallel_dims.ep
    # the exact loop needs expert counts, which meta lacks
    RoutedExperts.forward = lambda experts, *inputs: _shape_only_experts(experts, *inputs, ep=ep)
    torch.use_deterministic_algorithms(config.training.deterministic)  # as the trainer: it picks the attention core
    try:
        tracker = LiveBytes([*model.parameters(), *model.buffers()], list(model.parameters()))
        with meta_as_gpu(tracker.fused) if gpu else contextlib.nullcontext(), tracker:
            args, kwargs = _stage_inputs(setup, config, first, dtype)  # a stage keeps what it received
            out = model(*args, **kwargs)
            if last:
                out = loss_fn(out, kwargs["targets"], 1.0)
            held = tracker.live
            tracker.forward = False
            (out if last else out.float().sum()).backward()
            peak = tracker.peak
    finally:
        RoutedExperts.forward = original
        torch.use_deterministic_algorithms(deterministic)
    return StageActivations(held=held, backward_extra=max(peak - held, 0),
                            weight_grad_inputs=tracker.param_outputs)


def _shape_only_experts(self, xs: torch.Tensor, ws: torch.Tensor, counts: torch.Tensor, ep: int) -> torch.Tensor:
    """The routed experts' activations with the shapes of the grouped computation: every row through one
    expert (weights detached: expert weight gradients are FSDP's per-unit term; LoRA adapters, when trained,
    not). Under quantisation-aware training the GEMMs keep the rounded weights of this rank's experts
    (``E / ep`` of each matrix) for backward, as the real forward does."""
    from .models.deepseek_v4.moe import local_tensor

    def take(name: str) -> torch.Tensor:  # this rank's experts
        tensor = local_tensor(getattr(self, name))
        tensor = tensor[: tensor.shape[0] // ep]
        return tensor if is_adapter(name) else tensor.detach()

    return self.expert_ffn(xs, ws, self.matrices(xs.dtype, take), lambda x, w: x @ w[0].t())


def worst_moment(actions: list[tuple[str, int]], acts: dict[int, StageActivations]) -> tuple[int, dict[int, int]]:
    """Peak activation bytes over a rank's actions: a microbatch's activations live from its F to its B,
    a backward adds its stage's transient bytes while it runs, and in zero-bubble schedules the gradients an
    I (input-gradient backward) computes for the weights (those of what ops on parameters output) stay
    until that microbatch's W."""
    live: dict[int, int] = {s: 0 for s in acts}
    waiting_w: dict[int, int] = {s: 0 for s in acts}
    worst, at = 0, dict(live)
    for kind, stage in actions:
        if kind == "F":
            live[stage] += 1
        held = sum(acts[s].held * live[s] + acts[s].weight_grad_inputs * waiting_w[s] for s in acts)
        now = held + (acts[stage].backward_extra if kind in ("B", "I", "W") else 0)
        if now > worst:
            worst, at = now, dict(live)
        if kind == "I":
            waiting_w[stage] += 1
        elif kind == "W":
            waiting_w[stage] -= 1
            live[stage] -= 1
        elif kind == "B":
            live[stage] -= 1
    return worst, at


def without_cluster_files(config: JobConfig) -> JobConfig:
    """A copy that needs none of the files that only exist on the cluster (corpus, tokenizer, initial
    weights) and no CUDA: the plan depends on shapes and layout only (``model.flavor`` gives the shape)."""
    config = copy.deepcopy(config)
    config.training.dataset, config.training.dataset_path = "pydocs", None
    config.validation.enable = False
    config.model.tokenizer_path = config.model.hf_assets_path = None
    config.checkpoint.initial_load_path, config.checkpoint.initial_load_in_hf = None, False
    config.checkpoint.load_step = -1
    config.optimizer.implementation = "foreach"
    return config


def _stage_state(part: nn.Module, shard: int, ep: int, frozen_indexer: bool, stateless: tuple[str, ...],
                 muon: bool, adapters_only: bool = False, frozen_bytes: int = 4,
                 compute_bytes: int = 4) -> tuple[int, int, int, int, int, float]:
    """Bytes of this rank's parameter shards (fp32; LoRA's frozen weights ``frozen_bytes`` each: the compute
    dtype under FSDP's mixed precision; FP4-stored experts their bytes), then elements: the trainable part of
    them (gradients), the optimizer's state (two AdamW moments per element, or one Muon momentum for
    ``matrix_parameters``); bytes gathered (FSDP's unsharded copies, ``compute_bytes`` per float element), and
    of the largest FSDP unit gathered; and Muon's Newton-Schulz FLOPs
    per step on this rank (experts and FSDP-sharded weights split over the ``shard`` ranks: each
    orthogonalizes its own experts, or the weights dealt to it). The fp32 tensors FSDP leaves out are whole
    on every rank, used in place, and orthogonalized on every rank. ``adapters_only``: LoRA, only the
    adapters train."""
    from .components.muon import matrix_shape, newton_schulz_flops
    from .models.deepseek_v4.parallelize import fp32_replicated_parameters

    replicated = {id(p) for p in fp32_replicated_parameters(part)}
    matrices = {id(p): count for p, count in part.matrix_parameters()} if muon else {}
    params = trainable = optimizer = gathered = 0
    flops = 0.0
    units: dict[str, int] = {}
    for name, p in part.named_parameters():
        experts = bool(STACKED_BY_EXPERT.search(name))  # weights, LoRA adapters and FP4 scales stacked by expert
        numel = p.numel() // (ep if experts else 1)  # an expert-parallel rank holds E / ep experts
        local = _local_numel(torch.Size([p.shape[0] // ep, *p.shape[1:]]) if experts else p.shape,
                             shard // ep if experts else shard)
        if id(p) in replicated:
            local, numel = p.numel(), 0
        lora_frozen = adapters_only and not is_adapter(name)
        if not p.is_floating_point():  # FP4-stored experts: bytes, gathered as they are
            params += local * p.element_size()
        else:
            params += local * (frozen_bytes if lora_frozen and id(p) not in replicated else 4)
        numel *= p.element_size() if not p.is_floating_point() else compute_bytes
        frozen = (frozen_indexer and ".attn.indexer." in f".{name}") or lora_frozen
        if not (frozen or name.startswith(stateless)):
            trainable += local
            optimizer += local * (1 if id(p) in matrices else 2)
            if id(p) in matrices:
                count = matrices[id(p)]
                flops += count * newton_schulz_flops(*matrix_shape(p, count)) / (1 if id(p) in replicated else shard)
        gathered += numel
        unit = ".".join(name.split(".")[:2]) if name.startswith(("layers.", "mtp.")) else name.split(".")[0]
        units[unit] = units.get(unit, 0) + numel
    return params, trainable, optimizer, gathered, max(units.values(), default=0), flops


def plan_memory(config: JobConfig, world_size: int, device: str = "cuda") -> list[RankPlan]:
    setup = validate(without_cluster_files(config), world_size)
    dims, args = setup.parallel_dims, setup.model_args
    dtype = _compute_dtype(config, setup, device)
    compute_bytes = torch.finfo(dtype).bits // 8
    model = setup.meta_model
    if model is None:
        with torch.device("meta"):
            model = setup.spec.model_cls(args)
    plan = setup.pipeline_plan
    fsdp = dims.dp_enabled
    shard = dims.dp_shard_cp if fsdp else 1
    ep = dims.ep if dims.ep_enabled else 1
    frozen_indexer = config.training.indexer_loss_coeff == 0
    stage_fqns = plan.fqns_per_stage if plan else [None]
    replicas = tuple(getattr(model, "pipeline_replicas", {}))  # on the source's rank (V): no own state

    acts, state = {}, {}
    for stage, fqns in enumerate(stage_fqns):
        part = prune_to_stage(model, fqns) if fqns is not None else copy.deepcopy(model)
        state[stage] = _stage_state(part, shard, ep, frozen_indexer, replicas if plan and plan.style == "v" else (),
                                    config.optimizer.name == "Muon", adapters_only=args.lora_rank > 0,
                                    frozen_bytes=compute_bytes if fsdp else 4, compute_bytes=compute_bytes)
        acts[stage] = measure_stage(part, setup, config, stage == 0, stage == len(stage_fqns) - 1, dtype,
                                    gpu=device == "cuda")

    step_tokens = setup.global_batch_size * config.training.seq_len
    model_flops = args.training_flops_per_token(config.training.seq_len, indexer_trained=not frozen_indexer) \
        * step_tokens / world_size
    ranks = []
    for pp_rank in range(plan.pp if plan else 1):
        stages = plan.stage_ids(pp_rank) if plan else [0]
        params = sum(state[s][0] for s in stages)
        trainable = sum(state[s][1] for s in stages)
        optimizer = sum(state[s][2] for s in stages)
        gathered = sum(state[s][3] for s in stages)
        unit = max(state[s][4] for s in stages)
        if not fsdp:
            unsharded = 0
        elif plan is not None and config.parallelism.fsdp_reshard_after_forward != "always":
            unsharded = gathered + unit  # gathered from the first forward to the end
        else:
            unsharded = 3 * unit  # current + prefetched unit, one unit's gradients
        if plan is None:
            activations, in_flight = acts[0].held + acts[0].backward_extra, {0: 1}
        else:
            activations, in_flight = worst_moment(schedule_actions(setup.pipeline_plan, pp_rank),
                                                  {s: acts[s] for s in stages})
        all_to_all = 0
        if ep > 1:  # dispatch and combine, send and receive, in the compute dtype; one MoE at a time
            tokens = _microbatch(config, setup) * config.training.seq_len // dims.cp * args.num_experts_per_tok
            all_to_all = tokens * args.hidden_size * 4 * compute_bytes
        ranks.append(RankPlan(pp_rank=pp_rank, stages=stages, params=params, grads=4 * trainable,
                              optimizer=4 * optimizer, unsharded=unsharded, activations=activations,
                              in_flight=in_flight, all_to_all=all_to_all,
                              newton_schulz_flops=sum(state[s][5] for s in stages), model_flops=model_flops))
    return ranks


def verdict(total_bytes: int, gpu_gib: float) -> str:
    need = total_bytes / GIB + CUDA_RESERVE_GIB
    if need <= gpu_gib * FRAGMENTATION:
        return f"fits ({need:.1f} of {gpu_gib:.0f} GiB with the {CUDA_RESERVE_GIB:.0f} GiB CUDA reserve)"
    if need <= gpu_gib:
        return f"tight ({need:.1f} of {gpu_gib:.0f} GiB: allocator fragmentation may not leave room)"
    return f"does not fit ({need:.1f} GiB needed, {gpu_gib:.0f} GiB available)"


def report(config: JobConfig, ranks: list[RankPlan], world_size: int, device: str, gpu_gib: float) -> str:
    p = config.parallelism
    worst = max(ranks, key=lambda r: r.total)
    unit, scale = ("GiB", GIB) if worst.total >= GIB else ("MiB", 2**20)
    optimizer = config.optimizer.name[:4].lower()  # adam | muon
    lines = [f"{config.model.flavor}: {world_size} ranks, PP={p.pipeline_parallel_degree} "
             f"({p.pipeline_parallel_schedule}), EP={p.expert_parallel_degree}, CP={p.context_parallel_degree}, "
             f"AC={config.activation_checkpoint.mode}, local batch {config.training.local_batch_size} x seq "
             f"{config.training.seq_len}, microbatch {p.pipeline_parallel_microbatch_size}, on {device}; "
             f"{unit} per rank",
             f"{'pp rank':>7} {'stages':>7} {'params':>8} {'grads':>8} {optimizer:>8} {'fsdp':>8} {'activ.':>8} "
             f"{'a2a':>7} {'total':>8}  microbatches in flight at the peak (stage: n)"]
    for r in ranks:
        parts = (r.params, r.grads, r.optimizer, r.unsharded, r.activations, r.all_to_all, r.total)
        lines.append(f"{r.pp_rank:>7} {','.join(map(str, r.stages)):>7} "
                     + " ".join(f"{x / scale:8.2f}" if i != 5 else f"{x / scale:7.2f}" for i, x in enumerate(parts))
                     + f"  {r.in_flight}")
    if device == "cuda":
        lines.append(f"worst rank (pp {worst.pp_rank}): {verdict(worst.total, gpu_gib)}")
    busiest = max(ranks, key=lambda r: r.newton_schulz_flops)
    if busiest.newton_schulz_flops:
        lines.append(f"Muon: Newton-Schulz {busiest.newton_schulz_flops / 1e12:.1f} TFLOP per step on pp rank "
                     f"{busiest.pp_rank}, {busiest.newton_schulz_flops / busiest.model_flops:.0%} of a rank's model "
                     "FLOPs per step (the share falls as the global batch grows)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--ngpu", type=int, default=None, help="world size (default: the product of the config's "
                        "degrees)")
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    opts, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        reference = config_help(rest, "python -m titan_dsv4.plan [--ngpu N] [--gpu-memory-gib 80] [--device cuda|cpu] "
                                      "[--job.config_file FILE.toml] [--section.key VALUE ...]")
        if reference is not None:
            print_help(reference)
            return 0
        config = load_config(rest)
        world = opts.ngpu or world_from_degrees(config)
        ranks = plan_memory(config, world, opts.device)
    except ConfigError as e:
        print(f"titan_dsv4.plan: {e}", file=sys.stderr)
        return 2
    print(report(config, ranks, world, opts.device, opts.gpu_memory_gib))
    return 0


if __name__ == "__main__":
    sys.exit(main())
