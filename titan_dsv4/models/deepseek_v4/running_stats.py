"""Statistics the model accumulates in buffers during training (expert loads for balancing, the indexer KL
for logging) and the trainer reads and resets after each step."""

from __future__ import annotations

import torch


def recomputing() -> bool:
    """True while activation checkpointing re-runs a forward inside backward: the statistics of that forward
    were counted already. (A forward outside any backward has no current autograd graph task.)"""
    return torch._C._current_graph_task_id() != -1
