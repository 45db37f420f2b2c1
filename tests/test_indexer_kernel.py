"""The indexer's scoring kernel (Triton, run on CPU by Triton's interpreter) against the lightning indexer's
formula written out here in fp64, and one graph under compile. Which runs take it: test_attention_kernel.py;
inside the model against the torch path: there and test_compile.py."""

import pytest
import torch

pytest.importorskip("triton")
from titan_dsv4.models.deepseek_v4 import indexer_kernel  # noqa: E402


def _index_scores_reference(q, keys, weights, scale):
    """dsv4-spec.md §3 (transformers' ``DeepseekV4IndexerScorer``): ``Σ_h w_h · relu(q_h · k) · scale``."""
    scores = torch.einsum("bqhd,bpd->bqhp", q, keys)
    return (scores.relu() * scale * weights.unsqueeze(-1)).sum(dim=2)


@pytest.mark.parametrize("dtype,heads", [(torch.float32, 4), (torch.bfloat16, 4), (torch.bfloat16, 20)])
def test_kernel_equals_the_formula_written_out(dtype, heads):
    """Values and every gradient against fp64 of the same operands. 19 queries and 70 entries leave partial
    blocks (16 queries, 64 entries per program); 4 and 20 heads are padded to 16 and 32. fp32: to fp32
    rounding; bf16: the scores' gradient enters the q/keys GEMMs as bf16, as in the torch path."""
    gen = torch.Generator().manual_seed(0)
    batch, queries, entries, dim = 2, 19, 70, 32
    q = torch.randn(batch, queries, heads, dim, generator=gen).to(dtype)
    keys = torch.randn(batch, entries, dim, generator=gen).to(dtype)
    weights = torch.randn(batch, queries, heads, generator=gen)
    grad = torch.randn(batch, queries, entries, generator=gen)
    leaves = [t.clone().requires_grad_() for t in (q, keys, weights)]
    out = indexer_kernel.index_scores(*leaves, dim**-0.5)
    got = [out, *torch.autograd.grad(out, leaves, grad)]
    exact = [t.double().requires_grad_() for t in (q, keys, weights)]
    ref = _index_scores_reference(*exact, dim**-0.5)
    want = [ref, *torch.autograd.grad(ref, exact, grad.double())]
    assert out.dtype == torch.float32 and [g.dtype for g in got[1:]] == [dtype, dtype, torch.float32]
    bf16_tol = dict(rtol=2e-2, atol=2e-2 * want[1].abs().max().item())
    for name, a, b in zip(("scores", "q", "keys", "weights"), got, want):
        tol = bf16_tol if dtype == torch.bfloat16 and name in ("q", "keys") else dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.double(), b.detach(), **tol, msg=name)


def test_compiles_without_graph_break():
    """An opaque custom op to ``torch.compile``: one graph, same values and gradients."""
    gen = torch.Generator().manual_seed(0)
    q, keys = torch.randn(1, 5, 4, 16, generator=gen), torch.randn(1, 7, 16, generator=gen)
    weights = torch.randn(1, 5, 4, generator=gen)

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in (q, keys, weights)]
        out = fn(*leaves, 0.25)
        return [out, *torch.autograd.grad(out.square().sum(), leaves)]

    torch._dynamo.reset()
    compiled = torch.compile(indexer_kernel.index_scores, backend="aot_eager", fullgraph=True)
    for a, b in zip(run(compiled), run(indexer_kernel.index_scores)):
        torch.testing.assert_close(a, b)
