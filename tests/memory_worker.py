"""The real Trainer's measured peak of live tensor bytes over its first two steps, per rank: from the
profiler's allocation events on CPU (the counterpart of ``torch.cuda.max_memory_allocated``, which is what
a GPU run reports).

    [torchrun --nproc_per_node N] tests/memory_worker.py OUT.json --section.key value ...
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

from launch import finish_worker, run_worker
from titan_dsv4.config import load_config
from titan_dsv4.config.validate import validate
from titan_dsv4.distributed.utils import launched_world_size
from titan_dsv4.train import Trainer


def main() -> None:
    out, argv = sys.argv[1], sys.argv[2:]
    config = load_config(argv)
    setup = validate(config, launched_world_size())
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        trainer = Trainer(config, setup)
        for _ in range(2):
            trainer.train_step()
    if trainer.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(trainer.device)
    else:
        peak = live = 0
        events = prof.profiler.kineto_results.events()  # one "[memory]" event per allocation (+) and free (-)
        for _, delta in sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"):
            live += delta
            peak = max(peak, live)
    dims = trainer.parallel_dims
    pp_rank = dims.mesh["pp"].get_local_rank() if trainer.distributed and dims.pp_enabled else 0
    results = [{"pp_rank": pp_rank, "peak": peak}]
    if trainer.distributed:
        results = [None] * dist.get_world_size()
        dist.all_gather_object(results, {"pp_rank": pp_rank, "peak": peak})
    trainer.dataloader.close()
    trainer.metrics.close()
    finish_worker(out, results)


if __name__ == "__main__":
    run_worker(main)
