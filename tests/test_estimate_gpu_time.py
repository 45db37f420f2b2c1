"""``scripts/estimate_gpu_time.py``'s cost model (which ``compile_traffic.py`` and the README's roofline figures
rest on) against byte and FLOP counts worked out by hand for small op chains on the ``meta`` device."""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
import estimate_gpu_time as estimate  # noqa: E402

M, K, N = 64, 32, 48
BF16 = 2


def run(fn, *tensors) -> estimate.CostModel:
    costs = estimate.CostModel(estimate.Roofline(1e12, 1e11, 1e12, 0.0), estimate._Forward())
    with costs:
        fn(*tensors)
    return costs


def totals(costs: estimate.CostModel) -> tuple[float, int, float, float]:
    """(eager bytes, kernels, FLOPs, fusion-bound bytes)."""
    eager = costs.total()
    return eager.bytes, eager.kernels, eager.flops, sum(costs.fusion_bound()[1].values())


def test_a_gemm_and_its_element_wise_epilogue():
    """``(a @ b.T).relu() * 2``: eager, three kernels each reading and writing its tensors; fused, the GEMM
    reads its operands and writes its result, one kernel reads that and writes the output, and the relu's
    result never reaches memory. The transpose is a view: no kernel, no bytes."""
    a = torch.empty(M, K, dtype=torch.bfloat16, device="meta")
    b = torch.empty(N, K, dtype=torch.bfloat16, device="meta")
    eager_bytes, kernels, flops, bound = totals(run(lambda a, b: (a @ b.t()).relu() * 2, a, b))
    operands, result = (M * K + N * K) * BF16, M * N * BF16
    assert kernels == 3
    assert flops == 2 * M * N * K
    assert eager_bytes == operands + result + 2 * (2 * result)  # mm; relu and mul each read and write
    assert bound == operands + 2 * result + result  # the GEMM's result written and read once; the output


def test_an_expanded_operand_is_read_once():
    """``x + bias`` with ``bias [N]`` broadcast over ``[M, N]``: the bias's N elements are read, not M x N."""
    x = torch.empty(M, N, dtype=torch.float32, device="meta")
    bias = torch.empty(N, dtype=torch.float32, device="meta")
    eager_bytes, kernels, flops, bound = totals(run(lambda x, bias: x + bias.expand(M, N), x, bias))
    assert (kernels, flops) == (1, 0)
    assert eager_bytes == bound == (M * N + N + M * N) * 4


def test_a_tensor_backward_needs_is_kept_or_recomputed_whichever_moves_less():
    """``(exp(x) * g).sum()`` and its backward. Fused, each phase is one kernel: the forward reads ``x`` and
    ``g``; the backward reads ``g`` again and writes ``x``'s gradient, and needs ``exp(x)``: keeping it costs a
    write and a read, recomputing it one read of ``x``, so the bound charges one. The scalar the backward
    starts from (``ones_like`` of the sum) crosses too: recomputed, 4 bytes."""
    x = torch.empty(M, N, dtype=torch.float32, device="meta", requires_grad=True)
    g = torch.empty(M, N, dtype=torch.float32, device="meta")

    def step(x, g):
        (x.exp() * g).sum().backward()

    costs = run(step, x, g)
    assert {phase for (_, phase, _, _) in costs.sites} == {"forward", "backward"}
    size = M * N * 4
    inputs = size + 2 * size  # x once, g by each phase
    assert totals(costs)[3] == inputs + size + 4 + size  # exp(x) recomputed, the scalar, x's gradient
