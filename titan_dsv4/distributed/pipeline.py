"""Generic pipeline splitter and schedule builder on ``torch.distributed.pipelining``.

The splitter knows nothing about the model beyond its ``layers`` ModuleDict and the replicas it declares
(``model.pipeline_replicas``, see :class:`TiedParameters`); every model-specific decision goes through two
model-owned hooks:

* ``model.pipeline_stage_modules(fqns_per_stage)`` -> the module FQNs each stage holds (DeepSeek-V4 puts
  the embedding on stage 0 and hc_head, norm, head, the MTP blocks and an embedding replica on the last);
* ``model.pipeline_stage_metas(stage_index=, num_stages=, microbatch_size=, seq_len=, dtype=)`` -> meta
  tensors for what the stage receives and sends.

Planning (:func:`plan_pipeline`) is pure arithmetic on a meta-device model, so every layout error is
reported before any process group exists.
"""

from __future__ import annotations

import copy
import csv
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (
    PipelineScheduleMulti,
    PipelineScheduleSingle,
    _Action,
    _PipelineScheduleRuntime,
    get_schedule_class,
)

from ..config.job_config import JobConfig
from ..config.manager import ConfigError
from .utils import local_shard

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


def _csv_stages(path: str) -> list[list[int]]:
    """Stage indices each rank row of a compute-only schedule CSV (cells like ``0F1``, ``2B0``: stage, action
    F/B/I/W, microbatch) runs."""
    stages = []
    with open(path, newline="") as f:
        for line, row in enumerate(csv.reader(f), 1):
            cells = [cell.strip() for cell in row if cell.strip()]
            bad = next((cell for cell in cells if not re.fullmatch(r"\d+[FBIW]\d+", cell)), None)
            if bad is not None:
                raise ConfigError(f"`parallelism.pipeline_parallel_schedule_csv` = {path!r}: line {line} has "
                                  f"{bad!r}; cells are STAGE ACTION MICROBATCH with action F, B, I or W (e.g. 0F1)")
            if row:
                stages.append(sorted({int(re.match(r"\d+", cell).group()) for cell in cells}))
    return stages


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
    csv_stages = None
    if csv_path:
        if not Path(csv_path).is_file():
            raise ConfigError(f"`parallelism.pipeline_parallel_schedule_csv` = {csv_path!r}: no such file")
        csv_stages = _csv_stages(csv_path)
        if len(csv_stages) != pp:
            raise ConfigError(f"`parallelism.pipeline_parallel_schedule_csv` = {csv_path!r} has "
                              f"{len(csv_stages)} rank rows but pipeline_parallel_degree = {pp}")
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
    if csv_stages:
        num_stages = 1 + max(max(r, default=0) for r in csv_stages)
        source = f"`parallelism.pipeline_parallel_schedule_csv` = {csv_path!r} runs {num_stages} stages"
    elif explicit:
        num_stages = len(explicit)
        source = f"`parallelism.module_fqns_per_model_part` names {num_stages} stages"
    elif par.pipeline_parallel_layers_per_stage:
        lps = par.pipeline_parallel_layers_per_stage
        effective = len(layer_fqns) + par.pipeline_parallel_first_stage_less_layers + \
            par.pipeline_parallel_last_stage_less_layers
        num_stages = math.ceil(effective / lps)
        source = (f"`parallelism.pipeline_parallel_layers_per_stage` = {lps} gives {num_stages} stage"
                  f"{'s' if num_stages > 1 else ''} for {len(layer_fqns)} layers (+{effective - len(layer_fqns)} "
                  "for the embedding and the head)")
    else:
        num_stages = pp * (2 if multi else 1)
        source = f"schedule {schedule} on pipeline_parallel_degree = {pp} gives {num_stages} stages"
    if num_stages % pp or num_stages < pp:
        raise ConfigError(f"{source}, which cannot be placed evenly on pipeline_parallel_degree = {pp}")
    stages_per_rank = num_stages // pp
    if schedule in SINGLE_STAGE_SCHEDULES and stages_per_rank != 1:
        raise ConfigError(f"schedule {schedule} runs one stage per rank, but {source}: {stages_per_rank} per rank "
                          f"on pipeline_parallel_degree = {pp}")
    if multi and stages_per_rank < 2:
        raise ConfigError(f"schedule {schedule} needs at least two stages per rank, but {source}: "
                          f"{stages_per_rank} per rank on pipeline_parallel_degree = {pp}")
    if schedule in V_SCHEDULES and stages_per_rank != 2:
        raise ConfigError(f"schedule {schedule} places exactly two stages per rank (V shape), got {stages_per_rank}")
    style = "v" if schedule in V_SCHEDULES else "loop"
    if csv_stages:
        per_rank = num_stages // pp
        loop = [[r + i * pp for i in range(per_rank)] for r in range(pp)]
        v = [sorted([r, 2 * pp - 1 - r]) for r in range(pp)]
        if csv_stages == loop:
            style = "loop"
        elif per_rank == 2 and csv_stages == v:
            style = "v"
        else:
            raise ConfigError(f"`parallelism.pipeline_parallel_schedule_csv` = {csv_path!r}: ranks run stages "
                              f"{csv_stages}; supported placements are loop {loop} or V {v}")

    if explicit:
        fqns_per_stage = [list(stage) for stage in explicit]
    else:
        fqns_per_stage = split_layers(layer_fqns, num_stages, par.pipeline_parallel_first_stage_less_layers,
                                      par.pipeline_parallel_last_stage_less_layers)
    plan = PipelinePlan(pp=pp, schedule=schedule, csv_path=csv_path, stages_per_rank=stages_per_rank,
                        style=style, fqns_per_stage=fqns_per_stage, n_microbatches=local_batch_size // mb,
                        microbatch_size=mb)
    try:
        plan.fqns_per_stage = model.pipeline_stage_modules(fqns_per_stage)
    except ValueError as e:
        raise ConfigError(f"pipeline layout: {e}") from None
    _check_cover(model, plan.fqns_per_stage)
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


