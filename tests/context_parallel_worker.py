"""torchrun worker: DeepSeek-V4 under context parallelism (each rank one contiguous shard of every
sequence) against the same model on whole sequences in one process, same weights and batch.

    torchrun --nproc_per_node N tests/context_parallel_worker.py OUT.json CASE [CASE ...]

Packed documents start and end inside shards, on a shard boundary, and span one; MTP depth 2 reads ids and
targets across boundaries; the indexer trains (its KL on the shard's queries only). Cases: the torch path in
fp64 (any difference is a bug, not rounding) and the fused Triton kernels (CPU: Triton's interpreter) in fp32.
CASE: ``torch_fp64`` | ``triton_fp32``. Reported per case: the relative errors of the objective, the
indexer KL (logged) and every gradient (summed over the shards).
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from launch import finish_worker, run_worker
from titan_dsv4.components.loss import build_targets
from titan_dsv4.distributed.context_parallel import ContextParallel
from titan_dsv4.distributed.utils import init_distributed
from titan_dsv4.models.deepseek_v4.flavors import FLAVORS
from titan_dsv4.models.deepseek_v4.model import DeepseekV4Model

BATCH, LOCAL = 2, 64  # tokens per shard: more than the debug model's 32-token halo


def batch(seq: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ids, positions (documents: row 0 restarts at 40, at the first shard boundary and 30 tokens before the
    end; row 1 holds a 20-token document across the middle) and MTP-depth-2 targets."""
    ids = torch.randint(0, FLAVORS["debugmodel_mtp2"].vocab_size, (BATCH, seq + 1),
                        generator=torch.Generator().manual_seed(1))
    positions = torch.arange(seq).repeat(BATCH, 1)
    for row, starts in ((0, (40, LOCAL, seq - 30)), (1, (seq // 2 - 10, seq // 2 + 10))):
        for start in starts:
            positions[row, start:] -= positions[row, start].clone()
    return ids[:, :-1], positions, build_targets(ids[:, 1:], positions, 2)


def loss_and_grads(model: DeepseekV4Model, shard: ContextParallel | None,
                   tensors) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The objective, the indexer KL summed over queries and CSA layers, every parameter's gradient."""
    model.zero_grad()
    model.set_sequence_shard(shard)
    ids, positions, targets = tensors if shard is None else (shard.part(t) for t in tensors)
    objective, _ = model(ids, positions, targets=targets)
    objective.backward()
    objective = objective.detach().clone()
    kl_buffers = [b for n, b in model.named_buffers() if n.endswith("indexer.kl_sum")]
    kl = torch.stack(kl_buffers).sum()
    for b in kl_buffers:
        b.zero_()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    if shard is not None:  # each shard's share of the whole sequence's sums
        for t in (objective, kl, *grads.values()):
            dist.all_reduce(t)
    return objective, kl, grads


def run_case(kernel: str, dtype: torch.dtype) -> dict:
    args = FLAVORS["debugmodel_mtp2"]
    model = DeepseekV4Model(args)
    model.init_weights(0)
    model = model.to(dtype)
    model.set_mtp_loss_scale(0.3)
    model.set_indexer_loss_scale(0.01)
    model.set_attention_kernel(kernel)
    tensors = batch(LOCAL * dist.get_world_size())
    got, got_kl, got_grads = loss_and_grads(model, ContextParallel(dist.group.WORLD, args.context_parallel_halo),
                                            tensors)
    want, want_kl, want_grads = loss_and_grads(model, None, tensors)
    grad_err = max(float((got_grads[n] - g).abs().max() / g.abs().max().clamp(min=1e-30))
                   for n, g in want_grads.items())
    return {"loss_rel_err": float((got - want).abs() / want.abs()), "grad_rel_err": grad_err,
            "missing_grads": sorted(set(want_grads) - set(got_grads)), "indexer_kl": float(want_kl),
            "indexer_kl_rel_err": float((got_kl - want_kl).abs() / want_kl)}


def main() -> None:
    init_distributed(torch.device("cpu"))
    cases = {"torch_fp64": ("torch", torch.float64), "triton_fp32": ("triton", torch.float32)}
    finish_worker(sys.argv[1], {case: run_case(*cases[case]) for case in sys.argv[2:]})


if __name__ == "__main__":
    run_worker(main)
