"""fp32 ``x @ W.T`` (LM head, router, compressor projections) from bf16 tensor-core GEMMs on GPUs.

The released model runs these products in fp32. On an H100/H200 a plain fp32 GEMM is a SIMT kernel at
~50 TFLOP/s, a bf16 one runs at ~700 (the fp32 LM head alone was 60% of a benchmark step). An fp32 tensor is
the sum of three bf16 tensors (each the bf16 rounding of what the previous left: 24 mantissa bits), and a
bf16 product accumulated in fp32 is exact, so ``x @ W.T`` is the sum of the bf16 GEMMs of the parts'
pairs (the pairs whose combined weight is below fp32 rounding are dropped). A bf16 operand (activations,
weights under bf16 mixed precision) is a single part: bf16 x bf16 is then one GEMM with an fp32 output,
exactly what fp32 math gives. The backward products are split the same way, each to the precision of its
result: an fp32 gradient (of an fp32 weight) from three parts, a bf16 one from one — the bf16 GEMM of the
operands rounded to bf16, as in every other backward GEMM of bf16 mixed-precision training. CPUs run plain
fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import gpu_paths
from .gpu_paths import takes_gpu_path
from .norm import fp32

PARTS = 3  # bf16 parts of an fp32 tensor: 3 x 8 mantissa bits = fp32's 24
BACKWARD_CHUNK_ELEMENTS = 2**28  # output-gradient elements split into bf16 parts at a time (1.5 GiB of parts)


def result_parts(dtype: torch.dtype) -> int:
    """bf16 parts a product needs to be accurate to a ``dtype`` result: fp32 needs all three; a bf16 result
    (the gradients of bf16 activations and of bf16 mixed-precision weights) one, the operands rounded to
    bf16: their rounding (2^-9 of each term) is of the order of the result's own, as for any bf16 GEMM. (Two
    parts cost the LM head's backward 4 GEMMs instead of 2 for error far below the result's rounding.)"""
    return PARTS if dtype == torch.float32 else 1


def bf16_parts(t: torch.Tensor, parts: int = PARTS) -> list[torch.Tensor]:
    """``t`` (fp32) as bf16 tensors whose fp32 sum is ``t`` to ``parts`` x 8 bits (one part if ``t``
    already is bf16). Each part is the rest rounded to nearest bf16 (so the first, the one part of a bf16
    GEMM, is ``t`` rounded to bf16), the rest minus it exact in fp32. Rounded by integer ops on the bits, not
    ``rest - rest.to(bf16).float()``: compiled, inductor drops that round trip (it does not emulate
    precision casts) and the later parts come out zero."""
    if t.dtype == torch.bfloat16:
        return [t]
    out, rest = [], fp32(t)
    for i in range(parts):
        if i + 1 == parts:
            out.append(rest.to(torch.bfloat16))
            break
        # + half of bf16's last place, low 16 bits cleared: round to nearest (ties away from zero)
        head = ((rest.view(torch.int32) + 0x8000) & -65536).view(torch.float32)
        out.append(head.to(torch.bfloat16))
        rest = rest - head
    return out


def bf16_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """bf16 x bf16 GEMM with fp32 accumulation and output (cuBLAS; CUDA only)."""
    return torch.mm(a, b, out_dtype=torch.float32)


def parts_mm(a_parts: list[torch.Tensor], b_parts: list[torch.Tensor], parts: int = PARTS,
             mm=None) -> torch.Tensor:
    """``a @ b`` (2-D, fp32 result) to ``parts`` x 8 bits from the operands' bf16 parts: the sum of the
    ``bf16_mm`` (or ``mm``) products of the pairs that weigh above the result's rounding (part i is
    at most 2^(-9 i) of its tensor), grouped into as few GEMMs as moves the fewest bytes (``_product_plan``)."""
    mm = mm or bf16_mm
    pairs = [(i, j) for i in range(len(a_parts)) for j in range(len(b_parts)) if i + j < parts]
    m, n = a_parts[0].shape[0], b_parts[0].shape[1]
    plan = _product_plan(m, a_parts[0].shape[1], n, pairs)
    if plan == "k":
        return mm(torch.cat([a_parts[i] for i, _ in pairs], 1), torch.cat([b_parts[j] for _, j in pairs], 0))
    groups: dict[object, list[tuple[int, int]]] = {}
    for i, j in pairs:
        groups.setdefault(j if plan == "b" else i if plan == "a" else (i, j), []).append((i, j))
    out = None
    for group in groups.values():
        (i, j), size = group[0], len(group)
        if plan == "b":  # b's part read once, against a's parts stacked along M
            term = mm(torch.cat([a_parts[i] for i, _ in group]), b_parts[j]).view(size, m, n).sum(0)
        elif plan == "a":  # a's part read once, against b's parts side by side along N
            term = mm(a_parts[i], torch.cat([b_parts[j] for _, j in group], 1)).view(m, size, n).sum(1)
        else:
            term = mm(a_parts[i], b_parts[j])
        # not in place: a GEMM's output may be kept by selective activation checkpointing, which forbids
        # mutating it (same bytes moved; one more fp32 result live for a moment)
        out = term if out is None else out + term
    return out


def _product_plan(m: int, k: int, n: int, pairs: list[tuple[int, int]]) -> str:
    """How to sum the pairs' ``[m, k] @ [k, n]`` products, by the bytes each way moves (bf16 2, fp32 4):
    ``"pairs"``, a GEMM per pair, each result written and summed; ``"k"``, one GEMM over the pairs
    concatenated along K, the result written once (copies of both operands: the choice when the result is
    large, e.g. the gradient of the streams w.r.t. mHC's 24 mixes); ``"b"`` / ``"a"``, one GEMM per part
    of b (a), the other's parts stacked, so a large single-part operand is read once (mHC's mixes of the
    bf16 streams against the fp32 weight's three parts)."""
    p = len(pairs)
    if p == 1:
        return "pairs"
    na, nb = len({i for i, _ in pairs}), len({j for _, j in pairs})
    cost = {
        "pairs": 2 * (m * k + k * n) * p + 4 * m * n * (3 * p - 2),
        "k": 4 * (m * k + k * n) * p + 4 * m * n,
        "b": 4 * m * k * p + 2 * k * n * nb + 8 * m * n * p + 12 * m * n * (nb - 1),
        "a": 4 * k * n * p + 2 * m * k * na + 8 * m * n * p + 12 * m * n * (na - 1),
    }
    best = "pairs"
    for plan, nbytes in cost.items():  # not min(cost, key=cost.get): dynamo breaks the graph on it
        if nbytes < cost[best]:
            best = plan
    return best


def split_mm(a: torch.Tensor, b: torch.Tensor, parts: int = PARTS) -> torch.Tensor:
    return parts_mm(bf16_parts(a, parts), bf16_parts(b, parts), parts)


class _SplitLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return split_mm(x.reshape(-1, x.shape[-1]), weight.t()).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        """Over chunks of rows: the output gradient's bf16 parts (up to 1.5x its fp32 size) exist for one
        chunk at a time, and serve both products."""
        x, weight = ctx.saved_tensors
        x_parts = result_parts(x.dtype) if ctx.needs_input_grad[0] else 0
        weight_parts = result_parts(weight.dtype) if ctx.needs_input_grad[1] else 0
        flat, rows_x = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
        weight_split = bf16_parts(weight, x_parts) if x_parts else []
        grad_x, grad_w = [], None
        chunk = max(1, BACKWARD_CHUNK_ELEMENTS // flat.shape[1])
        for r0 in range(0, flat.shape[0], chunk):
            grad_parts = bf16_parts(flat[r0:r0 + chunk], max(x_parts, weight_parts))
            if x_parts == 1:  # a bf16 result: one bf16 GEMM writing bf16 (fp32 accumulation, one rounding)
                grad_x.append(grad_parts[0] @ weight_split[0])
            elif x_parts:
                grad_x.append(parts_mm(grad_parts, weight_split, x_parts).to(x.dtype))
            if weight_parts:
                term = parts_mm([g.t() for g in grad_parts], bf16_parts(rows_x[r0:r0 + chunk], weight_parts),
                                weight_parts)
                grad_w = term if grad_w is None else grad_w.add_(term)
        return (torch.cat(grad_x).view(x.shape) if grad_x else None,
                grad_w.to(weight.dtype) if grad_w is not None else None)


def bf16_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batched bf16 x bf16 GEMM with fp32 accumulation and output (cuBLAS; CUDA only)."""
    return torch.bmm(a, b, out_dtype=torch.float32)


def _bf16_operands(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (gpu_paths.fast_kernels and takes_gpu_path(a) and a.dtype == torch.bfloat16
            and b.dtype == torch.bfloat16)


def matmul_fp32_result(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` (batched, no autograd) as fp32: bf16 operands on GPUs through one fp32-output GEMM, never
    rounded to bf16; fp32 math elsewhere."""
    if not _bf16_operands(a, b):
        return torch.matmul(fp32(a), fp32(b))
    out = bf16_bmm(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]))  # same batch dims, no broadcast
    return out.view(*a.shape[:-1], b.shape[-1])


