"""What one bf16 GEMM gives, the reference for gradients the GPU path computes in bf16."""

import torch


def half_bf16_spacing(t: torch.Tensor) -> torch.Tensor:
    """Half the bf16 spacing at ``|t|``: the rounding of a value to bf16 (8 significant bits)."""
    return 2.0 ** (torch.frexp(t.double()).exponent - 9).double()


def assert_bf16_gemm(got: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``got`` is ``a @ b`` as a bf16 GEMM computes it: both operands rounded to bf16 (torch's rounding), the
    products summed in fp32, the sum rounded to ``got``'s bf16: within half a bf16 spacing, plus 2^-12 of
    the result's scale for the fp32 sum's order and a rounding tie broken the other way. Truncated operands
    or a bf16 sum fail it."""
    want = a.to(torch.bfloat16).double() @ b.to(torch.bfloat16).double()
    assert got.dtype == torch.bfloat16
    error = (got.double() - want).abs()
    assert (error <= half_bf16_spacing(want) + 2**-12 * want.abs().max()).all(), error.max()
