"""Which path a tensor takes: the GPU fast paths (bf16-part fp32 GEMMs, grouped expert GEMMs, compiled
mHC, Triton kernels for attention and Sinkhorn) run for CUDA tensors, and for ``meta`` tensors while the
memory planner plans a GPU run, so that it counts the tensors those paths keep."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

_meta_plans_gpu = False
# the planner's stand-in for a call CUDA compiles (``fused.compiled_on_cuda``) that needs no gradient
meta_fused_call: Callable[..., Any] | None = None
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
def meta_as_gpu(fused_call: Callable[..., Any] | None = None) -> Iterator[None]:
    """Within: meta tensors take the GPU paths (the planner's shape-only run of a GPU configuration), and
    ``fused_call(fn, *args, **kwargs)`` runs each gradient-free call CUDA would compile into fused kernels
    (whose temporaries never reach memory), for the planner to count only what it returns."""
    global _meta_plans_gpu, meta_fused_call
    previous = _meta_plans_gpu, meta_fused_call
    _meta_plans_gpu, meta_fused_call = True, fused_call
    try:
        yield
    finally:
        _meta_plans_gpu, meta_fused_call = previous
