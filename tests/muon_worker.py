"""torchrun worker (4 gloo ranks): Muon's orthogonalization of sharded updates against each matrix's
``hybrid_newton_schulz`` in one process. FSDP-like row shards over 4 ranks (uneven: 7 rows as 2+2+2+1, 2 rows
leave two ranks empty) and HSDP-like ones (2 replicas x 2 shards) in one call, grouped weights, stacked
experts sharded by expert, and a weight kept whole.

    torchrun --nproc_per_node 4 tests/muon_worker.py OUT.json

Writes, per rank, the largest difference of each update's part from the single-process one.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

from launch import finish_worker, run_worker
from titan_dsv4.components.muon import hybrid_newton_schulz, orthogonalized
from titan_dsv4.distributed.utils import init_distributed, local_shard


def main() -> None:
    init_distributed(torch.device("cpu"))
    flat = init_device_mesh("cpu", (4,), mesh_dim_names=("fsdp",))
    hsdp = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    gen = torch.Generator().manual_seed(0)
    cases = [((7, 5), 1, flat, [Shard(0)]), ((2, 6), 1, flat, [Shard(0)]), ((12, 4), 3, flat, [Shard(0)]),
             ((9, 3), 1, hsdp, [Replicate(), Shard(0)]), ((6, 8), 2, hsdp, [Replicate(), Shard(0)]),
             ((4, 3, 5), 4, flat, [Shard(0)]), ((5, 5), 1, None, None)]
    fulls = [torch.randn(shape, generator=gen) for shape, *_ in cases]
    params = [distribute_tensor(full, mesh, placements) if mesh else full.clone()
              for full, (_, _, mesh, placements) in zip(fulls, cases)]
    got = orthogonalized([(p, count, local_shard(p)) for p, (_, count, _, _) in zip(params, cases)])
    errors = []
    for full, (shape, count, mesh, placements), part in zip(fulls, cases, got):
        want = hybrid_newton_schulz(full.reshape(-1, *full.shape[-2:]) if full.ndim == 3
                                    else full.view(count, -1, full.shape[-1])).view(full.shape)
        if mesh is not None:
            want = distribute_tensor(want, mesh, placements).to_local()
        errors.append(float((part - want).abs().max()) if part.shape == want.shape and part.numel() else
                      (0.0 if part.shape == want.shape else float("inf")))
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, errors)
    finish_worker(sys.argv[1], everyone)


if __name__ == "__main__":
    run_worker(main)
