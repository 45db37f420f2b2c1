"""One-GPU speed of a DeepSeek-V4-shaped model: tokens/s, MFU, peak memory, MTP overhead, time by component.

The model keeps V4's shapes where they set the cost (512-d single-KV-head attention with sinks, q/o low
rank, 4 mHC streams with 20 Sinkhorn iterations, the real 129k vocabulary, 64 routed experts top-6 + a
shared one) and every layer type (hash-routed, sliding, CSA with indexer, HCA, an MTP block), sized to fit
one GPU in bf16. A step is forward + main/MTP loss + backward (no optimizer: FSDP divides its cost).

Baselines measured in the same run: a large bf16 matmul (the attainable matmul peak) and the same model with
the fast paths switched back to the exact ones (eager mHC, per-expert loop). Time by component two ways: the
torch profiler's kernels of one real step, each charged to the component that ran it (its backward kernels to
the component whose forward built their autograd node: ``components/time_by_component.py``), and CUDA-event
timings of each component's forward + backward alone on the real shapes, beside the baselines they replace;
their FLOP shares come from ``DeepseekV4ModelArgs`` counts. Writes a JSON summary and the profiler's top
kernels to ``--out``.

    python scripts/bench_gpu.py [--seq 4096] [--batch 2] [--steps 6] [--out DIR] [--compile-blocks]
                                [--checkpointing] [--deadline SECONDS] [--smoke]

It ends with the issue's goal figures against their bounds (``goal`` in the summary, kept up to date after
every part). ``scripts/gpu_run.sh`` is what a lent GPU's one call runs: this script, then the GPU checks of
the memory planner and of ``[profiling]``.

``--smoke`` runs every part on the debug model, once, on CPU when there is no GPU (the Triton parts under
``TRITON_INTERPRET=1``): a check of the script, not a measurement (``tests/test_bench_gpu.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
import traceback

import torch
import torch.nn.functional as F

from titan_dsv4.components.loss import MTPLoss, build_targets
from titan_dsv4.components.metrics import device_peak_tflops
from titan_dsv4.components.time_by_component import labelled, time_by_component
from titan_dsv4.models.deepseek_v4 import FLAVORS, DeepseekV4Model
from titan_dsv4.models.deepseek_v4 import (attention, attention_kernel, fp32_linear, gpu_paths, head_loss,
                                           hyper_connection, indexer_kernel)
from titan_dsv4.models.deepseek_v4 import model as model_module
from titan_dsv4.models.deepseek_v4.lora import freeze_all_but_adapters
from titan_dsv4.models.deepseek_v4.moe import RoutedExperts
from titan_dsv4.models.deepseek_v4.parallelize import cast_to_compute_dtypes

BENCH_ARGS = dict(
    hidden_size=2048, num_hidden_layers=6, num_attention_heads=32, head_dim=512, q_lora_rank=1024,
    o_lora_rank=512, o_groups=4, n_routed_experts=64, num_experts_per_tok=6, moe_intermediate_size=1024,
    num_hash_layers=1, compress_ratios=[0, 0, 4, 128, 4, 128, 0], index_n_heads=64, index_head_dim=128,
    index_topk=512, num_nextn_predict_layers=1,
)


SMOKE = False  # --smoke: the debug model instead, every part run in seconds (on CPU too) to check the script


def bench_args(mtp: int):
    base = FLAVORS["debugmodel"] if SMOKE else dataclasses.replace(FLAVORS["flash"], **BENCH_ARGS)
    return base.with_mtp_layers(mtp)


def model_flops_per_token(args, seq: int) -> float:
    """The MFU numerator: the benchmark's indexer is frozen (no KL loss), so it has no backward."""
    return args.training_flops_per_token(seq, indexer_trained=False)


