"""torchrun worker: bf16 routed experts under expert parallelism (2 gloo ranks) against the same experts whole
in one process, on every rank's rows.

    torchrun --nproc_per_node 2 tests/expert_parallel_worker.py OUT.json

Reports the dtypes of the rows each all-to-all moved, and per rank the largest differences of the output
rows and of the row, routing-weight and expert-weight gradients from the single-process ones.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from launch import finish_worker, run_worker
from titan_dsv4.distributed import expert_parallel
from titan_dsv4.distributed.utils import init_distributed
from titan_dsv4.models.deepseek_v4.moe import RoutedExperts

EXPERTS, HIDDEN, INTER = 4, 16, 32


def rank_rows(rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s rows grouped by expert, routing weights, rows per expert, output gradient."""
    gen = torch.Generator().manual_seed(100 + rank)
    counts = torch.randint(0, 6, (EXPERTS,), generator=gen)
    counts[rank] = 0  # an expert that receives nothing from this rank
    rows = int(counts.sum())
    xs = torch.randn(rows, HIDDEN, generator=gen).bfloat16()
    ws = torch.rand(rows, 1, generator=gen)
    return xs, ws, counts, torch.randn(rows, HIDDEN, generator=gen).bfloat16()


def experts() -> RoutedExperts:
    torch.manual_seed(0)
    module = RoutedExperts(EXPERTS, HIDDEN, INTER, limit=7.0)
    for w in module.parameters():
        torch.nn.init.normal_(w, std=0.3)
    return module.bfloat16()


def run(module: RoutedExperts, xs, ws, counts, grad_out):
    xs, ws = xs.clone().requires_grad_(), ws.clone().requires_grad_()
    out = module(xs, ws, counts)
    out.backward(grad_out)
    return out.detach(), xs.grad, ws.grad


def main() -> None:
    init_distributed(torch.device("cpu"))
    rank, world = dist.get_rank(), dist.get_world_size()
    wire: list[str] = []
    moves = expert_parallel._all_to_all

    def recording(rows, *args):
        wire.append(str(rows.dtype))
        return moves(rows, *args)

    expert_parallel._all_to_all = recording
    sharded = experts()
    expert_parallel.apply_expert_parallel(sharded, init_device_mesh("cpu", (world,)))
    mine = rank_rows(rank)
    out, grad_xs, grad_ws = run(sharded, *mine)
    whole = experts()
    ref = run(whole, *mine)
    for other in range(world):  # the single process sees every rank's rows: the expert gradients sum them
        if other != rank:
            run(whole, *rank_rows(other))
    per = EXPERTS // world
    diffs = {name: (got.float() - want.float()).abs().max().item()
             for name, got, want in (("out", out, ref[0]), ("grad_xs", grad_xs, ref[1]), ("grad_ws", grad_ws, ref[2]))}
    for name in ("w1", "w2", "w3"):
        got = getattr(sharded, name).grad.to_local().float()
        want = getattr(whole, name).grad[rank * per:(rank + 1) * per].float()
        diffs[name] = ((got - want).abs().max() / want.abs().max()).item()
    gathered = [None] * world
    dist.all_gather_object(gathered, {"wire": wire, "diffs": diffs, "out_dtype": str(out.dtype)})
    finish_worker(sys.argv[1], gathered)


if __name__ == "__main__":
    run_worker(main)
