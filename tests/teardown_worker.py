"""torchrun worker: ``init_distributed`` / ``shutdown_distributed`` free the gloo process group, even after
functional collectives (which import dynamo on first use) have run.

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

from titan_dsv4.distributed.utils import init_distributed, shutdown_distributed


def exchange() -> None:
    init_distributed(torch.device("cpu"))
    rows = torch.ones(4, 3, requires_grad=True)
    all_to_all_single_autograd(rows, [2, 2], [2, 2], torch.distributed.group.WORLD).sum().backward()
    shutdown_distributed()


def gloo_threads() -> list[str]:
    tasks = Path("/proc/self/task")
    return sorted(name for name in ((tasks / t / "comm").read_text().strip() for t in os.listdir(tasks))
                  if "gloo" in name)


if __name__ == "__main__":
    exchange()
    gc.collect()
    if os.environ["RANK"] == "0":
        Path(sys.argv[1]).write_text(json.dumps(gloo_threads()))