def _check_cover(model: nn.Module, fqns_per_stage: list[list[str]]) -> None:
    """Every module on exactly one stage."""
    units = set(_pipeline_units(model))
    seen: dict[str, int] = {}
    for stage, fqns in enumerate(fqns_per_stage):
        for fqn in fqns:
            if fqn not in units:
                raise ConfigError(f"`parallelism.module_fqns_per_model_part`: stage {stage} names unknown module "
                                  f"{fqn!r}; modules are {', '.join(sorted(units))}")
            if fqn in seen:
                raise ConfigError(f"`parallelism.module_fqns_per_model_part`: module {fqn!r} is placed on stages "
                                  f"{seen[fqn]} and {stage}; each module belongs to exactly one stage")
            seen[fqn] = stage
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
    ties: TiedParameters
    stream_meta: torch.Tensor  # what crosses a stage boundary (meta device; microbatch-sized)

    def step(self, input_ids, positions, targets, global_valid_tokens) -> None:
        # targets reach the last stage's forward (its head runs fused with the cross-entropy) and the loss
        kwargs = dict(positions=positions, input_ids=input_ids, targets=targets,
                      loss_kwargs={"global_valid_tokens": global_valid_tokens})
        if self.has_last_stage:
            kwargs.update(target=targets, losses=[])
        args = (input_ids,) if self.has_first_stage else ()
        self.schedule.step(*args, return_outputs=False, **kwargs)

    @torch.no_grad()
    def forward_only(self, input_ids, positions, targets, loss_fn) -> None:
        """Validation: every microbatch forward through the stages, the last stage's outputs to ``loss_fn``.

        Not ``schedule.eval``: the V-shaped schedules (ZBVZeroBubble, DualPipeV) run backward actions in it
        (torch 2.13: "can't steal_bwd_input if this stage doesn't have backward"). Each rank runs its stages
        in ascending order, each over all microbatches, receiving blocking and sending without waiting, so
        the ranks work as a wavefront (the pipeline fills once) and no two wait on each other: a rank's
        input comes from a lower stage, which its holder runs no later in its own order. At most all
        microbatches' boundary tensors wait to be received at once, less than a training step keeps."""
        plan, group = self.plan, self.stages[0].group
        here, size = self.stages[0].group_rank, plan.microbatch_size
        microbatches = [tuple(t[start:start + size] for t in (input_ids, positions, targets))
                        for start in range(0, input_ids.shape[0], size)]
        kept, sends = {}, []
        for stage in sorted(self.stages, key=lambda s: s.stage_index):
            index = stage.stage_index
            for m, (ids, pos, tgt) in enumerate(microbatches):
                if index == 0:
                    x = ids
                elif plan.rank_of_stage(index - 1) == here:
                    x = kept.pop((index - 1, m))
                else:
                    x = torch.empty((len(ids), *self.stream_meta.shape[1:]), dtype=self.stream_meta.dtype,
                                    device=stage.device)
                    dist.recv(x, group=group, group_src=plan.rank_of_stage(index - 1))
                y = stage.submod(x, positions=pos, input_ids=ids, targets=tgt)
                if index == plan.num_stages - 1:
                    loss_fn(y, tgt)
                elif plan.rank_of_stage(index + 1) == here:
                    kept[(index, m)] = y
                else:
                    sends.append(dist.isend(y.contiguous(), group=group, group_dst=plan.rank_of_stage(index + 1)))
        for work in sends:
            work.wait()


