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
    """``fn`` compiled on first use with CUDA tensors; the plain function otherwise."""
    compiled: list[Callable] = []

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if not (gpu_paths.fast_kernels and args[0].is_cuda) or torch.compiler.is_compiling():
            return fn(*args, **kwargs)
        if not compiled:
            compiled.append(torch.compile(fn))
        return compiled[0](*args, **kwargs)
    return call  # type: ignore[return-value]