@torch.no_grad()
def fast_init(module: torch.nn.Module, args) -> None:
    """Random init of a model of ``args`` or a block of it, on the GPU (the per-FQN CPU init of ``init.py`` is
    exact but slow for billions)."""
    h = args.hidden_size
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        leaf = name.rsplit(".", 1)[-1]
        if name.endswith("tid2eid"):
            k, e = args.num_experts_per_tok, args.n_routed_experts
            t.copy_(torch.rand(t.shape[0], e, device=t.device).argsort(dim=-1)[:, :k])
        elif t.dtype == torch.uint8 and name.endswith("_scale"):  # FP4-stored experts: scales 2^-9 ...
            t.fill_(118)
        elif t.dtype == torch.uint8:  # ... and random codes (|w| <= 0.012)
            t.random_(0, 256)
        elif leaf in ("base", "attn_sink", "ape", "bias", "expert_load", "kl_sum"):
            t.zero_()
        elif leaf == "scale" or name.endswith("norm.weight"):
            t.fill_(1.0)
        elif name == "embed.weight":
            t.normal_(0.0, 1.0)
        elif name == "head.weight":
            t.normal_(0.0, h**-0.5)
        else:
            t.normal_(0.0, 0.02)


def build(mtp: int, device: torch.device, lora: bool = False) -> DeepseekV4Model:
    """``lora``: rank-16 adapters on the attention and every routed expert, the frozen experts stored as FP4
    (``train_configs/flash_lora_1x8_h100.toml``'s choice), only the adapters trained."""
    args = bench_args(mtp)
    if lora:
        targets = ["attn.wq_a", "attn.wq_b", "attn.wkv", "attn.wo_b", "ffn.experts.w1", "ffn.experts.w2",
                   "ffn.experts.w3"]
        args = dataclasses.replace(args, lora_rank=16, lora_targets=targets, expert_storage="fp4")
    with torch.device(device):
        model = DeepseekV4Model(args)
    cast_to_compute_dtypes(model)
    fast_init(model, model.args)
    if lora:
        freeze_all_but_adapters(model)
    model.set_mtp_loss_scale(0.3)
    return model.train()


def batch(args, batch_size: int, seq: int, device: torch.device):
    gen = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(2, args.vocab_size, (batch_size, seq + 1), device=device, generator=gen)
    positions = torch.arange(seq, device=device).expand(batch_size, seq)
    return ids[:, :-1], build_targets(ids[:, 1:], positions, args.num_mtp_layers)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_time(fn, warmup: int, iters: int) -> float:
    """Mean seconds of ``fn`` over ``iters`` calls after ``warmup``: CUDA events, or the wall clock without a
    GPU (``--smoke``, which runs ``fn`` once: it checks the code, not the speed)."""
    if SMOKE:
        warmup, iters = 0, 1
    for _ in range(warmup):
        fn()
    if not torch.cuda.is_available():
        began = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - began) / iters
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def matmul_tflops(device: torch.device) -> float:
    n = 512 if SMOKE else 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    seconds = device_time(lambda: a @ b, 3, 10)
    return 2 * n**3 / seconds / 1e12


def exact_paths(on: bool) -> None:
    """Switch the GPU fast kernels back to the plain code (eager mHC, per-expert loop, fp32 GEMMs) or restore
    them."""
    gpu_paths.fast_kernels = not on


def step_fn(model, loss_fn, ids, targets):
    def step():
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model(ids, targets=targets), targets)
        loss.backward()
        loss_fn.parts.clear()
    return step


