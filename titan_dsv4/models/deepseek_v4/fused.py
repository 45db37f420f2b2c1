"""Fusion of small fp32 element-wise chains (mHC's mixes, weights and stream mixing; RoPE) on GPUs.

On CUDA such a chain is hundreds of tiny kernels per block, each reading and writing the token stream;
``torch.compile`` turns it into a few fused kernels with the same fp32 math. Elsewhere (the CPU oracle) and
inside an outer compile (``[compile]`` on the whole block) the function runs as written.
"""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

import torch

from . import gpu_paths

F = TypeVar("F", bound=Callable)


def compiled_on_cuda(fn: F) -> F:
    """``fn`` compiled on first use with CUDA tensors; the plain function otherwise. The planner's GPU plan
    (``gpu_paths.meta_as_gpu``) runs a gradient-free call through its counter: fused, only outputs are memory."""
    compiled: list[Callable] = []

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if gpu_paths.meta_fused_call is not None and gpu_paths.fast_kernels and gpu_paths.takes_gpu_path(args[0]) \
                and not (torch.is_grad_enabled() and any(getattr(a, "requires_grad", False) for a in args)):
            return gpu_paths.meta_fused_call(fn, *args, **kwargs)  # the planner counting a GPU run
        if not (gpu_paths.fast_kernels and args[0].is_cuda) or torch.compiler.is_compiling():
            return fn(*args, **kwargs)
        if not compiled:
            compiled.append(torch.compile(fn))
        return compiled[0](*args, **kwargs)
    return call  # type: ignore[return-value]
