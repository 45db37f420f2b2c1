"""Statistics the model accumulates in buffers during training (expert loads for balancing, the indexer KL
for logging) and the trainer reads and resets after each step.

Activation checkpointing re-runs a block's forward inside backward; that forward's statistics were counted
already. The checkpoint's ``context_fn`` (``checkpoint_contexts``) marks the re-run, and ``recomputing()``
reads the mark: a plain Python flag, which ``torch.compile`` traces as a guard instead of a graph break.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

_recomputing = False


def recomputing() -> bool:
    """True while activation checkpointing re-runs a forward inside backward."""
    return _recomputing


class _MarkedRecompute(TorchDispatchMode):
    """The checkpoint's recompute context: ``inner`` with ``recomputing()`` true while it is active. A
    ``TorchDispatchMode`` only because compiled checkpointing requires one; it never intercepts ops itself."""

    def __init__(self, inner: ContextManager):
        super().__init__()
        self.inner = inner

    def __enter__(self):
        global _recomputing
        self.previous, _recomputing = _recomputing, True
        return self.inner.__enter__()

    def __exit__(self, *exc):
        global _recomputing
        try:
            return self.inner.__exit__(*exc)
        finally:
            _recomputing = self.previous


def _always_recompute(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.PREFER_RECOMPUTE


def _eager_contexts() -> tuple[ContextManager, ContextManager]:
    return contextlib.nullcontext(), _MarkedRecompute(contextlib.nullcontext())


def _compiled_contexts() -> tuple[ContextManager, ContextManager]:
    forward, recompute = create_selective_checkpoint_contexts(_always_recompute)
    return forward, _MarkedRecompute(recompute)


def checkpoint_contexts(compiled: bool) -> Callable[[], tuple[ContextManager, ContextManager]]:
    """``context_fn`` for ``torch.utils.checkpoint`` that marks the recompute.

    Compiled: the contexts ``torch.compile`` itself uses for plain checkpointing (selective checkpointing
    that recomputes everything), because a compiled checkpoint replaces the default ones by any
    ``context_fn`` it is given. A fully compiled block recomputes inside the backward graph without running
    Python, so the mark only matters where a graph break sends the checkpoint back to eager.
    """
    return _compiled_contexts if compiled else _eager_contexts