def measure_step(mtp: int, opts, device, peak: float, compile_blocks: bool = False,
                 checkpointing: tuple[str, str] | None = None, fused_attention: bool = True,
                 expert_qat: str = "none", lora: bool = False) -> dict:
    """``checkpointing``: ``(activation_checkpoint.mode, selective_ac_option)`` applied to every block;
    ``fused_attention=False``: the blocked torch attention instead of the Triton kernel; ``expert_qat``: the
    routed experts' quantisation-aware training (``[model] expert_qat``); ``lora``: as ``build``'s."""
    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = build(mtp, device, lora)
    model.set_attention_kernel("auto" if fused_attention else "torch")
    model.set_expert_qat(expert_qat)
    args = model.args
    ids, targets = batch(args, opts.batch, opts.seq, device)
    loss_fn = MTPLoss()
    if checkpointing:
        from titan_dsv4.models.deepseek_v4.parallelize import apply_activation_checkpointing
        apply_activation_checkpointing(model, *checkpointing, compiled=compile_blocks)
    if compile_blocks:
        from titan_dsv4.models.deepseek_v4.parallelize import apply_compile
        torch._dynamo.utils.counters.clear()
        apply_compile(model)
    step = step_fn(model, loss_fn, ids, targets)
    t0 = time.perf_counter()
    step()
    synchronize(device)
    first = time.perf_counter() - t0
    seconds = device_time(step, 1, opts.steps)
    tokens = opts.batch * opts.seq
    flops = model_flops_per_token(args, opts.seq) * tokens
    result = dict(mtp=mtp, step_s=seconds, first_step_s=first, tokens_per_s=tokens / seconds,
                  tflops=flops / seconds / 1e12, mfu=flops / seconds / 1e12 / peak,
                  peak_memory_gib=torch.cuda.max_memory_allocated(device) / 2**30 if on_gpu else None,
                  params_b=args.num_params() / 1e9, flops_per_token=flops / tokens)
    if compile_blocks:
        result["graph_breaks"] = {str(k): v for k, v in torch._dynamo.utils.counters["graph_break"].items()}
    del model, step
    return result


def component_flops(args, seq: int) -> dict[str, float]:
    """Training FLOPs per token by component (6 x matmul params + attention scores/values)."""
    out = {"attention": 0.0, "moe": 0.0, "mhc": 0.0, "head_loss": 0.0}
    layers = args.num_hidden_layers + args.num_mtp_layers
    h, n = args.hidden_size, args.hc_mult
    for i in range(layers):
        parts = args.block_params(i)
        out["moe"] += 6.0 * (parts["gate"] + parts["shared"]
                             + parts["routed"] * args.num_experts_per_tok / args.n_routed_experts)
        out["mhc"] += 6.0 * 2 * (2 + n) * n * n * h
    total = model_flops_per_token(args, seq)
    attention_core = total - 6.0 * args.num_active_params()
    out["attention"] = attention_core + 6.0 * sum(args.block_params(i)["attn"] for i in range(layers))
    out["head_loss"] = 6.0 * (1 + args.num_mtp_layers) * args.vocab_size * h
    out["total"] = total
    return out


