"""Which path a tensor takes: the GPU fast paths (bf16-part fp32 GEMMs, grouped expert GEMMs, compiled
mHC, Triton kernels for attention and Sinkhorn) run for CUDA tensors, and for ``meta`` tensors while the
memory planner plans a GPU run, so that it counts the tensors those paths keep."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

_meta_plans_gpu = False
# False: CUDA runs the plain code (eager mHC, per-expert loop, fp32 GEMMs), the benchmark's baseline
fast_kernels = True


def takes_gpu_path(x: torch.Tensor) -> bool:
    return x.is_cuda or (x.is_meta and _meta_plans_gpu)


def takes_triton_kernels(x: torch.Tensor) -> bool:
    """The GPU path's Triton kernels (fused attention, Sinkhorn): CUDA, or meta while the planner plans a GPU
    run. The tests' CPU stand-ins of the GPU paths patch ``takes_gpu_path`` where other modules import it,
    not here: they run the torch code."""
    return takes_gpu_path(x) and fast_kernels


@contextmanager
def meta_as_gpu() -> Iterator[None]:
    """Within: meta tensors take the GPU paths (the planner's shape-only run of a GPU configuration)."""
    global _meta_plans_gpu
    previous, _meta_plans_gpu = _meta_plans_gpu, True
    try:
        yield
    finally:
        _meta_plans_gpu = previous
