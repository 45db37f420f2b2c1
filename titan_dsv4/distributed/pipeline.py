"""Generic pipeline splitter and schedule builder on ``torch.distributed.pipelining``.

The splitter knows nothing about the model beyond its ``layers`` ModuleDict; every model-specific decision
goes through two model-owned hooks:

* ``model.pipeline_stage_modules(fqns_per_stage, *, first_and_last_share_rank)`` -> the module FQNs each
  stage holds (DeepSeek-V4 puts the embedding on stage 0 and hc_head, norm, head, the MTP blocks and, when
  stage 0 lives on another rank, an embedding replica on the last stage);
* ``model.pipeline_stage_metas(stage_index=, num_stages=, microbatch_size=, seq_len=, dtype=)`` -> meta
  tensors for what the stage receives and sends.

Planning (:func:`plan_pipeline`) is pure arithmetic on a meta-device model, so every layout error is
reported before any process group exists.
"""

from __future__ import annotations

import copy
import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (
    PipelineScheduleMulti,
    PipelineScheduleSingle,
    _PipelineScheduleRuntime,
    get_schedule_class,
)

from ..config.job_config import JobConfig
from ..config.manager import ConfigError

SINGLE_STAGE_SCHEDULES = ("GPipe", "1F1B")
LOOP_SCHEDULES = ("Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble")
V_SCHEDULES = ("ZBVZeroBubble", "DualPipeV")
SCHEDULES = SINGLE_STAGE_SCHEDULES + LOOP_SCHEDULES + V_SCHEDULES


@dataclass
class PipelinePlan:
    pp: int
    schedule: str  # torch schedule name, or "CSV"
    csv_path: str | None
    stages_per_rank: int
    style: str  # "loop": rank r holds r, r+pp, ...; "v": rank r holds r and 2pp-1-r
    fqns_per_stage: list[list[str]]
    n_microbatches: int
    microbatch_size: int

    @property
    def num_stages(self) -> int:
        return self.pp * self.stages_per_rank

    def stage_ids(self, pp_rank: int) -> list[int]:
        if self.style == "v":
            return [pp_rank, 2 * self.pp - 1 - pp_rank]
        return [pp_rank + i * self.pp for i in range(self.stages_per_rank)]

    def rank_of_stage(self, stage: int) -> int:
        return next(r for r in range(self.pp) if stage in self.stage_ids(r))

    @property
    def first_and_last_share_rank(self) -> bool:
        return self.rank_of_stage(0) == self.rank_of_stage(self.num_stages - 1)


def _csv_ranks(path: str) -> int:
    with open(path, newline="") as f:
        return sum(1 for row in csv.reader(f) if row)


def split_layers(layer_fqns: list[str], num_stages: int, first_less: int, last_less: int) -> list[list[str]]:
    """Spread the layers evenly, the first/last stage counting ``first_less``/``last_less`` layers' worth of
    other work (embedding; head, loss and MTP)."""
    n = len(layer_fqns)
    effective = n + first_less + last_less
    if num_stages > effective:
        raise ConfigError(f"{num_stages} pipeline stages for {n} layers (+{first_less} first, +{last_less} last "
                          f"stage weight) is impossible: at most {effective} stages")
    base, extra = divmod(effective, num_stages)
    sizes = [base + (1 if i < extra else 0) for i in range(num_stages)]
    sizes[0] -= first_less
    sizes[-1] -= last_less
    if num_stages == 1:
        sizes = [n]
    if any(s < 0 for s in sizes) or any(s < 1 for s in sizes[1:-1]):
        raise ConfigError(f"cannot split {n} layers into {num_stages} stages with first_stage_less_layers="
                          f"{first_less} and last_stage_less_layers={last_less}: stage sizes would be {sizes}")
    out, start = [], 0
    for s in sizes:
        out.append(layer_fqns[start: start + s])
        start += s
    return out


