"""The indexer's scoring kernel (Triton, run on CPU by Triton's interpreter) against the lightning indexer's
formula written out here in fp64, and inside the model: which runs take it, and one graph under compile."""

import pytest
import torch

from hf_reference import random_model
from titan_dsv4.models.deepseek_v4 import FLAVORS, DeepseekV4Model

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


def test_which_runs_use_the_kernel(monkeypatch):
    """Wherever the Triton kernels run: not on CPU ("auto"), on meta tensors while the planner plans a GPU
    run, also under torch's deterministic algorithms (it adds nothing atomically, unlike the attention
    core), not with ``[model] attention_kernel = "torch"``; once per CSA layer at this length."""
    from titan_dsv4.models.deepseek_v4.gpu_paths import meta_as_gpu
    from titan_dsv4.models.deepseek_v4.moe import RoutedExperts

    calls = []
    real = indexer_kernel._index_scores
    monkeypatch.setattr(indexer_kernel, "_index_scores", lambda *a: calls.append(1) or real(*a))
    model = random_model(FLAVORS["debugmodel"])
    csa_layers = sum(m.indexer is not None for m in model.attention_modules())
    ids = torch.randint(0, 2048, (1, 24))
    model(ids)
    assert not calls and csa_layers > 0
    model.set_attention_kernel("triton")
    model(ids)
    assert len(calls) == csa_layers
    monkeypatch.setattr(RoutedExperts, "use_grouped_mm", True)  # meta tensors cannot run the per-expert loop
    with torch.device("meta"):
        planned = DeepseekV4Model(FLAVORS["debugmodel"]).to(torch.bfloat16)
    for kernel, deterministic, expected in (("auto", False, csa_layers), ("auto", True, csa_layers),
                                            ("torch", False, 0)):
        calls.clear()
        planned.set_attention_kernel(kernel)
        torch.use_deterministic_algorithms(deterministic)
        try:
            with meta_as_gpu():
                planned(ids.to("meta"))
        finally:
            torch.use_deterministic_algorithms(False)
        assert len(calls) == expected, (kernel, deterministic)


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
