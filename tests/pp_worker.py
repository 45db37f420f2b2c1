"""torchrun worker: for each pipeline case, one training step with the real splitter/schedules, compared with
a single-process reference on the same weights and batch (loss parts and every gradient).

    torchrun --nproc_per_node N tests/pp_worker.py OUT.json CASE [CASE ...]   (CASE = schedule:depth[:csv])
"""

from __future__ import annotations

import dataclasses
import sys

import torch
import torch.distributed as dist

from launch import finish_worker, run_worker
from titan_dsv4.components.load_balance import update_expert_bias
from titan_dsv4.components.loss import MTPLoss, build_targets
from titan_dsv4.config.job_config import JobConfig
from titan_dsv4.distributed.parallel_dims import ParallelDims
from titan_dsv4.distributed.pipeline import build_pipeline, plan_pipeline
from titan_dsv4.distributed.utils import init_distributed
from titan_dsv4.models.deepseek_v4 import FLAVORS, DeepseekV4Model
from titan_dsv4.models.deepseek_v4.init import canonical_fqn

SEQ, BATCH, SEED = 48, 4, 3


def test_args(depth: int, pp: int):
    base = FLAVORS["debugmodel"]
    layers = 8 if pp > 2 else 4
    ratios = ([0, 4, 16, 4] * 2)[:layers]
    return dataclasses.replace(base.with_mtp_layers(0), num_hidden_layers=layers, compress_ratios=ratios,
                               num_hash_layers=3, sliding_window=16, num_nextn_predict_layers=depth)


def make_batch(vocab: int):
    g = torch.Generator().manual_seed(SEED)
    ids = torch.randint(0, vocab, (BATCH, SEQ), generator=g)
    positions = torch.cat([torch.arange(30), torch.arange(SEQ - 30)]).expand(BATCH, SEQ).clone()
    positions[1] = torch.arange(SEQ)
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = -100
    labels[positions.roll(-1, dims=1) == 0] = -100
    labels[2, :5] = -100
    return ids, positions, labels


def run_case(schedule: str, depth: int, csv: str | None, dims: ParallelDims) -> dict:
    args = test_args(depth, dims.pp)
    ids, positions, labels = make_batch(args.vocab_size)
    targets = build_targets(labels, positions, depth)
    n_valid = (targets[..., 0] != -100).sum().float()

    reference = DeepseekV4Model(args).double()  # fp64: only summation order differs, so compare tightly
    reference.init_weights(SEED)
    reference.train()
    reference.set_mtp_loss_scale(0.3)
    ref_loss = MTPLoss()
    ref_loss(reference(ids, positions, targets=targets), targets, n_valid).backward()
    ref_parts = ref_loss.take_parts()
    ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}

    config = JobConfig()
    config.parallelism.pipeline_parallel_degree = dims.pp
    config.parallelism.pipeline_parallel_schedule = schedule
    config.parallelism.pipeline_parallel_schedule_csv = csv or ""
    config.parallelism.pipeline_parallel_microbatch_size = 1
    with torch.device("meta"):
        meta = DeepseekV4Model(args)
    plan = plan_pipeline(meta, config, dims.pp, BATCH)
    loss_fn = MTPLoss()

    def materialize(part):
        part.to_empty(device="cpu").double()
        part.init_weights(SEED)
        part.train()
        part.set_mtp_loss_scale(0.3)
        return part

    pp_mesh = dims.mesh["pp"]
    parts = build_pipeline(meta, plan, pp_mesh.get_local_rank(), pp_mesh.get_group(), dims.mesh.mesh,
                           torch.device("cpu"), loss_fn, materialize, SEQ, torch.float64)
    parts.step(ids, positions, targets, n_valid)
    parts.ties.reduce_grads()
    # aux-loss-free balancing: per-stage expert loads summed over microbatches move each bias like the reference
    update_expert_bias([reference], 1e-3, None)
    update_expert_bias(parts.model_parts, 1e-3, None)
    ref_buffers = dict(reference.named_buffers())
    bias_err = max((float((b - ref_buffers[canonical_fqn(n)]).abs().max())
                    for part in parts.model_parts for n, b in part.named_buffers() if n.endswith("gate.bias")),
                   default=0.0)

    errors = {"parts": 0.0, "grads": 0.0, "missing": 0}
    worst = ("", 0.0)
    if parts.has_last_stage:
        got = loss_fn.take_parts(last=plan.n_microbatches)
        errors["parts"] = float(((got - ref_parts).abs() / ref_parts.abs().clamp(min=1)).max())
    checked = set()
    for part in parts.model_parts:
        for name, p in part.named_parameters():
            if id(p) in parts.ties.local_followers:
                continue  # its gradient was added into the owner's
            name = canonical_fqn(name)
            source = name.replace("mtp_embed.", "embed.")
            if p.grad is None:
                if source in ref_grads:
                    errors["missing"] += 1
                continue
            checked.add(source)
            scale = ref_grads[source].abs().max().clamp(min=1e-6)
            err = float((p.grad - ref_grads[source]).abs().max() / scale)
            errors["grads"] = max(errors["grads"], err)
            worst = max(worst, (name, err), key=lambda w: w[1])
    counted = [0] * len(ref_grads)
    names = sorted(ref_grads)
    for i, n in enumerate(names):
        counted[i] = 1 if n in checked else 0
    coverage = torch.tensor(counted, dtype=torch.long)
    dist.all_reduce(coverage)
    errors["uncovered"] = int((coverage == 0).sum())
    moved = max((float(b.abs().max()) for part in parts.model_parts for n, b in part.named_buffers()
                 if n.endswith("gate.bias")), default=0.0)
    result = torch.tensor([errors["parts"], errors["grads"], float(errors["missing"]), bias_err, moved])
    dist.all_reduce(result, op=dist.ReduceOp.MAX)
    worsts = [None] * dist.get_world_size()
    dist.all_gather_object(worsts, worst)
    return {"parts_rel_err": float(result[0]), "grad_rel_err": float(result[1]), "missing_grads": int(result[2]),
            "expert_bias_err": float(result[3]), "expert_bias_moved": float(result[4]),
            "uncovered_params": errors["uncovered"], "worst_grad": max(worsts, key=lambda w: w[1])[0],
            "stages": plan.num_stages}


def main() -> None:
    out, cases = sys.argv[1], sys.argv[2:]
    init_distributed(torch.device("cpu"))
    world = dist.get_world_size()
    dims = ParallelDims(dp_replicate=1, dp_shard=1, pp=world, ep=1, world_size=world)
    dims.build_mesh("cpu")
    results = {}
    for case in cases:
        schedule, depth, *csv = case.split(":", 2)
        try:
            results[case] = run_case(schedule, int(depth), csv[0] if csv else None, dims)
        except Exception as e:  # report, keep going with the other cases
            results[case] = {"error": f"{type(e).__name__}: {e}"}
            raise
    finish_worker(out, results)


if __name__ == "__main__":
    run_worker(main)