def plan_pipeline(model: nn.Module, job_config: JobConfig, pp: int, local_batch_size: int) -> PipelinePlan:
    """Validate the pipeline layout against the (meta-device) model and decide every stage's modules."""
    par = job_config.parallelism
    schedule, csv_path = par.pipeline_parallel_schedule, par.pipeline_parallel_schedule_csv or None
    if csv_path:
        if not Path(csv_path).is_file():
            raise ConfigError(f"`parallelism.pipeline_parallel_schedule_csv` = {csv_path!r}: no such file")
        if _csv_ranks(csv_path) != pp:
            raise ConfigError(f"`parallelism.pipeline_parallel_schedule_csv` = {csv_path!r} has "
                              f"{_csv_ranks(csv_path)} rank rows but pipeline_parallel_degree = {pp}")
        schedule = "CSV"
    elif schedule not in SCHEDULES:
        raise ConfigError(f"`parallelism.pipeline_parallel_schedule` = {schedule!r} is invalid: allowed "
                          f"{', '.join(SCHEDULES)} (or a file in pipeline_parallel_schedule_csv)")
    mb = par.pipeline_parallel_microbatch_size
    if mb < 1 or local_batch_size % mb:
        raise ConfigError(f"`parallelism.pipeline_parallel_microbatch_size` = {mb} must divide "
                          f"training.local_batch_size = {local_batch_size}")
    multi = schedule in LOOP_SCHEDULES + V_SCHEDULES
    layer_fqns = [f"layers.{k}" for k in model.layers.keys()]

    explicit = par.module_fqns_per_model_part
    if explicit:
        num_stages = len(explicit)
    elif par.pipeline_parallel_layers_per_stage:
        lps = par.pipeline_parallel_layers_per_stage
        effective = len(layer_fqns) + par.pipeline_parallel_first_stage_less_layers + \
            par.pipeline_parallel_last_stage_less_layers
        num_stages = math.ceil(effective / lps)
    else:
        num_stages = pp * (2 if multi else 1)
    if num_stages % pp:
        raise ConfigError(f"{num_stages} pipeline stages cannot be placed evenly on pipeline_parallel_degree = {pp}")
    stages_per_rank = num_stages // pp
    if schedule in SINGLE_STAGE_SCHEDULES and stages_per_rank != 1:
        raise ConfigError(f"schedule {schedule} runs one stage per rank, but the layout gives "
                          f"{stages_per_rank} ({num_stages} stages on {pp} ranks)")
    if multi and stages_per_rank < 2:
        raise ConfigError(f"schedule {schedule} needs at least two stages per rank, but the layout gives "
                          f"{stages_per_rank} ({num_stages} stages on {pp} ranks)")
    if schedule in V_SCHEDULES and stages_per_rank != 2:
        raise ConfigError(f"schedule {schedule} places exactly two stages per rank (V shape), got {stages_per_rank}")
    style = "v" if schedule in V_SCHEDULES else "loop"

    if explicit:
        fqns_per_stage = [list(stage) for stage in explicit]
    else:
        fqns_per_stage = split_layers(layer_fqns, num_stages, par.pipeline_parallel_first_stage_less_layers,
                                      par.pipeline_parallel_last_stage_less_layers)
    plan = PipelinePlan(pp=pp, schedule=schedule, csv_path=csv_path, stages_per_rank=stages_per_rank,
                        style=style, fqns_per_stage=fqns_per_stage, n_microbatches=local_batch_size // mb,
                        microbatch_size=mb)
    try:
        plan.fqns_per_stage = model.pipeline_stage_modules(
            fqns_per_stage, first_and_last_share_rank=plan.first_and_last_share_rank)
    except ValueError as e:
        raise ConfigError(f"pipeline layout: {e}") from None
    _check_cover(model, plan)
    return plan


def _pipeline_units(model: nn.Module) -> list[str]:
    """Every unit a stage can hold: children, and the entries of ModuleDict children."""
    units = []
    for name, child in model.named_children():
        if isinstance(child, nn.ModuleDict):
            units += [f"{name}.{k}" for k in child.keys()]
        elif child is not None:
            units.append(name)
    return units