class TiedParameters:
    """Model-declared replicas (``model.pipeline_replicas``: replica prefix -> source prefix, e.g. the last
    stage's ``mtp_embed`` of stage 0's ``embed``) that must behave as one parameter.

    Both start from the same per-FQN init. The replica is left out of the grad norm and of checkpoints.

    * Source and replica on different ranks: after backward their gradients are summed over the two ranks
      (for every data-parallel coordinate, on the local FSDP shards), so both optimizers take the same step.
    * On the same rank (V-shaped schedules put stages 0 and 2pp-1 together): no communication and one
      optimizer state — the replica's gradient is added into the source's, and the replica is refreshed from
      the source after every optimizer step. (It cannot simply *be* the source module: torch's zero-bubble
      schedules take weight gradients per stage from the stage's own parameters, and a module registered in
      two stages fails their split backward with "Trying to backward through the graph a second time".)
    """

    def __init__(self) -> None:
        self.cross_rank: list[tuple[nn.Parameter, dist.ProcessGroup | None, bool]] = []  # (param, group, replica?)
        self.local: list[tuple[nn.Parameter, nn.Parameter]] = []  # (source, replica) on this rank
        self.followers: set[int] = set()  # replicas: left out of the grad norm (counted through the source)
        self.local_followers: set[int] = set()  # same-rank replicas: also left out of the optimizer

    def add(self, plan: PipelinePlan, model: nn.Module, parts: list[nn.Module], stage_ids: list[int],
            mesh_ranks: torch.Tensor | None) -> None:
        holder = {u: i for i, fqns in enumerate(plan.fqns_per_stage) for u in fqns}
        local_units = {u: part for part, stage in zip(parts, stage_ids) for u in plan.fqns_per_stage[stage]}
        for replica, source in getattr(model, "pipeline_replicas", {}).items():
            if replica not in holder:
                continue
            ranks = (plan.rank_of_stage(holder[source]), plan.rank_of_stage(holder[replica]))
            if ranks[0] == ranks[1]:
                if source in local_units:
                    for src, rep in zip(getattr(local_units[source], source).parameters(),
                                        getattr(local_units[replica], replica).parameters()):
                        self.local.append((src, rep))
                        self.followers.add(id(rep))
                        self.local_followers.add(id(rep))
                continue
            my_group = None
            if mesh_ranks is not None:  # every rank creates every group, in the same order
                flat = mesh_ranks.reshape(mesh_ranks.shape[0], -1)
                for column in range(flat.shape[1]):
                    pair = [int(flat[ranks[0], column]), int(flat[ranks[1], column])]
                    group = dist.new_group(sorted(pair))
                    if dist.get_rank() in pair:
                        my_group = group
            for unit in (source, replica):
                if unit in local_units:
                    for p in getattr(local_units[unit], unit).parameters():
                        self.cross_rank.append((p, my_group, unit == replica))
                        if unit == replica:
                            self.followers.add(id(p))

    @torch.no_grad()
    def reduce_grads(self) -> None:
        """After backward: every tied gradient becomes the sum of its uses."""
        for owner, follower in self.local:
            if follower.grad is not None:
                if owner.grad is None:
                    owner.grad = follower.grad.clone()
                else:
                    owner.grad += follower.grad
                follower.grad = None
        for p, group, _ in self.cross_rank:
            if group is not None and p.grad is not None:
                dist.all_reduce(local_shard(p.grad), group=group)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        for owner, follower in self.local:
            local_shard(follower).copy_(local_shard(owner))

    @torch.no_grad()
    def copy_from_source(self) -> None:
        """After loading weights into the sources: make every replica equal again."""
        self.after_optimizer_step()
        for p, group, is_replica in self.cross_rank:
            if group is not None:
                # two members: summing "my rank if I hold the source else 0" yields the source's rank
                source = torch.tensor([0 if is_replica else dist.get_rank()])
                dist.all_reduce(source, group=group)
                dist.broadcast(local_shard(p), src=int(source.item()), group=group)


