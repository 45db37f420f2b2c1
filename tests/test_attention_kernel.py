"""The fused attention kernel (Triton, run on CPU by Triton's interpreter) against a dense masked softmax
written out here, and inside the model against the torch path; which runs take it and the indexer's scoring
kernel; and that the kernels compile for an H100."""

import json
import os
import subprocess
import sys

import pytest
import torch

from hf_reference import random_model
from titan_dsv4.models.deepseek_v4 import FLAVORS

pytest.importorskip("triton")
from titan_dsv4.models.deepseek_v4.attention_kernel import fused_attention  # noqa: E402

SCRIPTS = os.path.join(os.path.dirname(__file__), "..", "scripts")


def _dense_reference(q, kv, entries, entry_index, doc_ids, sink, window):
    """Every query's scores over all raw keys and its listed entries, masked, with the sink column: the
    output and each listed entry's probability summed over heads."""
    batch, seq, heads, dim = q.shape
    t = torch.arange(seq)
    raw_ok = (t[None, :] <= t[:, None]) & (t[None, :] > t[:, None] - window)
    raw_ok = raw_ok[None] & (doc_ids[:, :, None] == doc_ids[:, None, :])  # [B, S, S]
    listed = entries[torch.arange(batch)[:, None, None], entry_index.clamp(min=0)]  # [B, S, E, D]
    scores = torch.cat([torch.einsum("bthd,bjd->bhtj", q, kv), torch.einsum("bthd,bted->bhte", q, listed)], -1)
    scores = scores * dim**-0.5
    scores = scores.masked_fill(~torch.cat([raw_ok, entry_index >= 0], -1)[:, None], float("-inf"))
    probs = torch.cat([scores, sink.view(1, -1, 1, 1).expand(batch, heads, seq, 1)], -1).softmax(-1)[..., :-1]
    out = (torch.einsum("bhtj,bjd->bthd", probs[..., :seq], kv)
           + torch.einsum("bhte,bted->bthd", probs[..., seq:], listed))
    return out, probs[..., seq:].sum(dim=1)


@pytest.mark.parametrize("dtype,window", [(torch.float32, 11), (torch.bfloat16, 11), (torch.float32, 40)])
def test_kernel_equals_dense_masked_softmax_with_sink(dtype, window):
    """Outputs, the gradients of queries, keys/values, entries and sinks, and each listed entry's probability
    summed over heads (the indexer's KL target); two packed documents, a window and an entry list that are
    not multiples of the key tile, heads that are not a power of two, unused list slots (-1: some lists
    end early, some are empty) and an entry listed twice for one query (it counts twice, as a gathered one
    does). Window 40 (more than two key tiles, longer than the sequence): the first queries start past the
    tiles wholly before position 0."""
    batch, seq, heads, dim, num, listed = 2, 37, 3, 32, 9, 19
    q = torch.randn(batch, seq, heads, dim).to(dtype)
    kv = torch.randn(batch, seq, dim).to(dtype)
    entries = torch.randn(batch, num, dim).to(dtype)
    sink = torch.randn(heads)
    doc_ids = torch.zeros(batch, seq, dtype=torch.long)
    doc_ids[1, 15:] = 1
    entry_index = torch.randint(-1, num, (batch, seq, listed))
    entry_index[0, 5, :2] = 3
    entry_index[0, 30, 4:] = -1  # the kernel walks the list up to its last used slot
    entry_index[1, 10, 16], entry_index[1, 10, 17:] = 2, -1  # the last used slot opens a key tile
    entry_index[1, 20:23] = -1
    grad = torch.randn(batch, seq, heads, dim)
    leaves = [t.clone().requires_grad_() for t in (q, kv, entries, sink)]
    out, mass = fused_attention(*leaves[:3], entry_index, doc_ids, leaves[3], window, entry_mass=True)
    got = [out, *torch.autograd.grad(out, leaves, grad.to(dtype))]
    exact = [t.detach().double().requires_grad_() for t in (q, kv, entries, sink)]
    ref, ref_mass = _dense_reference(*exact[:3], entry_index, doc_ids, exact[3], window)
    want = [ref, *torch.autograd.grad(ref, exact, grad.double())]
    assert mass.dtype == torch.float32 and not mass.requires_grad
    # probabilities from bf16 operands' scores: a bf16-sized error in the score shows in the probability
    torch.testing.assert_close(mass.double(), ref_mass.detach(), rtol=1e-5 if dtype == torch.float32 else 2e-2,
                               atol=1e-6 if dtype == torch.float32 else 1e-2)
    # bf16: the probabilities and score gradients enter their GEMMs as bf16, as in the torch path
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=3e-2)
    for name, a, b in zip(("out", "q", "kv", "entries", "sink"), got, want):
        assert a.dtype == (torch.float32 if name == "sink" else dtype), name
        torch.testing.assert_close(a.double(), b, **tol, msg=name)


