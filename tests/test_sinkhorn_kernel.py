"""The Sinkhorn kernel (Triton, run on CPU by Triton's interpreter) against Sinkhorn written out here in
fp64, and inside the model against the torch path."""

import dataclasses

import pytest
import torch

from hf_reference import random_model
from titan_dsv4.models.deepseek_v4 import FLAVORS, DeepseekV4Model, hyper_connection
from titan_dsv4.models.deepseek_v4.gpu_paths import meta_as_gpu

pytest.importorskip("triton")
from titan_dsv4.models.deepseek_v4 import sinkhorn_kernel  # noqa: E402


def _sinkhorn_reference(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """dsv4-spec.md §2.2: ``softmax(-1) + eps``, then column normalisation, then (iters - 1) x (row, column)."""
    comb = logits.softmax(-1) + eps
    comb = comb / (comb.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + eps)
        comb = comb / (comb.sum(-2, keepdim=True) + eps)
    return comb


@pytest.mark.parametrize("n", [4, 2])
def test_kernel_equals_sinkhorn_written_out(n):
    """Values and gradient in fp32 against fp64; 74 tokens: programs of 32, the last partial; logits
    spread widely enough that the normalisations do not converge in a step."""
    logits = torch.randn(2, 37, n, n) * 4
    grad = torch.randn(2, 37, n, n)
    leaf = logits.clone().requires_grad_()
    out = sinkhorn_kernel.sinkhorn(leaf, 20, 1e-6)
    (got_grad,) = torch.autograd.grad(out, leaf, grad)
    exact = logits.double().requires_grad_()
    ref = _sinkhorn_reference(exact, 20, 1e-6)
    (ref_grad,) = torch.autograd.grad(ref, exact, grad.double())
    assert out.dtype == got_grad.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_grad.double(), ref_grad, rtol=1e-4, atol=1e-5)
    # and the torch path agrees with the reference to the same precision (what the kernel replaces)
    torch.testing.assert_close(hyper_connection._Sinkhorn.apply(logits, 20, 1e-6).double(), ref.detach(),
                               rtol=1e-5, atol=1e-6)


def test_model_with_kernel_equals_torch_path(monkeypatch):
    """Every mHC site of every block (MTP block included): outputs and every gradient equal the torch path.
    Three Sinkhorn iterations: the interpreter's cost is quadratic in them."""
    model = random_model(dataclasses.replace(FLAVORS["debugmodel"], hc_sinkhorn_iters=3)).train()
    ids = torch.randint(0, 2048, (1, 40))
    results = []
    calls = []
    real = sinkhorn_kernel.sinkhorn
    monkeypatch.setattr(sinkhorn_kernel, "sinkhorn", lambda *a: calls.append(1) or real(*a))
    for kernel in ("torch", "triton"):
        model.set_sinkhorn_kernel(kernel)
        model.zero_grad()
        out = model(ids)
        sum(o.pow(2).mean() for o in out).backward()
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    blocks = model.args.num_hidden_layers + model.args.num_mtp_layers
    assert len(calls) == 2 * blocks
    (ref, ref_grads), (got, got_grads) = results
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert got_grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(got_grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_which_runs_use_the_kernel(monkeypatch):
    """Not on CPU (the exact torch path stays); on meta tensors while the planner plans a GPU run (so it
    counts the logits the kernel keeps, not every iterate); not for streams that are not a power of two;
    not where ``[model] sinkhorn_kernel = "torch"``."""
    from titan_dsv4.models.deepseek_v4.moe import RoutedExperts

    calls = []
    monkeypatch.setattr(sinkhorn_kernel, "_sinkhorn", lambda *a: calls.append(1) or torch.empty_like(a[0]))
    ids = torch.randint(0, 2048, (1, 24))
    random_model(FLAVORS["debugmodel"])(ids)
    assert not calls
    monkeypatch.setattr(RoutedExperts, "use_grouped_mm", True)  # meta tensors cannot run the per-expert loop
    sites = 2 * (FLAVORS["debugmodel"].num_hidden_layers + FLAVORS["debugmodel"].num_mtp_layers)
    for hc_mult, kernel, expected in ((4, "auto", sites), (3, "auto", 0), (4, "torch", 0)):
        calls.clear()
        with torch.device("meta"):
            planned = DeepseekV4Model(dataclasses.replace(FLAVORS["debugmodel"], hc_mult=hc_mult))
        planned.set_sinkhorn_kernel(kernel)
        with meta_as_gpu():
            planned.to(torch.bfloat16)(ids.to("meta"))
        assert len(calls) == expected, (hc_mult, kernel)


def test_compiles_without_graph_break(monkeypatch):
    """An mHC site's pre step with the kernel compiles to one graph (the kernel an opaque custom op) with
    the same values and gradients."""
    calls = []
    real = sinkhorn_kernel._sinkhorn
    monkeypatch.setattr(sinkhorn_kernel, "_sinkhorn", lambda *a: calls.append(1) or real(*a))
    n, hidden = 4, 8
    site = hyper_connection.HyperConnection(hidden, n, 2, 1e-6, 1e-6)
    for p in site.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(1, 5, n, hidden)

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in (x, site.fn, site.base, site.scale)]
        outs = fn(*leaves, n, 2, 1e-6, 1e-6, True)
        loss = sum(o.square().sum() for o in outs)
        return [*outs, *torch.autograd.grad(loss, leaves)]

    torch._dynamo.reset()
    compiled = torch.compile(hyper_connection.hc_pre.__wrapped__, backend="aot_eager", fullgraph=True)
    for a, b in zip(run(compiled), run(hyper_connection.hc_pre.__wrapped__)):
        torch.testing.assert_close(a, b)
    assert len(calls) == 2
