"""``[profiling]``: torch profiler traces and CUDA memory snapshots on a fixed rhythm of training steps.

Files are named by the training step (a resumed run keeps the rhythm: step 30 is traced whether the run
started at 0 or 20), one per rank, and appear whole or not at all (written aside, then renamed).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile, schedule

from ..config.job_config import Profiling

MEMORY_SNAPSHOT_MAX_ENTRIES = 100_000  # allocation events kept (a ring): enough for a few steps of a block


class StepProfiler:
    """Call :meth:`step` with each training step done and :meth:`close` at the end; :meth:`snapshot_oom`
    on a CUDA out-of-memory error before it propagates."""

    def __init__(self, config: Profiling, dump_folder: str, rank: int, first_step: int):
        self.config, self.rank, self.step_count = config, rank, first_step  # the last step done
        self.trace_folder = Path(dump_folder) / config.save_traces_folder
        self.snapshot_folder = Path(dump_folder) / config.save_memory_snapshot_folder
        self.profiler: profile | None = None
        if config.enable_profiling:
            cycle = schedule(wait=config.profile_freq - config.profiler_warmup - config.profiler_active,
                             warmup=config.profiler_warmup, active=config.profiler_active)
            # The profiler counts its own steps from 0; the training step it is at is first_step + that.
            # Each trace ends with a step that is a multiple of profile_freq.
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.profiler = profile(activities=activities, schedule=lambda i: cycle(first_step + i),
                                    on_trace_ready=self._write_trace, record_shapes=True)
            self.profiler.start()
        if config.enable_memory_snapshot:
            torch.cuda.memory._record_memory_history(max_entries=MEMORY_SNAPSHOT_MAX_ENTRIES)

    def step(self, step: int) -> None:
        self.step_count = step
        if self.profiler is not None:
            self.profiler.step()
        if self.config.enable_memory_snapshot and self.step_count % self.config.profile_freq == 0:
            self._write_snapshot(f"iteration_{self.step_count}")

    def snapshot_oom(self) -> None:
        """The allocator's history up to the failed allocation (in the step after ``step_count``)."""
        if self.config.enable_memory_snapshot:
            self._write_snapshot(f"iteration_{self.step_count + 1}_oom")

    def close(self) -> None:
        if self.profiler is not None:
            self.profiler.stop()
            self.profiler = None
        if self.config.enable_memory_snapshot:
            torch.cuda.memory._record_memory_history(enabled=None)

    def _write_trace(self, prof: profile) -> None:
        path = self.trace_folder / f"iteration_{self.step_count}" / f"rank{self.rank}_trace.json"
        _write_aside(path, prof.export_chrome_trace)
        if self.rank == 0:
            print(f"titan_dsv4: profiler trace of step {self.step_count} in {path.parent}", flush=True)

    def _write_snapshot(self, name: str) -> None:
        path = self.snapshot_folder / name / f"rank{self.rank}_memory_snapshot.pickle"
        _write_aside(path, torch.cuda.memory._dump_snapshot)
        if self.rank == 0:
            print(f"titan_dsv4: memory snapshot in {path.parent}", flush=True)


def _write_aside(path: Path, write: Callable[[str], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    write(str(partial))
    os.replace(partial, path)
