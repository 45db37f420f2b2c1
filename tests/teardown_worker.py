"""torchrun worker: ``init_distributed`` / ``shutdown_distributed`` free the gloo process group, even after
functional collectives (which import dynamo on first use) and DTensor ops (whose caches keep device meshes)
have run.

    torchrun --nproc_per_node 2 tests/teardown_worker.py OUT.json

Rank 0 writes the names of the gloo threads still running once the group is shut down and released.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path

import torch
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from launch import gloo_threads
from titan_dsv4.distributed.utils import init_distributed, shutdown_distributed


def exchange() -> None:
    init_distributed(torch.device("cpu"))
    rows = torch.ones(4, 3, requires_grad=True)
    all_to_all_single_autograd(rows, [2, 2], [2, 2], torch.distributed.group.WORLD).sum().backward()
    weight = torch.nn.Parameter(distribute_tensor(torch.ones(4, 4), init_device_mesh("cpu", (2,)), [Shard(0)]))
    (weight * 2).sum().backward()
    weight.full_tensor()
    shutdown_distributed()


if __name__ == "__main__":
    exchange()
    gc.collect()
    if os.environ["RANK"] == "0":
        Path(sys.argv[1]).write_text(json.dumps(gloo_threads()))