def component_times(opts, device) -> dict[str, float]:
    """Seconds per step spent in each component, forward + backward, from timings on the real shapes."""
    model = build(1, device)
    args = model.args
    b, s, h, n = opts.batch, opts.seq, args.hidden_size, args.hc_mult
    ids, targets = batch(args, b, s, device)
    ctx = model.attention_context(torch.arange(s, device=device).expand(b, s))
    x = torch.randn(b, s, h, device=device, dtype=torch.bfloat16, requires_grad=True)
    stream = torch.randn(b, s, n, h, device=device, dtype=torch.bfloat16, requires_grad=True)
    times = {"attention": 0.0, "moe": 0.0, "mhc": 0.0, "head_loss": 0.0}

    def fwd_bwd(fn):
        def run():
            out = fn()
            out = out if isinstance(out, torch.Tensor) else out[0]
            out.float().sum().backward()
        return device_time(run, 2, 5)

    blocks = [*model.layers.values(), *model.mtp.values()]
    times["attention_unfused_baseline"] = 0.0  # the blocked torch attention: not part of the step
    times["mhc_torch_sinkhorn_baseline"] = 0.0  # the sites with the torch Sinkhorn: not part of the step
    for block in blocks:
        times["attention"] += fwd_bwd(lambda: block.attn(x, ctx))
        block.attn.kernel = "torch"
        times["attention_unfused_baseline"] += fwd_bwd(lambda: block.attn(x, ctx))
        block.attn.kernel = "auto"
        times["moe"] += fwd_bwd(lambda: block.ffn(x, ids))
        for site in (block.hc_attn, block.hc_ffn):
            def mhc(site=site):
                collapsed, post, comb = site(stream)
                return hyper_connection.HyperConnection.post(collapsed, stream, post, comb)
            times["mhc"] += fwd_bwd(mhc)
            site.sinkhorn_kernel = "torch"
            times["mhc_torch_sinkhorn_baseline"] += fwd_bwd(mhc)
            site.sinkhorn_kernel = "auto"
    hidden = torch.randn(b, s, h, device=device, dtype=torch.bfloat16, requires_grad=True)

    def fused_head_loss():
        hiddens = [model.norm(model.hc_head(stream)), hidden]
        return head_loss.head_loss(hiddens, model.head.weight, targets, [1.0, 0.3])[0]

    def unfused_head_loss():  # the baseline: fp32 logits of both depths, then torch's cross-entropy
        logits = fp32_linear.fp32_linear(torch.stack([model.norm(model.hc_head(stream)), hidden]),
                                          model.head.weight)
        return sum(w * F.cross_entropy(logits[d].flatten(0, 1), targets[..., d].flatten(), reduction="sum")
                   for d, w in enumerate([1.0, 0.3]))
    times["head_loss"] = fwd_bwd(fused_head_loss)
    times["head_loss_unfused_baseline"] = fwd_bwd(unfused_head_loss)  # not part of the step
    return times


def component_labels(model: DeepseekV4Model) -> tuple[dict[torch.nn.Module, str], dict[tuple[object, str], str]]:
    """The benchmark's components, as ``time_by_component.labelled`` takes them: attention, MoE, mHC (the
    sites, their post step and the head's collapse) and the fused head + loss; the rest (embedding, norms,
    MTP projections, RoPE tables, the batch's loss sums) is ``other``."""
    by_leaf = {"attn": "attention", "ffn": "moe", "hc_attn": "mhc", "hc_ffn": "mhc", "hc_head": "mhc"}
    modules = {module: by_leaf[leaf] for fqn, module in model.named_modules()
               if (leaf := fqn.rsplit(".", 1)[-1]) in by_leaf}
    functions = {(model_module, "head_loss"): "head_loss", (hyper_connection.HyperConnection, "post"): "mhc"}
    return modules, functions


def profile_step(opts, device, path: str) -> dict:
    """One fast MTP step under the torch profiler: its top kernels (written to ``path``) and its kernel time
    by component and phase, attributed in the step itself (``time_by_component``), beside the step's wall
    time: the difference is time the GPU waited for the host."""
    from torch.profiler import ProfilerActivity, profile
    model = build(1, device)
    ids, targets = batch(model.args, opts.batch, opts.seq, device)
    step = step_fn(model, MTPLoss(), ids, targets)
    with labelled(*component_labels(model)):
        step_s = device_time(step, 1, 3)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            step()
            synchronize(device)
    with open(path, "w") as f:
        f.write(prof.key_averages().table(sort_by="self_device_time_total", row_limit=40))
    seconds = time_by_component(prof.events())
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and not e.is_user_annotation]
    del model
    # kernel_s from the device's own records: attributed_s equals it when every kernel found its op
    return dict(step_s=step_s, kernel_s=sum(e.time_range.elapsed_us() for e in kernels) / 1e6,
                attributed_s=sum(sum(phases.values()) for phases in seconds.values()), by_component=seconds)