@pytest.mark.parametrize("indexer_trains", [False, True])
def test_model_with_fused_kernel_equals_torch_path(indexer_trains):
    """Every layer kind (sliding, CSA with its top-k, HCA) and the MTP block, two packed documents: the
    outputs and every gradient equal the torch path; while the indexer trains, also its KL (from the
    kernel's per-entry probability mass) and its gradients."""
    model = random_model(FLAVORS["debugmodel"]).train()
    model.set_indexer_loss_scale(0.5 if indexer_trains else 0.0)
    ids = torch.randint(0, 2048, (1, 72))
    positions = torch.cat([torch.arange(30), torch.arange(42)])[None]
    results = []
    for mode in ("torch", "triton"):
        model.set_attention_kernel(mode)
        for m in model.attention_modules():
            if m.indexer is not None:
                m.indexer.kl_sum.zero_()
        model.zero_grad()
        out = model(ids, positions)
        sum(o.pow(2).mean() for o in out).backward()
        kl = sum(m.indexer.kl_sum.item() for m in model.attention_modules() if m.indexer is not None)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out, grads, kl))
    (ref, ref_grads, ref_kl), (got, got_grads, got_kl) = results
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert got_grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(got_grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert (ref_kl > 0) == indexer_trains and got_kl == pytest.approx(ref_kl, rel=1e-6)


def test_which_runs_use_the_kernels(monkeypatch):
    """``auto``: not on CPU (the exact torch path stays), on meta tensors while the planner plans a GPU run
    (so it counts what the kernels keep), not with ``[model] attention_kernel = "torch"``. Under torch's
    deterministic algorithms the attention kernel stays off (its backward adds atomically) and the indexer's
    scoring kernel runs (it adds nothing atomically): once per CSA layer."""
    from titan_dsv4.models.deepseek_v4 import DeepseekV4Model, attention_kernel, indexer_kernel
    from titan_dsv4.models.deepseek_v4.gpu_paths import meta_as_gpu
    from titan_dsv4.models.deepseek_v4.moe import RoutedExperts

    calls = {"attention": 0, "indexer": 0}

    def counted(name, real):
        def run(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)
        return run

    monkeypatch.setattr(attention_kernel, "fused_attention", counted("attention", attention_kernel.fused_attention))
    monkeypatch.setattr(indexer_kernel, "_index_scores", counted("indexer", indexer_kernel._index_scores))
    model = random_model(FLAVORS["debugmodel"])
    layers = len(model.attention_modules())
    csa = sum(m.indexer is not None for m in model.attention_modules())
    ids = torch.randint(0, 2048, (1, 24))
    model(ids)
    assert calls == {"attention": 0, "indexer": 0}
    model.set_attention_kernel("triton")
    model(ids)
    assert calls == {"attention": layers, "indexer": csa} and csa > 0
    monkeypatch.setattr(RoutedExperts, "use_grouped_mm", True)  # meta tensors cannot run the per-expert loop
    with torch.device("meta"):
        planned = DeepseekV4Model(FLAVORS["debugmodel"]).to(torch.bfloat16)  # grouped GEMMs are bf16
    for kernel, deterministic, expected in (("auto", False, (layers, csa)), ("torch", False, (0, 0)),
                                            ("auto", True, (0, csa))):
        calls.update(attention=0, indexer=0)
        planned.set_attention_kernel(kernel)
        torch.use_deterministic_algorithms(deterministic)
        try:
            with meta_as_gpu():
                planned(ids.to("meta"))
        finally:
            torch.use_deterministic_algorithms(False)
        assert (calls["attention"], calls["indexer"]) == expected, (kernel, deterministic)


def test_compiles_without_graph_break():
    """The kernel is an opaque custom op to ``torch.compile``: one graph, same values and gradients."""
    batch, seq, heads, dim = 1, 9, 2, 16
    q, kv, entries = torch.randn(batch, seq, heads, dim), torch.randn(batch, seq, dim), torch.randn(batch, 3, dim)
    sink, doc_ids = torch.randn(heads), torch.zeros(batch, seq, dtype=torch.long)
    entry_index = torch.randint(-1, 3, (batch, seq, 2))

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in (q, kv, entries, sink)]
        out, mass = fn(*leaves[:3], entry_index, doc_ids, leaves[3], 4, entry_mass=True)
        return [out, mass, *torch.autograd.grad(out.square().sum(), leaves)]

    torch._dynamo.reset()
    compiled = torch.compile(fused_attention, backend="aot_eager", fullgraph=True)
    for a, b in zip(run(compiled), run(fused_attention)):
        torch.testing.assert_close(a, b)