class _Fp32Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, b)
        return matmul_fp32_result(a, b)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # bf16 GEMMs of the gradient rounded to bf16, as a fused attention kernel's backward does
        a, b = ctx.saved_tensors
        grad = grad.to(a.dtype)
        grad_a = grad @ b.transpose(-1, -2) if ctx.needs_input_grad[0] else None
        grad_b = a.transpose(-1, -2) @ grad if ctx.needs_input_grad[1] else None
        return grad_a, grad_b


def fp32_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` with an fp32 result (attention scores): on GPUs from bf16 operands without rounding the
    result to bf16 first (a bf16 matmul's output would be: ~2^-9 of each score, before the softmax)."""
    return _Fp32Matmul.apply(a, b) if _bf16_operands(a, b) else torch.matmul(fp32(a), fp32(b))


def splits_into_bf16_parts(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``x @ weight.T`` runs as bf16 GEMMs of bf16 parts: bf16/fp32 operands on the GPU path."""
    float_types = (torch.bfloat16, torch.float32)
    return (gpu_paths.fast_kernels and takes_gpu_path(x) and x.dtype in float_types
            and weight.dtype in float_types)


def fp32_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)`` in fp32 (fp32 output); bf16 tensor-core GEMMs on CUDA."""
    if splits_into_bf16_parts(x, weight):
        return _SplitLinear.apply(x, weight)
    return F.linear(fp32(x), fp32(weight))
