"""The fast paths (chosen automatically by device or size) against the exact reference path: block-batched
sliding-window attention, CSA attending only to its gathered chosen entries, the compiled (fused) mHC and the
fused RMSNorm."""

import dataclasses
import math

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bf16_gemm import assert_bf16_gemm
from hf_reference import random_model
from titan_dsv4.models.deepseek_v4 import FLAVORS
from titan_dsv4.models.deepseek_v4.attention import AUTO_BLOCK
from titan_dsv4.models.deepseek_v4.hyper_connection import hc_post, hc_pre
from titan_dsv4.models.deepseek_v4.norm import RMSNorm


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _set(model, **attrs):
    for module in model.attention_modules():
        for key, value in attrs.items():
            setattr(module, key, value)


def test_gathered_csa_entries_equal_masked_dense_with_trained_indexer():
    """Gathering each query's top-k entries is the masked dense computation: outputs, every gradient
    (indexer included, trained by its KL) and the logged KL."""
    model = random_model(FLAVORS["debugmodel"]).train()
    model.set_indexer_loss_scale(0.5)
    ids = torch.randint(0, 2048, (2, 200))
    positions = torch.cat([torch.arange(90), torch.arange(110)]).expand(2, 200)
    results = []
    for gather, block in ((False, None), (True, 48)):
        _set(model, gather_entries=gather, query_block=block)
        model.zero_grad()
        for m in model.modules():
            if hasattr(m, "kl_sum"):
                m.kl_sum.zero_()
        out = model(ids, positions)
        sum(o.pow(2).mean() for o in out).backward()
        kl = sum(m.kl_sum.item() for m in model.modules() if hasattr(m, "kl_sum"))
        results.append((out, _grads(model), kl))
    (dense, dense_grads, dense_kl), (gathered, gathered_grads, gathered_kl) = results
    assert dense_kl > 0 and abs(dense_kl - gathered_kl) < 1e-6 * dense_kl
    for a, b in zip(dense, gathered):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert dense_grads.keys() == gathered_grads.keys()
    assert any(".indexer." in name for name in dense_grads)
    for name in dense_grads:
        torch.testing.assert_close(dense_grads[name], gathered_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_gathered_csa_entries_are_not_kept_for_backward():
    """The gathered copies of the chosen entries (``[B, S, topk, d]``: 32 GiB per CSA layer at 64k tokens)
    are gathered again in backward, not saved by the forward."""
    args = dataclasses.replace(FLAVORS["debugmodel"], index_topk=12)  # no other saved tensor has 12 x d
    model = random_model(args).train()
    _set(model, gather_entries=True, query_block=48)
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        out = model(torch.randint(0, 2048, (2, 200)))
    sum(o.pow(2).mean() for o in out).backward()
    assert any(len(s) == 3 and s[-1] == args.index_topk for s in shapes)  # the chosen indices are saved
    k, d, copy = args.index_topk, args.head_dim, 2 * 200 * args.index_topk * args.head_dim
    assert not [s for s in shapes if s[-2:] in ((k, d), (d, k)) and math.prod(s) >= copy]


class _LargestTensor(TorchDispatchMode):
    """Records the shape of every tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def test_long_sequences_never_materialise_seq_by_seq_scores():
    """At seq 1024 the automatic path (forward and backward) makes no tensor with two sequence-long axes,
    and no CSA tensor scores every compressed entry for every query (it gathers the chosen ones)."""
    seq = 1024
    model = random_model(FLAVORS["debugmodel"]).train()
    ids = torch.randint(0, 2048, (1, seq))
    with _LargestTensor() as spy:
        out = model(ids)
        out[0].mean().backward()
    assert not [s for s in spy.shapes if sum(n == seq for n in s) >= 2]
    # scores are [B, blocks, heads, block, keys]; CSA scores over every entry would have window keys + all
    # seq/4 entries (>= 384) on the key axis; gathered, it is window keys + top-k
    entries, heads = seq // 4, model.args.num_attention_heads
    key_axes = {s[-1] for s in spy.shapes if len(s) == 5 and s[2:4] == (heads, AUTO_BLOCK)}
    assert max(key_axes) < entries + AUTO_BLOCK
    assert AUTO_BLOCK + model.args.sliding_window + model.args.index_topk + 1 in key_axes  # + the sink


def test_compiled_mhc_equals_eager():
    """The fused (compiled) mHC site used on GPUs is the eager fp32 math, outputs and gradients; no graph
    break. (Inductor on CPU compiles the same graph inductor compiles for CUDA.)"""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    n, hidden = 4, 32
    x = torch.randn(2, 16, n, hidden, generator=gen, requires_grad=True)
    fn = (0.1 * torch.randn((2 + n) * n, n * hidden, generator=gen)).requires_grad_()
    base = torch.randn((2 + n) * n, generator=gen, requires_grad=True)
    scale = torch.rand(3, generator=gen).add(0.5).requires_grad_()
    sub_out = torch.randn(2, 16, hidden, generator=gen, requires_grad=True)
    inputs = (x, fn, base, scale, sub_out)

    def run(pre, post):
        collapsed, post_w, comb = pre(x, fn, base, scale, n, 20, 1e-6, 1e-6)
        stream = post(sub_out, x, post_w, comb)
        (stream.square().sum() + collapsed.sin().sum()).backward()
        grads = [t.grad.clone() for t in inputs]
        for t in inputs:
            t.grad = None
        return [stream, collapsed, post_w, comb, *grads]

    torch._dynamo.utils.counters.clear()
    eager = run(hc_pre.__wrapped__, hc_post.__wrapped__)
    fused = run(torch.compile(hc_pre.__wrapped__, fullgraph=True),
                torch.compile(hc_post.__wrapped__, fullgraph=True))
    assert not torch._dynamo.utils.counters["graph_break"]
    for a, b in zip(eager, fused):  # fp32 sums in another order: 1e-5 of each tensor's scale
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5 * a.abs().max().item())


def test_fp32_linear_from_bf16_parts_is_fp32_accurate(monkeypatch):
    """The GPU's fp32 linear (sums of bf16 GEMMs of bf16 parts) against fp64: as accurate as an fp32 GEMM,
    forward and both gradients; a gradient of bf16 dtype (of bf16 activations, of bf16 mixed-precision
    weights) is what one bf16 GEMM of the operands gives. The bf16 GEMM is stood in for by the exact fp32
    product of bf16 values; the backward runs in chunks of rows (here 20 rows of 64)."""
    from titan_dsv4.models.deepseek_v4 import fp32_linear as module

    monkeypatch.setattr(module, "bf16_mm", lambda a, b: a.float() @ b.float())
    monkeypatch.setattr(module, "BACKWARD_CHUNK_ELEMENTS", 20 * 80)
    gen = torch.Generator().manual_seed(0)
    for x_dtype, w_dtype in ((torch.bfloat16, torch.float32), (torch.float32, torch.float32),
                             (torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16)):
        x = torch.randn(64, 96, generator=gen).to(x_dtype).requires_grad_()
        weight = torch.randn(80, 96, generator=gen).to(w_dtype).requires_grad_()
        grad = torch.randn(64, 80, generator=gen)
        out = module._SplitLinear.apply(x, weight)
        out.backward(grad)
        x64, w64 = x.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
        ref = x64 @ w64.t()
        ref.backward(grad.double())
        plain = x.detach().float() @ weight.detach().float().t()  # what an fp32 GEMM gives
        fp32_error = (plain.double() - ref).abs().max()
        assert out.dtype == torch.float32
        assert (out.double() - ref).abs().max() <= 4 * fp32_error
        operands = {"x": (grad, weight.detach().float()), "weight": (grad.t(), x.detach().float())}
        for name, got, want in (("x", x.grad, x64.grad), ("weight", weight.grad, w64.grad)):
            if got.dtype == torch.float32:
                assert ((got.double() - want).abs().max() / want.abs().max()) < 2**-20
            else:
                assert_bf16_gemm(got, *operands[name])
        # one bf16 part of a bf16 operand: the single GEMM bf16 x bf16 -> fp32 is the fp32 product
        if x_dtype == torch.bfloat16:
            assert len(module.bf16_parts(x)) == 1
            assert len(module.bf16_parts(weight)) == (3 if w_dtype == torch.float32 else 1)


def test_fp32_matmul_scores_from_bf16_are_not_rounded_to_bf16(monkeypatch):
    """Attention scores from bf16 queries and keys on GPUs: the fp32 product of the bf16 values (one
    fp32-output GEMM), where a bf16 matmul would round each score to bf16 first; gradients are bf16 GEMMs of
    the bf16-rounded score gradient. The GEMM is stood in for by the fp32 product of the bf16 values."""
    from titan_dsv4.models.deepseek_v4 import fp32_linear as module

    monkeypatch.setattr(module, "takes_gpu_path", lambda x: True)
    monkeypatch.setattr(module, "bf16_bmm", lambda a, b: a.float() @ b.float())
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 40, 64, generator=gen).to(torch.bfloat16).requires_grad_()
    k = torch.randn(2, 3, 64, 50, generator=gen).to(torch.bfloat16).requires_grad_()
    grad = torch.randn(2, 3, 40, 50, generator=gen)
    scores = module.fp32_matmul(q, k)
    scores.backward(grad)
    exact = q.detach().double() @ k.detach().double()
    assert scores.dtype == torch.float32
    scale = exact.abs().max()
    assert (scores.double() - exact).abs().max() < 2**-20 * scale
    assert ((q.detach() @ k.detach()).double() - exact).abs().max() > 2**-12 * scale  # bf16 output rounds
    bf16_grad = grad.to(torch.bfloat16).double()
    torch.testing.assert_close(q.grad.double(), bf16_grad @ k.detach().double().transpose(-1, -2),
                               rtol=2**-7, atol=2**-7)
    torch.testing.assert_close(k.grad.double(), q.detach().double().transpose(-1, -2) @ bf16_grad,
                               rtol=2**-7, atol=2**-7)


def test_bf16_part_products_are_fp32_accurate_in_every_grouping(monkeypatch):
    """``parts_mm`` sums the bf16 part products one GEMM per pair, in one GEMM concatenated along K, or one
    GEMM per part of either operand with the other's parts stacked: each equals the exact sum of the pairs
    (fp64) to 2^-20 of its scale (a dropped part: 2^-9). The bf16 GEMM is stood in for by the fp32 product
    of bf16 values. At mHC's shapes (8192 tokens, 4 x 4096 streams, 24 mixes) the chosen grouping reads the
    streams once and writes the [tokens, 4 x 4096] gradient once."""
    from titan_dsv4.models.deepseek_v4 import fp32_linear as module

    calls = []
    monkeypatch.setattr(module, "bf16_mm", lambda a, b: calls.append(1) or a.float() @ b.float())
    gen = torch.Generator().manual_seed(0)
    for (m, k, n), (a_parts, b_parts), parts in (((64, 96, 5), (1, 3), 3), ((64, 5, 96), (3, 3), 2),
                                                 ((5, 64, 96), (3, 1), 3), ((40, 50, 60), (3, 3), 3)):
        a = module.bf16_parts(torch.randn(m, k, generator=gen), a_parts)
        b = module.bf16_parts(torch.randn(k, n, generator=gen), b_parts)
        pairs = [(i, j) for i in range(a_parts) for j in range(b_parts) if i + j < parts]
        exact = sum(a[i].double() @ b[j].double() for i, j in pairs)
        for plan in ("pairs", "k", "a", "b"):
            monkeypatch.setattr(module, "_product_plan", lambda *args, plan=plan: plan)
            calls.clear()
            got = module.parts_mm(a, b, parts)
            assert got.dtype == torch.float32 and got.shape == (m, n)
            assert (got.double() - exact).abs().max() <= 2**-20 * exact.abs().max(), (plan, m, k, n)
            gemms = {"pairs": len(pairs), "k": 1, "a": len({i for i, _ in pairs}),
                     "b": len({j for _, j in pairs})}
            assert len(calls) == gemms[plan]
    monkeypatch.undo()
    mixes = [(0, 0), (0, 1), (0, 2)]  # bf16 streams x the fp32 weight's three parts
    assert module._product_plan(8192, 16384, 24, mixes) == "a"  # streams read once
    assert module._product_plan(8192, 24, 16384, [(0, 0), (0, 1), (1, 0)]) == "k"  # gradient written once
    assert module._product_plan(24, 8192, 16384, [(0, 0), (1, 0), (2, 0)]) == "b"  # streams read once


def test_compiled_bf16_parts_keep_every_part():
    """Inductor compiles away a ``t.to(bf16).float()`` round trip (it does not emulate precision casts), so
    parts taken as ``rest - rest.to(bf16).float()`` come out zero when compiled — the fp32 products of
    compiled code (mHC's mixes, the fused head) were then bf16. The parts are taken by clearing low bits:
    compiled and eager agree bit for bit, and three parts sum to the fp32 tensor exactly."""
    from titan_dsv4.models.deepseek_v4.fp32_linear import bf16_parts

    torch._dynamo.reset()
    t = torch.randn(64, 33, generator=torch.Generator().manual_seed(0)) * 1e3
    compiled = torch.compile(lambda x: torch.stack(bf16_parts(x, 3)), fullgraph=True)(t)
    eager = torch.stack(bf16_parts(t, 3))
    assert torch.equal(compiled, eager)
    assert torch.equal(eager.double().sum(0), t.double())
    assert (eager[1] != 0).any() and (eager[2] != 0).any()


def test_split_products_trace_whole_with_symbolic_sizes():
    """A block compiles its fp32 products (three bf16 parts) into one graph also once its sizes are symbolic,
    as after any recompile: choosing the plan with ``min(dict, key=dict.get)`` broke the graph there."""
    from titan_dsv4.models.deepseek_v4 import fp32_linear

    def product(a, b):
        return fp32_linear.parts_mm(fp32_linear.bf16_parts(a), fp32_linear.bf16_parts(b),
                                    mm=lambda x, y: x.float() @ y.float())

    compiled = torch.compile(product, backend="eager", fullgraph=True, dynamic=True)
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    torch.testing.assert_close(compiled(a, b), product(a, b))
    torch.testing.assert_close(compiled(a, b).double(), a.double() @ b.double(), rtol=1e-6, atol=1e-6)


def test_rms_norm_is_the_released_formula_through_the_fused_op():
    """RMSNorm (fp32 math, fp32 weight) equals the formula written out, bit for bit on CPU (values and both
    gradients, bf16 and fp32 inputs), and runs as ``aten::_fused_rms_norm``: one kernel each way on CUDA."""
    norm = RMSNorm(256, 1e-6)
    torch.nn.init.normal_(norm.weight)
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(2, 16, 256, dtype=dtype, requires_grad=True)
        grad_out = torch.randn(2, 16, 256, dtype=dtype)
        xf = x.float()
        want = (norm.weight * (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + 1e-6))).to(dtype)
        with torch.profiler.profile() as prof:
            got = norm(x)
        assert "aten::_fused_rms_norm" in {event.name for event in prof.events()}
        assert torch.equal(got, want)
        for a, b in zip(torch.autograd.grad(got, [x, norm.weight], grad_out),
                        torch.autograd.grad(want, [x, norm.weight], grad_out)):
            assert torch.equal(a, b)