def test_kernels_compile_for_h100_at_flash_shapes():
    """Flash's shapes (64 heads of 512, window 128, top-k 512; 64 index heads of 128; 4 mHC streams) compile
    for sm_90 within its shared memory, without spilling registers and without device-wide memory fences
    (the interpreter checks none of these): the attention, indexer and Sinkhorn kernels. Compiled in a
    process of its own: under the interpreter the kernels are Python functions."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, os.path.join(SCRIPTS, "compile_kernels.py"), "--json"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert set(report) == {"attention forward", "attention forward, indexer trained", "attention backward",
                           "indexer scores", "sinkhorn forward", "sinkhorn backward"}
    for name, usage in report.items():
        assert 0 <= usage["shared_bytes"] <= 227 * 1024 and usage["registers"] > 0, name
        assert usage["spill_bytes"] == 0, name
        assert usage["device_fences"] == 0, name  # the attention's atomic adds are relaxed
    for name in ("attention forward", "attention forward, indexer trained", "attention backward"):
        # the key tiles stream through shared memory, the next one loading while this one computes
        assert report[name]["shared_bytes"] > 0 and report[name]["async_copies"] > 0, name


class _LaunchSpy:
    """A Triton kernel that records each launch's arguments (then launches it)."""

    def __init__(self, kernel, launches: list):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((self.kernel, args, kwargs))
            return self.kernel[grid](*args, **kwargs)
        return launch


def _pointers(kernel, args, kwargs, compile_kernels) -> dict:
    """Each pointer argument's Triton type and whether the launcher marks it 16-byte aligned."""
    signature, _, attrs, _ = compile_kernels.specialise(kernel, args, kwargs)
    return {name: (kind, (i,) in attrs) for i, (name, kind) in enumerate(signature.items()) if name.endswith("_ptr")}


def test_a_bf16_model_launches_the_kernels_as_compiled_for_h100(gpu_code_paths, monkeypatch):
    """``compile_kernels.py`` compiles each kernel for sm_90 (the test above keeps it free of spills) for the
    launches a bf16 model makes: the same pointer types and 16-byte alignment (which Triton's launcher
    specialises on: an unaligned view would make another kernel). A launch with other types compiles anew
    on the GPU, or fails, as the attention backward did with an fp32 output gradient against bf16 keys
    ("Both operands must be same dtype"; the interpreter upcasts every GEMM operand and could not see it).
    Forward and backward, indexer trained, MTP included."""
    from triton_model import bf16_model_with_triton_kernels

    sys.path.insert(0, SCRIPTS)
    import compile_kernels

    compiled = {}
    for _, kernel, args, kwargs in compile_kernels.recorded_launches(4, 64, 8, 8, 4, 4, 32):
        compiled.setdefault(kernel, _pointers(kernel, args, kwargs, compile_kernels))
    launches = []
    for module, name in compile_kernels.KERNELS:
        monkeypatch.setattr(module, name, _LaunchSpy(getattr(module, name), launches))
    model, ids, targets = bf16_model_with_triton_kernels([4, 128, 4], indexer_loss_scale=0.5)
    model(ids, targets=targets)[0].backward()
    assert {kernel for kernel, _, _ in launches} == set(compiled)  # every kernel ran, and no other
    for kernel, args, kwargs in launches:
        assert _pointers(kernel, args, kwargs, compile_kernels) == compiled[kernel], kernel.fn.__qualname__


def test_compile_kernels_specialises_as_tritons_launcher():
    """``compile_kernels.specialise`` marks each argument of the recorded launches as the installed Triton's
    launcher does (its private ``native_specialize_impl``, where this Triton has it)."""
    jit = pytest.importorskip("triton.runtime.jit")
    if not hasattr(jit, "native_specialize_impl"):
        pytest.skip("this Triton's launcher specialises elsewhere")
    from triton.backends.compiler import BaseBackend

    sys.path.insert(0, SCRIPTS)
    import compile_kernels

    for label, kernel, args, kwargs in compile_kernels.recorded_launches(64, 512, 128, 512, 4, 64, 128):
        signature, constexprs, attrs, _ = compile_kernels.specialise(kernel, args, kwargs)
        bound = {**dict(zip(kernel.arg_names, args)), **kwargs}
        for i, param in enumerate(jit.JITFunction(kernel.fn).params):  # (the tests' kernels are interpreted)
            if param.is_constexpr:
                assert signature[param.name] == "constexpr", (label, param.name)
                continue
            kind, key = jit.native_specialize_impl(BaseBackend, bound[param.name], False, True, True)
            if kind == "constexpr":
                assert constexprs[param.name] == key, (label, param.name)
            else:
                assert (signature[param.name], (i,) in attrs) == (kind, key == "D"), (label, param.name)
