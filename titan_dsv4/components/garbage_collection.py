"""``training.gc_freq``: Python's cycle collector at the same steps on every rank.

Left automatic, it starts whenever allocations pass a threshold, at a different moment on each rank, and a
pipeline or FSDP collective then waits for the slowest rank's pause; at scale some rank is always pausing.
Training itself leaves no tensor to the collector (tests/test_operations.py checks a pipelined run), so the
deferred garbage is a few small Python objects per step.
"""

from __future__ import annotations

import gc


class GarbageCollection:
    """Automatic collection off from construction to :meth:`close`; a full collection every ``freq`` steps."""

    def __init__(self, freq: int):
        self.freq, self.was_enabled = freq, gc.isenabled()
        gc.disable()
        gc.collect()

    def step(self, step: int) -> None:
        if step % self.freq == 0:
            gc.collect()

    def close(self) -> None:
        if self.was_enabled:
            gc.enable()
