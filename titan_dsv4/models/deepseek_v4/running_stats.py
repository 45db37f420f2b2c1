"""Statistics the model accumulates in buffers during training (expert loads for balancing, the indexer KL
for logging) and the trainer reads and resets after each step.

Activation checkpointing re-runs a block's forward inside backward; that forward's statistics were counted
already. The checkpoint's ``context_fn`` (``checkpoint_contexts``) marks the re-run, and ``recomputing()``
reads the mark: a plain Python flag, which ``torch.compile`` traces as a guard instead of a graph break.
Every checkpoint context is therefore made here, the op-level selective policy's included.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

import torch
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


aten = torch.ops.aten
# 2-D GEMMs: every projection, the router, the mHC mixes and the experts (grouped on GPUs, a loop elsewhere)
PROJECTION_GEMMS = {aten.mm.default, aten.mm.dtype, aten.addmm.default, aten._grouped_mm.default}


def _always_recompute(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.PREFER_RECOMPUTE


def _save_projections(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Op-level selective checkpointing: keep what the block's projection GEMMs produced, recompute the
    rest. The attention core's batched products are recomputed too: their fp32 scores are a block's
    largest tensors (``[tokens, heads, window + entries]``), and keeping them would undo most of the saving
    for the cheapest recompute (a block's element-wise work and a sixth or so of its GEMM FLOPs)."""
    return CheckpointPolicy.MUST_SAVE if op in PROJECTION_GEMMS else CheckpointPolicy.PREFER_RECOMPUTE


def _eager_contexts() -> tuple[ContextManager, ContextManager]:
    return contextlib.nullcontext(), _MarkedRecompute(contextlib.nullcontext())


def _selective_contexts(policy) -> Callable[[], tuple[ContextManager, ContextManager]]:
    def contexts() -> tuple[ContextManager, ContextManager]:
        forward, recompute = create_selective_checkpoint_contexts(policy)
        return forward, _MarkedRecompute(recompute)
    return contexts


def checkpoint_contexts(compiled: bool, save_projections: bool = False
                        ) -> Callable[[], tuple[ContextManager, ContextManager]]:
    """``context_fn`` for ``torch.utils.checkpoint`` that marks the recompute.

    ``save_projections``: op-level selective checkpointing (``_save_projections``). Otherwise everything is
    recomputed; compiled, through the contexts ``torch.compile`` itself uses for plain checkpointing
    (selective checkpointing that recomputes everything), because a compiled checkpoint replaces the
    default ones by any ``context_fn`` it is given. A fully compiled block recomputes inside the backward
    graph without running Python, so the mark only matters where a graph break sends the checkpoint back to
    eager.
    """
    if save_projections:
        return _selective_contexts(_save_projections)
    return _selective_contexts(_always_recompute) if compiled else _eager_contexts