def schedule_actions(plan: PipelinePlan, pp_rank: int) -> list[tuple[str, int]]:
    """``(kind, stage)`` compute actions of one pipeline rank, in order, from torch's own schedule
    (kind: F forward, B full backward, I input-gradient backward, W weight-gradient backward)."""
    if plan.schedule == "CSV":
        with open(plan.csv_path) as f:
            rows = [line.strip().split(",") for line in f if line.strip()]
        actions = [_Action.from_str(cell) for cell in rows[pp_rank] if cell.strip()]
    else:
        cls = get_schedule_class(plan.schedule)
        stages = [_ScheduleStage(s, plan.num_stages, plan.pp, pp_rank) for s in plan.stage_ids(pp_rank)]
        if plan.stages_per_rank == 1:
            schedule = cls(stages[0], plan.n_microbatches)
        else:
            schedule = cls(stages, plan.n_microbatches)
        actions = [a for a in schedule.pipeline_order[pp_rank] if a is not None]
    out = []
    for action in actions:
        for a in getattr(action, "sub_actions", None) or [action]:
            kind = str(a.computation_type)
            kind = {"FORWARD": "F", "FULL_BACKWARD": "B", "BACKWARD_INPUT": "I", "BACKWARD_WEIGHT": "W"}.get(
                kind.split(".")[-1], kind)
            if kind in ("F", "B", "I", "W"):
                out.append((kind, a.stage_index))
    return out


class _ScheduleStage:
    """What a torch schedule reads from its stages to lay out its actions."""

    def __init__(self, index: int, num_stages: int, pp: int, rank: int):
        self.stage_index, self.num_stages, self.group_size, self.group_rank = index, num_stages, pp, rank
        self.is_first, self.is_last = index == 0, index == num_stages - 1
        self.stage_index_to_group_rank: dict[int, int] = {}
        self.submod = nn.Identity()


def _weight_grads_in_input_pass():
    """``dw_builder`` making a zero-bubble stage compute its weight gradients in the input-gradient action.

    torch splits a stage's backward into input (I) and weight (W) actions by grouping parameters through the
    autograd nodes they share with the path to the stage input. On the MTP stage (replica embedding whose
    path joins the stream only inside each depth, D >= 2 depths) that grouping frees graph parts another
    group still needs: the W action fails with "Trying to backward through the graph a second time". With a
    ``dw_builder`` torch runs the full backward in I and the (empty) runner in W: exact gradients, and only
    this stage gives up the I/W split.
    """
    return lambda: None


def build_pipeline(model: nn.Module, plan: PipelinePlan, pp_rank: int, pp_group: dist.ProcessGroup,
                   mesh_ranks: torch.Tensor | None, device: torch.device, loss_fn,
                   parallelize_and_materialize, seq_len: int, dtype: torch.dtype) -> PipelineParts:
    """Build this rank's stages from the meta-device ``model``: prune, parallelize, materialise, wrap in
    ``PipelineStage``, build the schedule and tie replicas."""
    parts, stages = [], []
    stage_ids = plan.stage_ids(pp_rank)
    for stage_index in stage_ids:
        part = parallelize_and_materialize(prune_to_stage(model, plan.fqns_per_stage[stage_index]))
        inputs_meta, outputs_meta = model.pipeline_stage_metas(
            stage_index=stage_index, num_stages=plan.num_stages, microbatch_size=plan.microbatch_size,
            seq_len=seq_len, dtype=dtype)
        # what crosses a boundary: a last stage's input, any other stage's output
        stream_meta = (inputs_meta if stage_index == plan.num_stages - 1 else outputs_meta)[0]
        holds_replica = any(u in plan.fqns_per_stage[stage_index] for u in getattr(model, "pipeline_replicas", {}))
        stages.append(PipelineStage(part, stage_index, plan.num_stages, device, input_args=inputs_meta,
                                    output_args=outputs_meta, group=pp_group,
                                    dw_builder=_weight_grads_in_input_pass if holds_replica else None))
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
    ties = TiedParameters()
    ties.add(plan, model, parts, stage_ids, mesh_ranks)
    return PipelineParts(plan=plan, model_parts=parts, stages=stages, schedule=schedule,
                         has_first_stage=0 in stage_ids, has_last_stage=plan.num_stages - 1 in stage_ids,
                         ties=ties, stream_meta=stream_meta)
