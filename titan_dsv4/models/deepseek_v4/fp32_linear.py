"""fp32 ``x @ W.T`` (LM head, router, compressor projections) from bf16 tensor-core GEMMs on GPUs.

The released model runs these products in fp32. On an H100/H200 a plain fp32 GEMM is a SIMT kernel at
~50 TFLOP/s, a bf16 one runs at ~700 (the fp32 LM head alone was 60% of a benchmark step). An fp32 tensor is
the sum of three bf16 tensors (each the bf16 rounding of what the previous left: 24 mantissa bits), and a
bf16 product accumulated in fp32 is exact, so ``x @ W.T`` is the sum of the bf16 GEMMs of the parts'
pairs (the pairs whose combined weight is below fp32 rounding are dropped). A bf16 operand (activations,
weights under bf16 mixed precision) is a single part: bf16 x bf16 is then one GEMM with an fp32 output,
exactly what fp32 math gives. The backward products are split the same way. CPUs run plain fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import gpu_paths
from .gpu_paths import takes_gpu_path
from .norm import fp32

PARTS = 3  # bf16 parts of an fp32 tensor: 3 x 8 mantissa bits = fp32's 24


def bf16_parts(t: torch.Tensor) -> list[torch.Tensor]:
    """``t`` as bf16 tensors whose fp32 sum is ``t`` (one part if ``t`` already is bf16)."""
    if t.dtype == torch.bfloat16:
        return [t]
    parts, rest = [], fp32(t)
    for _ in range(PARTS):
        part = rest.to(torch.bfloat16)
        parts.append(part)
        rest = rest - part.float()
    return parts


def bf16_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """bf16 x bf16 GEMM with fp32 accumulation and output (cuBLAS; CUDA only)."""
    return torch.mm(a, b, out_dtype=torch.float32)


def split_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """fp32 ``a @ b`` (2-D) as a sum of ``bf16_mm`` products of the operands' bf16 parts."""
    a_parts, b_parts = bf16_parts(a), bf16_parts(b)
    out = None
    for i, a_part in enumerate(a_parts):
        for j, b_part in enumerate(b_parts):
            if i + j < PARTS:  # part i is ~2^(-8 i) of its tensor: later pairs are below fp32 rounding
                term = bf16_mm(a_part, b_part)
                out = term if out is None else out + term
    return out


class _SplitLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return split_mm(x.reshape(-1, x.shape[-1]), weight.t()).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        flat = grad.reshape(-1, grad.shape[-1])
        grad_x = split_mm(flat, weight).view(x.shape).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_w = (split_mm(flat.t(), x.reshape(-1, x.shape[-1])).to(weight.dtype)
                  if ctx.needs_input_grad[1] else None)
        return grad_x, grad_w


def fp32_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)`` in fp32 (fp32 output); bf16 tensor-core GEMMs on CUDA."""
    float_types = (torch.bfloat16, torch.float32)
    if gpu_paths.fast_kernels and takes_gpu_path(x) and x.dtype in float_types and weight.dtype in float_types:
        return _SplitLinear.apply(x, weight)
    return F.linear(fp32(x), fp32(weight))