def _check_cover(model: nn.Module, plan: PipelinePlan) -> None:
    """Every module on exactly one stage; a second stage on the *same rank* may share it (tied module)."""
    units = set(_pipeline_units(model))
    seen: dict[str, int] = {}
    for stage, fqns in enumerate(plan.fqns_per_stage):
        for fqn in fqns:
            if fqn not in units:
                raise ConfigError(f"`parallelism.module_fqns_per_model_part`: stage {stage} names unknown module "
                                  f"{fqn!r}; modules are {', '.join(sorted(units))}")
            if fqn in seen and (fqns.count(fqn) > 1 or plan.rank_of_stage(seen[fqn]) != plan.rank_of_stage(stage)):
                raise ConfigError(f"`parallelism.module_fqns_per_model_part`: module {fqn!r} is placed on stages "
                                  f"{seen[fqn]} and {stage}; each module belongs to exactly one stage")
            seen.setdefault(fqn, stage)
    missing = sorted(units - set(seen))
    if missing:
        raise ConfigError(f"`parallelism.module_fqns_per_model_part` leaves modules on no stage: {', '.join(missing)}")


def prune_to_stage(model: nn.Module, fqns: list[str]) -> nn.Module:
    """A copy of ``model`` holding only ``fqns`` (absent modules become None / leave their ModuleDict)."""
    part = copy.deepcopy(model)
    keep = set(fqns)
    for name, child in list(part.named_children()):
        if isinstance(child, nn.ModuleDict):
            for key in list(child.keys()):
                if f"{name}.{key}" not in keep:
                    del child[key]
        elif name not in keep:
            setattr(part, name, None)
    return part


@dataclass
class PipelineParts:
    """What the trainer drives: this rank's stage modules and the schedule."""

    plan: PipelinePlan
    model_parts: list[nn.Module]
    stages: list[PipelineStage]
    schedule: object
    has_first_stage: bool
    has_last_stage: bool
    replicas: "ReplicaSync"

    def step(self, input_ids, positions, targets, global_valid_tokens) -> None:
        kwargs = dict(positions=positions, input_ids=input_ids,
                      loss_kwargs={"global_valid_tokens": global_valid_tokens})
        if self.has_last_stage:
            kwargs.update(target=targets, losses=[])
        args = (input_ids,) if self.has_first_stage else ()
        self.schedule.step(*args, **kwargs)


class ReplicaSync:
    """Keeps model-declared replicas (``model.pipeline_replicas``: replica prefix -> source prefix, e.g. the
    last stage's ``mtp_embed`` of stage 0's ``embed``) equal to their source.

    Both start from the same per-FQN init; after backward their gradients are summed over the two ranks
    (for every data-parallel coordinate, on the local FSDP shards), so both optimizers take the same step.
    The replica is left out of the grad norm and of checkpoints, and re-copied from the source after a load.
    """

    def __init__(self, plan: PipelinePlan, model: nn.Module, parts: list[nn.Module], stage_ids: list[int],
                 mesh_ranks: torch.Tensor | None, pp_rank: int):
        self.pairs: list[tuple[nn.Parameter, dist.ProcessGroup | None]] = []
        self.replica_params: set[int] = set()
        self.groups: list[dist.ProcessGroup] = []
        replicas = getattr(model, "pipeline_replicas", {})
        for replica, source in replicas.items():
            holder = {u: i for i, fqns in enumerate(plan.fqns_per_stage) for u in fqns}
            if replica not in holder:
                continue
            ranks = (plan.rank_of_stage(holder[source]), plan.rank_of_stage(holder[replica]))
            my_group = None
            if mesh_ranks is not None:  # every rank creates every group, in the same order
                flat = mesh_ranks.reshape(mesh_ranks.shape[0], -1)
                for column in range(flat.shape[1]):
                    pair = sorted({int(flat[ranks[0], column]), int(flat[ranks[1], column])})
                    group = dist.new_group(pair)
                    if dist.get_rank() in pair:
                        my_group = group
            for part, stage in zip(parts, stage_ids):
                for unit, prefix in ((source, source), (replica, replica)):
                    if unit in plan.fqns_per_stage[stage] and getattr(part, unit, None) is not None:
                        for p in getattr(part, unit).parameters():
                            self.pairs.append((p, my_group))
                            if unit == replica:
                                self.replica_params.add(id(p))

    @torch.no_grad()
    def reduce_grads(self) -> None:
        for p, group in self.pairs:
            if group is not None and p.grad is not None:
                grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                dist.all_reduce(grad, group=group)

    @torch.no_grad()
    def copy_from_source(self) -> None:
        """After loading weights into the source: broadcast them into the replica."""
        for p, group in self.pairs:
            if group is not None:
                data = p.to_local() if hasattr(p, "to_local") else p
                # two members: summing "my rank if I hold the source else 0" yields the source's rank
                source = torch.tensor([0 if id(p) in self.replica_params else dist.get_rank()])
                dist.all_reduce(source, group=group)
                dist.broadcast(data, src=int(source.item()), group=group)