def fused_attention_error(device, seq: int) -> dict:
    """The Triton attention kernel against the blocked torch path on the benchmark model's CSA and HCA layers
    (bf16): relative error of the output and of every gradient, the larger of the two layers."""
    model = build(0, device)
    ctx = model.attention_context(torch.arange(seq, device=device).expand(1, seq))
    x = torch.randn(1, seq, model.args.hidden_size, device=device, dtype=torch.bfloat16)
    errors: dict[str, float] = {}
    for layer in ("2", "3"):  # CSA, HCA
        attn = model.layers[layer].attn
        results = []
        for mode in ("torch", "triton"):
            attn.kernel = mode
            attn.zero_grad()
            out = attn(x, ctx)
            out.float().square().sum().backward()
            results.append({"out": out.detach(), **{n: p.grad.clone() for n, p in attn.named_parameters()
                                                     if p.grad is not None}})
        for name, ref in results[0].items():
            err = ((results[1][name].float() - ref.float()).norm() / ref.float().norm()).item()
            errors[name] = max(errors.get(name, 0.0), err)
    del model
    return errors


def attention_kernel_tiles(opts, device) -> dict[str, dict[str, float]]:
    """The fused attention kernel on one CSA layer's shapes (window 128, top-k 512 listed entries) with 16 and
    32 keys per tile (both compile without spills on sm_90): what to set ``attention_kernel.BLOCK_N`` to.
    Forward and backward apart, each with its GEMMs' TFLOP/s (2 GEMMs per key forward, 5 backward): the
    roofline estimate assumes 40% of the matmul peak for both; a backward much slower per FLOP than the
    forward points at its atomic key/value-gradient adds, the case for a key-major backward."""
    args = bench_args(0)
    b, s, h, d = opts.batch, opts.seq, args.num_attention_heads, args.head_dim
    q = torch.randn(b, s, h, d, device=device, dtype=torch.bfloat16, requires_grad=True)
    kv = torch.randn(b, s, d, device=device, dtype=torch.bfloat16, requires_grad=True)
    entries = torch.randn(b, s // 4, d, device=device, dtype=torch.bfloat16, requires_grad=True)
    sink = torch.zeros(h, device=device, requires_grad=True)
    index = torch.rand(b, s, s // 4, device=device).argsort(-1)[..., :args.index_topk].int()
    doc_ids = torch.zeros(b, s, dtype=torch.long, device=device)
    window = args.sliding_window
    keys_seen = b * (sum(min(t + 1, window) for t in range(s)) + s * index.shape[-1])  # (query, key) pairs
    gemm_flops = keys_seen * h * 2 * d  # one [heads, D] x [D] product per pair
    attend = lambda: attention_kernel.fused_attention(q, kv, entries, index, doc_ids, sink, window)[0]
    chosen, times = attention_kernel.BLOCK_N, {}
    try:
        for block_n in (16, 32):
            attention_kernel.BLOCK_N = block_n
            with torch.no_grad():
                forward = device_time(attend, 2, 5)
            both = device_time(lambda: attend().float().sum().backward(), 2, 5)
            backward = max(both - forward, 1e-9)
            times[f"block_n{block_n}"] = {
                "forward_s": forward, "forward_backward_s": both,
                "forward_tflops": 2 * gemm_flops / forward / 1e12, "backward_tflops": 5 * gemm_flops / backward / 1e12}
    finally:
        attention_kernel.BLOCK_N = chosen
    return times


def indexer_scores_times(opts, device) -> dict[str, float]:
    """Seconds of one CSA layer's indexer scoring (forward; + backward as while the indexer trains) by the
    Triton kernel and by the torch formula it replaces, on the benchmark's shapes: whether the kernel earns
    its place apart from the attention kernel (``attention_kernel = "torch"`` turns both off)."""
    args = bench_args(0)
    b, s, h, d = opts.batch, opts.seq, args.index_n_heads, args.index_head_dim
    q = torch.randn(b, s, h, d, device=device, dtype=torch.bfloat16, requires_grad=True)
    keys = torch.randn(b, s // 4, d, device=device, dtype=torch.bfloat16, requires_grad=True)
    weights = torch.randn(b, s, h, device=device, requires_grad=True)
    scale = d**-0.5
    times = {}
    for name, fn in (("kernel", indexer_kernel.index_scores), ("torch", attention.index_scores)):
        with torch.no_grad():
            times[f"{name}_forward"] = device_time(lambda: fn(q, keys, weights, scale), 2, 5)
        times[f"{name}_forward_backward"] = device_time(lambda: fn(q, keys, weights, scale).sum().backward(), 2, 5)
    return times


def compiled_kernels() -> dict[str, list[dict]]:
    """Each variant Triton compiled for this run's launches of the project's kernels: its compile-time
    constants and what ptxas gave it (``compile_kernels.usage``: registers, spills, shared memory, pipelined
    loads, device-wide fences). ``scripts/compile_kernels.py`` predicts these without a GPU; this checks it.
    Interpreted kernels (``--smoke``) compile nothing."""
    from compile_kernels import KERNELS, usage

    found = {}
    for module, name in KERNELS:
        kernel, variants = getattr(module, name), []
        for caches in getattr(kernel, "device_caches", {}).values():
            for compiled in caches[0].values():  # the launcher's compiled kernels, by specialisation
                constants = {kernel.arg_names[path[0]]: value for path, value in compiled.src.constants.items()}
                variants.append({"constants": constants, **usage(compiled)})
        found[f"{module.__name__.rsplit('.', 1)[-1]}.{name}"] = variants
    return found


def check_fast_paths_on_gpu(device, seq: int) -> dict:
    """The fast paths equal the exact ones on this GPU (tiny model, fp32 for attention/mHC, bf16 experts);
    the fused attention kernel against the torch path on ``seq`` tokens of the benchmark model."""
    args = FLAVORS["debugmodel"]
    with torch.device(device):
        model = DeepseekV4Model(args)
    fast_init(model, model.args)
    model.train()
    ids = torch.randint(2, args.vocab_size, (2, 300), device=device)
    targets = build_targets(ids.roll(-1, 1), torch.arange(300, device=device).expand(2, 300), 1)
    model.set_mtp_loss_scale(0.3)
    results = []
    for exact in (True, False):
        for m in model.attention_modules():
            m.query_block, m.gather_entries = (None, False) if exact else ("auto", True)
        exact_paths(exact)
        model.zero_grad()
        objective, stats = model(ids, targets=targets)  # the training step's fused head + cross-entropy
        objective.backward()
        results.append(([objective.detach(), stats], {k: p.grad.clone() for k, p in model.named_parameters()
                                                      if p.grad is not None}))
        if exact:
            exact_paths(False)
    (a_out, a_grad), (b_out, b_grad) = results
    out_err = max(((x - y).norm() / x.norm()).item() for x, y in zip(a_out, b_out))
    grad_err = max((((a_grad[k] - b_grad[k]).norm() / a_grad[k].norm().clamp(min=1e-30)).item(), k)
                   for k in a_grad)
    experts = RoutedExperts(8, 256, 128, 10.0).to(device=device, dtype=torch.bfloat16)
    for w in experts.parameters():
        torch.nn.init.normal_(w, 0, 0.05)
    xs = torch.randn(1000, 256, device=device, dtype=torch.bfloat16)
    ws = torch.rand(1000, 1, device=device)
    counts = torch.tensor([0, 300, 100, 0, 250, 150, 200, 0], device=device)
    RoutedExperts.use_grouped_mm = False
    loop = experts(xs, ws, counts)
    RoutedExperts.use_grouped_mm = True
    grouped = experts(xs, ws, counts)
    RoutedExperts.use_grouped_mm = None
    gmm_err = ((loop - grouped).norm() / loop.norm()).item()
    rows, features = (64, 128) if SMOKE else (4096, 2048)
    a = torch.randn(rows, features, device=device, dtype=torch.bfloat16)
    w = torch.randn(4 * features, features, device=device)
    ref = a.double() @ w.double().t()
    split = fp32_linear.fp32_linear(a, w)
    exact_paths(True)
    plain = fp32_linear.fp32_linear(a, w)
    exact_paths(False)
    from titan_dsv4.models.deepseek_v4.qat import EXPERT_QAT
    qat_equal = {fmt: torch.equal(rounding(experts.w2.detach()).cpu(), rounding(experts.w2.detach().cpu()))
                 for fmt, rounding in EXPERT_QAT.items()}  # compiled on CUDA vs the CPU's eager ops, bit for bit
    return dict(model_out_rel_err=out_err, model_grad_rel_err=grad_err, grouped_mm_rel_err=gmm_err,
                qat_rounding_equal=qat_equal,
                fp32_linear_max_err=(split - ref).abs().max().item(),
                fp32_gemm_max_err=(plain - ref).abs().max().item(),
                fused_attention_rel_err=fused_attention_error(device, seq) if attention_kernel.available(device)
                else None)


GOAL = {"mfu": 0.40, "mtp_overhead_over_flop_share": 1.1, "component_time_over_flop_share": 2.0}  # issue 9


def goal_figures(summary: dict) -> dict:
    """Issue 9's goal figures from the parts measured so far (those missing are left out): MFU of the fast
    step with MTP D=1, eager and compiled; MTP's step-time overhead over its share of the FLOPs; each
    component's share of the profiled step's kernel time over its share of the FLOPs. ``GOAL`` holds the
    bounds: MFU at least, the ratios at most."""
    goal: dict = {}
    for name in ("fast_mtp1", "compiled_mtp1"):
        if "mfu" in summary.get(name, {}):
            goal[f"mfu_{name}"] = summary[name]["mfu"]
    mtp0, mtp1 = summary.get("fast_mtp0", {}), summary.get("fast_mtp1", {})
    if "step_s" in mtp0 and "step_s" in mtp1:
        extra_flops = mtp1["flops_per_token"] / mtp0["flops_per_token"] - 1
        goal["mtp_overhead_over_flop_share"] = (mtp1["step_s"] / mtp0["step_s"] - 1) / extra_flops
    profile, flops = summary.get("profile", {}), summary.get("component_flops_per_token", {})
    if "by_component" in profile and "total" in flops and profile["attributed_s"] > 0:
        goal["component_time_over_flop_share"] = {
            name: sum(profile["by_component"].get(name, {}).values()) / profile["attributed_s"]
            / (share / flops["total"]) for name, share in flops.items() if name != "total" and share > 0}
    return goal


def goal_table(goal: dict) -> str:
    """``goal_figures`` as a few lines, each against its bound."""
    lines = [f"{name:36s} {value:6.1%}  (goal >= {GOAL['mfu']:.0%})"
             for name, value in goal.items() if name.startswith("mfu_")]
    if "mtp_overhead_over_flop_share" in goal:
        lines.append(f"{'MTP D=1 overhead / its FLOP share':36s} {goal['mtp_overhead_over_flop_share']:6.2f}  "
                     f"(goal <= {GOAL['mtp_overhead_over_flop_share']})")
    for name, ratio in goal.get("component_time_over_flop_share", {}).items():
        lines.append(f"{name + ' time share / FLOP share':36s} {ratio:6.2f}  "
                     f"(goal <= {GOAL['component_time_over_flop_share']})")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", default="bench_gpu_out")
    parser.add_argument("--compile-blocks", action="store_true", help="also time [compile] per block")
    parser.add_argument("--checkpointing", action="store_true",
                        help="also time full and op-level activation checkpointing (step time, peak memory)")
    parser.add_argument("--deadline", type=float, default=None,
                        help="seconds after which no further part starts (skipped parts are marked so): the "
                             "goal's figures come first, so a lent GPU's minutes are spent on them")
    parser.add_argument("--smoke", action="store_true",
                        help="the debug model: every part in seconds, on CPU without a GPU (checks the script; "
                             "its figures mean nothing)")
    opts = parser.parse_args()
    global SMOKE
    SMOKE = opts.smoke
    if not (SMOKE or torch.cuda.is_available()):
        parser.error("no CUDA GPU: the benchmark needs one (--smoke checks the script on CPU)")
    os.makedirs(opts.out, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    began = time.perf_counter()
    summary: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                     "torch": torch.__version__, "seq": opts.seq, "batch": opts.batch,
                     "triton": attention_kernel.triton and attention_kernel.triton.__version__,
                     "model": "debugmodel" if SMOKE else BENCH_ARGS}
    peak = device_peak_tflops(device) or 989.0

    def part(name, fn, always: bool = False):
        t0 = time.perf_counter()
        if not always and opts.deadline is not None and t0 - began > opts.deadline:
            summary[name] = {"skipped": f"--deadline {opts.deadline:g} s passed"}
        else:
            try:
                summary[name] = fn()
            except Exception as exc:  # report and go on: one failing part must not cost the others
                summary[name] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-3000:]}
        summary.setdefault("part_seconds", {})[name] = round(time.perf_counter() - t0, 1)
        summary["goal"] = goal_figures(summary)
        print(name, json.dumps(summary[name], default=str)[:2000], flush=True)
        with open(os.path.join(opts.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1, default=str)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    part("gpu_equality", lambda: check_fast_paths_on_gpu(device, min(opts.seq, 1024)))
    torch._dynamo.reset()  # the benchmark's shapes compile afresh (static), not as dynamic-shape kernels
    part("matmul_peak_tflops", lambda: matmul_tflops(device))
    summary["datasheet_peak_tflops"] = peak
    part("fast_mtp0", lambda: measure_step(0, opts, device, peak))
    part("fast_mtp1", lambda: measure_step(1, opts, device, peak))
    # the goal's figures first (a run stopped at its time limit keeps the parts written so far), then the rest
    if opts.compile_blocks:  # whole blocks compiled (no graph breaks on these paths): the step users run
        part("compiled_mtp1", lambda: measure_step(1, opts, device, peak, compile_blocks=True))
    part("component_flops_per_token", lambda: component_flops(bench_args(1), opts.seq))
    part("profile", lambda: profile_step(opts, device, os.path.join(opts.out, "top_kernels.txt")))
    if attention_kernel.available(device):
        part("attention_kernel_tiles", lambda: attention_kernel_tiles(opts, device))
    part("component_s", lambda: component_times(opts, device))
    part("qat_fp4_mtp1", lambda: measure_step(1, opts, device, peak, expert_qat="fp4"))  # its cost vs fast_mtp1
    # LoRA with FP4-stored experts and FP4 QAT: dequantising and merging each layer's experts vs fast_mtp1's
    # weight gradients (MFU counts the full model's training FLOPs, as for the others)
    part("lora_fp4_mtp1", lambda: measure_step(1, opts, device, peak, expert_qat="fp4", lora=True))

    def exact(mtp):
        exact_paths(True)
        try:
            return measure_step(mtp, opts, device, peak)
        finally:
            exact_paths(False)
    if opts.checkpointing:  # what recompute costs in time and saves in memory against fast_mtp1
        part("ac_full_mtp1", lambda: measure_step(1, opts, device, peak, checkpointing=("full", "2")))
        part("ac_op_mtp1", lambda: measure_step(1, opts, device, peak, checkpointing=("selective", "op")))
    part("unfused_attention_mtp1", lambda: measure_step(1, opts, device, peak, fused_attention=False))
    part("exact_mtp1", lambda: exact(1))
    if attention_kernel.available(device):
        part("indexer_scores_s", lambda: indexer_scores_times(opts, device))
        part("compiled_kernels", compiled_kernels, always=True)  # what this run's launches compiled: no GPU time
    summary["total_s"] = round(time.perf_counter() - began, 1)
    with open(os.path.join(opts.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1, default=str)
    print("done", summary["total_s"], flush=True)
    print(goal_table(summary["goal"]), flush=True)


if __name__ == "__main__":
    main()
