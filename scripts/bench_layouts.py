"""Per-rank memory and throughput of the debug model (MTP on) across parallel layouts, on CPU.

    python scripts/bench_layouts.py          # launches itself under torchrun once per layout (gloo)

For each layout: the model state each rank holds (parameters + gradients + AdamW moments, counted from the
local shards, so it is exact) next to the fraction the layout should leave (the largest stage's share of
the parameters, divided by the ranks sharding it: FSDP, with EP taking its ranks from FSDP), the measured peak RSS growth of the rank over its start-up
size (model state + activations + communication buffers), and global tokens/s after one warm-up step.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parent.parent
STEPS, SEQ, GLOBAL_BATCH = 4, 256, 8
LAYOUTS = {  # name: (processes, overrides, ranks sharing one stage's weights)
    "none": (1, {}, 1),
    "FSDP=2": (2, {"data_parallel_shard_degree": 2}, 2),
    "EP=2 (x FSDP=2)": (2, {"data_parallel_shard_degree": 2, "expert_parallel_degree": 2}, 2),
    "FSDP=2 x PP=2": (4, {"data_parallel_shard_degree": 2, "pipeline_parallel_degree": 2}, 2),
    "EP=2 x FSDP=2 x PP=2": (4, {"data_parallel_shard_degree": 2, "expert_parallel_degree": 2,
                                 "pipeline_parallel_degree": 2}, 2),
}


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def worker(overrides: dict, out: str) -> None:
    from titan_dsv4.config.job_config import JobConfig
    from titan_dsv4.config.validate import validate
    from titan_dsv4.train import Trainer

    world = int(os.environ.get("WORLD_SIZE", "1"))
    config = JobConfig()
    config.training.seq_len, config.training.steps = SEQ, STEPS
    config.parallelism.pipeline_parallel_microbatch_size = 1
    for key, value in overrides.items():
        setattr(config.parallelism, key, value)
    dp = world // config.parallelism.pipeline_parallel_degree
    config.training.local_batch_size = GLOBAL_BATCH // dp
    config.job.dump_folder = tempfile.mkdtemp()
    start_rss = rss_mb()
    trainer = Trainer(config, validate(config, world))
    times = []
    for _ in range(STEPS):
        t0 = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - t0)
    params = [p for part in trainer.model_parts for p in part.parameters()]
    state = local_bytes(params) + local_bytes(p for p in params if p.requires_grad)  # weights + gradients
    state += local_bytes(v for s in trainer.optimizer.state.values() for v in s.values() if v.dim() > 0)
    full = sum(p.numel() for p in params)  # a DTensor's numel is its global size: this stage's share
    record = {"state_mb": state / 2**20, "stage_share": full / trainer.model_args.num_params(), "rss_growth_mb": rss_mb() - start_rss,
              "tokens_per_sec": GLOBAL_BATCH * SEQ / (sum(times[1:]) / (STEPS - 1))}
    records = [record]
    if dist.is_initialized():
        records = [None] * dist.get_world_size()
        dist.all_gather_object(records, record)
    if not dist.is_initialized() or dist.get_rank() == 0:
        Path(out).write_text(json.dumps(records))
    trainer.close()


def main() -> None:
    from titan_dsv4.models.deepseek_v4 import FLAVORS

    args = FLAVORS["debugmodel"]
    print(f"debug model: {args.num_params() / 1e6:.2f}M parameters (MTP included), global batch {GLOBAL_BATCH} x "
          f"{SEQ} tokens, fp32, {STEPS} steps, CPU (gloo)\n")
    print(f"{'layout':24s} {'ranks':>5s} {'state MiB/rank':>15s} {'vs none':>8s} {'expected':>8s} "
          f"{'RSS growth MiB/rank':>20s} {'tokens/s':>9s}")
    base = None
    for name, (nproc, overrides, sharing) in LAYOUTS.items():
        with tempfile.TemporaryDirectory() as tmp:
            out = str(Path(tmp) / "out.json")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                   __file__, "--worker", json.dumps(overrides), out]
            env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // nproc))}
            subprocess.run(cmd, check=True, cwd=REPO, env=env, capture_output=True, text=True)
            records = json.loads(Path(out).read_text())
        state = max(r["state_mb"] for r in records)
        base = base or state
        expected = max(r["stage_share"] for r in records) / sharing
        rss = sum(r["rss_growth_mb"] for r in records) / len(records)
        print(f"{name:24s} {nproc:5d} {state:15.2f} {state / base:8.2f} {expected:8.2f} {rss:20.0f} "
              f"{records[0]['tokens_per_sec']:9.0f}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(json.loads(sys.argv[2]), sys.argv[3])
    else:
        torch.set_num_threads(os.cpu_count() or 2)
        main()