def build_pipeline(model: nn.Module, plan: PipelinePlan, pp_rank: int, pp_group: dist.ProcessGroup,
                   mesh_ranks: torch.Tensor | None, device: torch.device, loss_fn,
                   parallelize_and_materialize, seq_len: int, dtype: torch.dtype) -> PipelineParts:
    """Build this rank's stages from the meta-device ``model``: prune, parallelize, materialise, link shared
    modules, wrap in ``PipelineStage`` and build the schedule."""
    parts, stages = [], []
    stage_ids = plan.stage_ids(pp_rank)
    owners: dict[str, nn.Module] = {}
    for stage_index in stage_ids:
        fqns = plan.fqns_per_stage[stage_index]
        shared = [f for f in fqns if f in owners]  # already held by an earlier stage of this rank
        part = prune_to_stage(model, [f for f in fqns if f not in shared])
        part = parallelize_and_materialize(part)
        for fqn in shared:
            # a plain (unregistered) reference: parameters stay owned, counted and saved once
            object.__setattr__(part, fqn, getattr(owners[fqn], fqn))
        for fqn in fqns:
            owners.setdefault(fqn, part)
        inputs_meta, outputs_meta = model.pipeline_stage_metas(
            stage_index=stage_index, num_stages=plan.num_stages, microbatch_size=plan.microbatch_size,
            seq_len=seq_len, dtype=dtype)
        stages.append(PipelineStage(part, stage_index, plan.num_stages, device, input_args=inputs_meta,
                                    output_args=outputs_meta, group=pp_group))
        parts.append(part)
    try:
        if plan.schedule == "CSV":
            schedule = _PipelineScheduleRuntime(stages, n_microbatches=plan.n_microbatches, loss_fn=loss_fn,
                                                scale_grads=False)
            schedule._load_csv(plan.csv_path)
        else:
            cls = get_schedule_class(plan.schedule)
            if issubclass(cls, PipelineScheduleSingle):
                schedule = cls(stages[0], n_microbatches=plan.n_microbatches, loss_fn=loss_fn, scale_grads=False)
            else:
                assert issubclass(cls, PipelineScheduleMulti)
                schedule = cls(stages, n_microbatches=plan.n_microbatches, loss_fn=loss_fn, scale_grads=False)
    except (ValueError, AssertionError, RuntimeError) as e:
        raise ConfigError(f"pipeline schedule {plan.schedule} rejects this layout ({plan.num_stages} stages, "
                          f"{plan.n_microbatches} microbatches): {e}") from None
    replicas = ReplicaSync(plan, model, parts, stage_ids, mesh_ranks, pp_rank)
    return PipelineParts(plan=plan, model_parts=parts, stages=stages, schedule=schedule,
                         has_first_stage=0 in stage_ids, has_last_stage=plan.num_stages - 1 in stage_ids,
                         replicas=replicas)


def pipeline_model(*args, **kwargs) -> PipelineParts:
    """``pipelining_fn`` of the registry."""
    return build_pipeline(*args, **kwargs)
