"""FSDP2 with bf16 mixed precision (what GPUs run) on 2 gloo processes, against one process holding the
same weights in the dtypes the spec prescribes: fp32 for the tensors the release keeps in fp32 (mHC mixes,
attention sinks, compressor position biases), bf16 for the rest.

    torchrun --nproc_per_node 2 tests/mixed_precision_worker.py OUT.json
"""

from __future__ import annotations

import dataclasses
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from launch import finish_worker, run_worker
from titan_dsv4.components.loss import MTPLoss, build_targets
from titan_dsv4.config.job_config import JobConfig
from titan_dsv4.distributed.parallel_dims import ParallelDims
from titan_dsv4.distributed.utils import init_distributed, reduce_replicated_grads
from titan_dsv4.models.deepseek_v4 import FLAVORS, DeepseekV4Model
from titan_dsv4.models.deepseek_v4.lora import is_adapter
from titan_dsv4.models.deepseek_v4.parallelize import apply_fsdp, fp32_replicated_parameters


def build(lora_rank: int = 0) -> DeepseekV4Model:
    args = FLAVORS["debugmodel"]
    if lora_rank:
        args = dataclasses.replace(args, lora_rank=lora_rank,
                                   lora_targets=["attn.wq_a", "attn.wkv", "ffn.experts.w2", "e_proj"])
    model = DeepseekV4Model(args)
    model.init_weights(0)
    model.set_mtp_loss_scale(0.3)
    return model.train()


def batch(rank: int, args):
    gen = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, args.vocab_size, (1, 64), generator=gen)
    positions = torch.arange(64).expand(1, 64)
    return ids, positions, build_targets(ids.roll(-1, 1), positions, args.num_nextn_predict_layers)


def record_compute_dtypes(model: torch.nn.Module) -> dict[str, str]:
    """The dtype of every parameter as its module's forward sees it (FSDP swaps in the gathered copy)."""
    seen: dict[str, str] = {}
    for module_name, module in model.named_modules():
        def hook(mod, args, prefix=module_name):
            for name, p in mod.named_parameters(recurse=False):
                seen[f"{prefix}.{name}"] = str(p.dtype)
        module.register_forward_pre_hook(hook)
    return seen


def main() -> None:
    out = sys.argv[1]
    init_distributed(torch.device("cpu"))
    rank, world = dist.get_rank(), dist.get_world_size()
    dims = ParallelDims(dp_replicate=1, dp_shard=world, pp=1, ep=1, world_size=world)
    dims.build_mesh("cpu")

    # the reference: the dtype split by hand, each rank's batch through one process
    reference = build()
    replicated = {id(p) for p in fp32_replicated_parameters(reference)}
    replicated_names = sorted(n for n, p in reference.named_parameters() if id(p) in replicated)
    for p in reference.parameters():
        if id(p) not in replicated:
            p.data = p.data.to(torch.bfloat16)
    ref_objectives = []
    for r in range(world):
        ids, positions, targets = batch(r, reference.args)
        objective, _ = reference(ids, positions, targets=targets)
        objective.backward()
        ref_objectives.append(objective.item())
    # (the indexer's compressor has no gradient from the LM loss: the indexer is frozen here)
    ref_grads = {n: p.grad.float() for n, p in reference.named_parameters()
                 if id(p) in replicated and p.grad is not None}

    model = build()
    apply_fsdp(model, dims, JobConfig(), torch.device("cpu"), param_dtype=torch.bfloat16)
    seen = record_compute_dtypes(model)
    ids, positions, targets = batch(rank, model.args)
    outputs = model(ids, positions, targets=targets)
    MTPLoss()(outputs, targets, 1.0).backward()
    params = dict(model.named_parameters())
    kept = [n for n, p in params.items() if not isinstance(p, DTensor)]
    reduce_replicated_grads(model.parameters(), dims.dp_cp_group())
    objectives = [torch.zeros(()) for _ in range(world)]
    dist.all_gather(objectives, outputs[0].detach().float())
    assert {n for n in kept if params[n].grad is not None} == ref_grads.keys()
    # bf16 activation gradients accumulate in another order under FSDP's hooks, and some of these gradients
    # are sums that cancel: compare against the largest of them all (a lost or doubled rank: tens of %)
    grad_err = max((params[n].grad.float() - ref_grads[n]).abs().max().item() for n in ref_grads)
    grad_scale = max(g.abs().max().item() for g in ref_grads.values())
    flat = torch.cat([params[n].grad.reshape(-1) for n in sorted(ref_grads)])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    lora = lora_case(dims, rank)
    finish_worker(out, {
        "lora": lora,
        "seen": seen, "kept_whole": sorted(kept),
        "kept_dtypes": sorted({str(params[n].dtype) for n in kept}),
        "replicated_names": replicated_names,
        "objectives": [o.item() for o in objectives], "ref_objectives": ref_objectives,
        "replicated_grad_rel_err": grad_err / grad_scale,
        "ranks_hold_equal_grads": all(torch.equal(g, gathered[0]) for g in gathered),
    })


def lora_case(dims: ParallelDims, rank: int) -> dict:
    """LoRA under the same mixed precision: the frozen weights are stored in bf16 (FSDP's compute dtype), the
    adapters and fp32-kept tensors in fp32; with B = 0 each rank's objective is the base model's, bit for bit
    the reference's above; only the adapters get gradients."""
    config = JobConfig()
    config.lora.rank = 8
    model = build(lora_rank=8)
    for name, p in model.named_parameters():  # as the trainer freezes them
        p.requires_grad_(is_adapter(name))
    apply_fsdp(model, dims, config, torch.device("cpu"), param_dtype=torch.bfloat16)
    stored = {n: str(p.dtype) for n, p in model.named_parameters()}
    seen = record_compute_dtypes(model)
    ids, positions, targets = batch(rank, model.args)
    outputs = model(ids, positions, targets=targets)
    MTPLoss()(outputs, targets, 1.0).backward()
    objectives = [torch.zeros(()) for _ in range(dist.get_world_size())]
    dist.all_gather(objectives, outputs[0].detach().float())
    return {"stored": stored, "seen": seen, "objectives": [o.item() for o in objectives],
            "with_grads": sorted(n for n, p in model.named_parameters() if p.grad is not None)}


if __name__ == "__main__":
    run_worker(main)
