"""Pipeline benchmark: bytes crossing a stage boundary, step time PP=2 vs PP=1, bubble per schedule.

    python scripts/bench_pipeline.py            # launches itself on 2 CPU processes (torchrun, gloo)

1. Bytes per microbatch across a boundary for the released shapes (analytic): ours ships only the mHC
   stream [mb, S, hc_mult, H]; shipping the D MTP embeddings with it (Automodel's way) adds D x [mb, S, H].
   Then measured on the debug model: the bytes stage 0 actually sends per microbatch.
2. Step time of one training step (debug model, same global batch) with PP=1 (one process) and PP=2.
3. Bubble fraction per schedule: 1 - (time inside stage compute) / (step time), averaged over ranks, next to
   the textbook value for p ranks, m microbatches, v stages per rank.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as dist

SEQ, BATCH, STEPS = 256, 8, 4
SCHEDULES = ["GPipe", "1F1B", "Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV"]


def analytic_bytes() -> None:
    from titan_dsv4.models.deepseek_v4 import FLAVORS

    print("bytes per microbatch across one stage boundary (mb=1, seq 4096, bf16)")
    for name in ("flash", "pro"):
        a = FLAVORS[name]
        stream = 4096 * a.hc_mult * a.hidden_size * 2
        for depth in (1, 2):
            shipped = stream + depth * 4096 * a.hidden_size * 2
            print(f"  {name:5s} D={depth}: ours {stream / 2**20:7.1f} MiB   with D embeddings "
                  f"{shipped / 2**20:7.1f} MiB   ({shipped / stream:.2f}x ours)")


def textbook_bubble(schedule: str, p: int, m: int) -> float:
    v = 1 if schedule in ("GPipe", "1F1B") else 2
    if schedule in ("InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV"):
        return 0.0  # zero-bubble schedules fill the bubble with deferred weight gradients (ideal)
    return (p - 1) / (v * m + p - 1)


def worker() -> None:
    from titan_dsv4.components.loss import MTPLoss, build_targets
    from titan_dsv4.config.job_config import JobConfig
    from titan_dsv4.distributed.parallel_dims import ParallelDims
    from titan_dsv4.distributed.pipeline import build_pipeline, plan_pipeline
    from titan_dsv4.distributed.utils import init_distributed
    from titan_dsv4.models.deepseek_v4 import FLAVORS, DeepseekV4Model

    init_distributed(torch.device("cpu"))
    rank, world = dist.get_rank(), dist.get_world_size()
    dims = ParallelDims(dp_replicate=1, dp_shard=1, pp=world, ep=1, world_size=world)
    dims.build_mesh("cpu")
    args = FLAVORS["debugmodel"]
    ids = torch.randint(0, args.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(SEQ).expand(BATCH, SEQ)
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = -100
    targets = build_targets(labels, positions, args.num_nextn_predict_layers)
    n_valid = (labels != -100).sum().float()

    # PP=1 baseline: the whole model in one process (rank 0 alone, the other waits)
    baseline = None
    if rank == 0:
        torch.set_num_threads(world)
        model = DeepseekV4Model(args)
        model.init_weights(0)
        model.train()
        model.set_mtp_loss_scale(0.3)
        loss_fn = MTPLoss()
        times = []
        for _ in range(STEPS + 1):
            start = time.perf_counter()
            loss_fn(model(ids, positions, targets=targets), targets, n_valid).backward()
            times.append(time.perf_counter() - start)
        baseline = statistics.median(times[1:])
        torch.set_num_threads(1)
    dist.barrier()

    rows = []
    for schedule in SCHEDULES:
        config = JobConfig()
        config.parallelism.pipeline_parallel_degree = world
        config.parallelism.pipeline_parallel_schedule = schedule
        config.parallelism.pipeline_parallel_microbatch_size = 1
        with torch.device("meta"):
            meta = DeepseekV4Model(args)
        plan = plan_pipeline(meta, config, world, BATCH)
        loss_fn = MTPLoss()

        def materialize(part):
            part.to_empty(device="cpu")
            part.init_weights(0)
            part.set_mtp_loss_scale(0.3)
            return part.train()

        pp_mesh = dims.mesh["pp"]
        parts = build_pipeline(meta, plan, pp_mesh.get_local_rank(), pp_mesh.get_group(), dims.mesh.mesh,
                               torch.device("cpu"), loss_fn, materialize, SEQ, torch.float32)
        busy = [0.0]
        sent = []
        for stage in parts.stages:
            for name in ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk"):
                original = getattr(stage, name)

                def timed(*a, _original=original, **k):
                    start = time.perf_counter()
                    try:
                        return _original(*a, **k)
                    finally:
                        busy[0] += time.perf_counter() - start

                setattr(stage, name, timed)
            if not stage.is_last:
                stage.submod.register_forward_hook(
                    lambda m, i, out: sent.append(sum(t.numel() * t.element_size() for t in
                                                      (out if isinstance(out, tuple) else (out,)))))
        step_times, bubbles = [], []
        for step in range(STEPS + 1):
            busy[0] = 0.0
            dist.barrier()
            start = time.perf_counter()
            parts.step(ids, positions, targets, n_valid)
            parts.ties.reduce_grads()
            elapsed = time.perf_counter() - start
            if step:
                step_times.append(elapsed)
                bubbles.append(1 - busy[0] / elapsed)
            for part in parts.model_parts:
                part.zero_grad(set_to_none=True)
        stats = torch.tensor([statistics.median(step_times), statistics.mean(bubbles),
                              float(statistics.mean(sent)) if sent else 0.0])
        gathered = [torch.zeros(3) for _ in range(world)]
        dist.all_gather(gathered, stats)
        if rank == 0:
            step = max(g[0].item() for g in gathered)
            bubble = statistics.mean(g[1].item() for g in gathered)
            sent_bytes = max(g[2].item() for g in gathered)
            rows.append((schedule, plan.num_stages, plan.n_microbatches, step, bubble,
                         textbook_bubble(schedule, world, plan.n_microbatches), sent_bytes))
    if rank == 0:
        expected = 1 * SEQ * args.hc_mult * args.hidden_size * 4
        print(f"\nmeasured on debugmodel (fp32, mb=1, seq {SEQ}): bytes sent per microbatch by a stage = "
              f"{rows[0][6]:,.0f} (mHC stream [1,{SEQ},{args.hc_mult},{args.hidden_size}] fp32 = {expected:,})")
        print(f"\nstep time, global batch {BATCH}x{SEQ}, PP=1 (1 process, {world} threads): {baseline * 1e3:.0f} ms")
        print(f"{'schedule':22s} {'stages':>6s} {'mb':>3s} {'step ms':>8s} {'vs PP=1':>8s} "
              f"{'bubble':>7s} {'textbook':>8s}")
        for schedule, stages, m, step, bubble, book, _ in rows:
            print(f"{schedule:22s} {stages:6d} {m:3d} {step * 1e3:8.0f} {step / baseline:7.2f}x "
                  f"{bubble:7.2f} {book:8.2f}")
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    if "RANK" in os.environ:
        worker()
        return
    analytic_bytes()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    __file__], check=True, env=env)


if __name__ == "__main__":
    main()
