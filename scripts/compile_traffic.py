"""Bytes and kernels of each compiled block, by inductor's own count, beside what the eager block moves and
the fusion bound (``estimate_gpu_time.py``'s models of the same block).

``estimate_gpu_time.py`` bounds what fusion could save; this counts what ``[compile]`` (``apply_compile``:
each block on its own) saves. Inductor compiles each kind of block of the GPU benchmark model
(``bench_gpu.py``'s shapes) for the CPU, through the GPU code paths, and sums per scheduled kernel the bytes
it reads and writes (``GraphLowering.count_bytes``, forward and backward graphs), and counts the kernels
it generates. CPU inductor is not CUDA inductor (its fusion and reduction choices differ), so this estimates
the GPU's figure without measuring it. Cheap to run, it shows which change moves fewer bytes before a GPU
is at hand. The Triton kernels and cuBLAS's bf16 GEMMs with fp32 output stay opaque ops, as on the GPU;
on CPU they return zeros or fp32 products, since only shapes count here, not values.

    python scripts/compile_traffic.py [--seq 4096] [--batch 2] [--blocks hash,sliding,csa,hca,mtp,mhc]

About half a minute per block at 2 x 4096 tokens on two cores (compiling and one real forward and backward).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable

import torch
from torch import nn
from torch._inductor import compile_fx, metrics

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_gpu  # noqa: E402  (the benchmark's model)
import estimate_gpu_time  # noqa: E402  (the eager and fusion-bound byte counts)

from titan_dsv4.models.deepseek_v4 import (attention, attention_kernel, fp32_linear, head_loss,  # noqa: E402
                                           indexer_kernel, sinkhorn_kernel)
from titan_dsv4.models.deepseek_v4.attention import Attention  # noqa: E402
from titan_dsv4.models.deepseek_v4.gpu_paths import meta_as_gpu  # noqa: E402
from titan_dsv4.models.deepseek_v4.hyper_connection import HyperConnection  # noqa: E402
from titan_dsv4.models.deepseek_v4.model import DeepseekV4Model  # noqa: E402
from titan_dsv4.models.deepseek_v4.moe import RoutedExperts  # noqa: E402
from titan_dsv4.models.deepseek_v4.parallelize import apply_compile, cast_to_compute_dtypes  # noqa: E402

KINDS = ("hash", "sliding", "csa", "hca", "mtp", "mhc")
RAN: set[str] = set()  # the opaque ops the compiled block called


@torch.library.custom_op("compile_traffic::bf16_mm", mutates_args=())
def _bf16_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """cuBLAS's bf16 x bf16 -> fp32 GEMM as one opaque op (CPU has no ``out_dtype``): bf16 operands read,
    an fp32 result written, as on the GPU."""
    RAN.add("bf16_mm")
    return a.float() @ b.float()


@_bf16_mm.register_fake
def _(a, b):
    return a.new_empty((*a.shape[:-1], b.shape[-1]), dtype=torch.float32)


def _zeros(name: str, *like: torch.Tensor | tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    """The outputs of the opaque op ``name``: zeros like a tensor, or fp32 zeros of a shape."""
    RAN.add(name)
    return tuple(torch.zeros_like(t) if isinstance(t, torch.Tensor) else torch.zeros(t, dtype=torch.float32)
                 for t in like)


def gpu_code_paths_on_cpu() -> None:
    """What the GPU runs, on CPU tensors: the GPU paths of attention and the fp32 GEMMs, grouped expert GEMMs,
    and the Triton kernels as opaque ops that return zeros (they do not run on CPU without the interpreter,
    which would take hours at these shapes)."""
    for module in (attention, fp32_linear):
        module.takes_gpu_path = lambda x: True
    for module in (fp32_linear, head_loss):
        module.bf16_mm = _bf16_mm
    fp32_linear.bf16_bmm = _bf16_mm
    RoutedExperts.use_grouped_mm = True
    attention_kernel._fused_attention.register_kernel("cpu")(
        lambda q, kv, entries, index, docs, sink, window, mass: _zeros(
            "fused_attention", q.shape, q.shape[:3], index.shape if mass else (0,)))
    attention_kernel._fused_attention_backward.register_kernel("cpu")(
        lambda grad, q, kv, entries, *_: _zeros("fused_attention_backward", q, kv, entries))
    indexer_kernel._index_scores.register_kernel("cpu")(
        lambda q, keys, weights, scale: _zeros("index_scores", (*q.shape[:2], keys.shape[1]))[0])
    sinkhorn_kernel._sinkhorn.register_kernel("cpu")(lambda logits, *_: _zeros("sinkhorn", logits)[0])
    sinkhorn_kernel._sinkhorn_backward.register_kernel("cpu")(
        lambda grad, logits, *_: _zeros("sinkhorn_backward", logits)[0])


def kind_of(args, layer: int) -> str:
    """``hash`` | ``sliding`` | ``csa`` | ``hca``: a decoder layer's routing, else its attention."""
    return "hash" if layer < args.num_hash_layers else args.layer_kind(layer)


def layer_id(args, kind: str) -> int:
    """The first decoder layer of ``kind`` in the benchmark model."""
    for i in range(args.num_hidden_layers):
        if kind_of(args, i) == kind:
            return i
    raise ValueError(f"the benchmark model has no {kind} layer")


def block_step(kind: str, args, device: torch.device, batch: int, seq: int
               ) -> tuple[nn.Module, Callable[[nn.Module], tuple[torch.Tensor, ...]]]:
    """``(module, run)``: one block of ``kind`` on ``device`` (the model's own, its weights cast as training
    casts them and randomly initialised), and ``run(module)`` its forward on a batch whose inputs need
    gradients (as a block's inside the model), returning the outputs to back-propagate from."""
    with torch.device("meta"):
        model = DeepseekV4Model(args)
    cast_to_compute_dtypes(model)
    if kind == "mhc":  # every site has the same shapes
        module = model.layers["0"].hc_attn
    else:
        module = model.mtp["0"] if kind == "mtp" else model.layers[str(layer_id(args, kind))]
    module.to_empty(device=device)
    if device.type != "meta":
        with torch.random.fork_rng():
            torch.manual_seed(0)
            bench_gpu.fast_init(module, args)
    module.train()
    positions = torch.arange(seq, device=device).expand(batch, seq)
    ids = torch.randint(2, args.vocab_size, (batch, seq), device=device)
    ctx = model.attention_context(positions)
    stream = torch.randn(batch, seq, args.hc_mult, args.hidden_size, device=device, dtype=torch.bfloat16,
                         requires_grad=True)
    if kind == "mhc":  # the site's pre and post steps around an identity sub-layer
        def site(m: nn.Module) -> tuple[torch.Tensor, ...]:
            collapsed, post, comb = m(stream)
            return (HyperConnection.post(collapsed, stream, post, comb),)
        return module, site
    if kind == "mtp":
        embedded = torch.randn(batch, seq, args.hidden_size, device=device, dtype=torch.bfloat16,
                               requires_grad=True)
        return module, lambda m: m(stream, embedded, ctx, ids)
    return module, lambda m: (m(stream, ctx, ids),)


def backward(outputs: tuple[torch.Tensor, ...]) -> None:
    """Back-propagates random output gradients (a constant one is a different graph: inductor could fold it)."""
    gen = torch.Generator(device=outputs[0].device).manual_seed(1) if outputs[0].device.type != "meta" else None
    grads = [torch.randn(o.shape, dtype=o.dtype, device=o.device, generator=gen) for o in outputs]
    torch.autograd.backward(outputs, grads)


def estimated(kind: str, args, batch: int, seq: int) -> tuple[float, int, float]:
    """(bytes, kernels) of the eager block, one kernel per aten op, and the bytes of its fusion bound, on
    the ``meta`` device through the GPU paths (``estimate_gpu_time.CostModel``)."""
    roofline = estimate_gpu_time.Roofline(1.0, 1.0, 1.0, 0.0)  # only bytes and kernels are read here
    module, run = block_step(kind, args, torch.device("meta"), batch, seq)
    costs = estimate_gpu_time.CostModel(roofline, estimate_gpu_time._Forward())
    with meta_as_gpu(), costs:
        backward(run(module))
    eager = costs.total()
    return eager.bytes, eager.kernels, sum(costs.fusion_bound()[1].values())


def compiled(kind: str, args, batch: int, seq: int) -> tuple[float, int]:
    """(bytes, kernels) of the block compiled by inductor as ``[compile]`` compiles it (CPU code)."""
    module, run = block_step(kind, args, torch.device("cpu"), batch, seq)
    for m in module.modules():  # the GPU's choice ("auto" picks the kernels on CUDA only)
        if isinstance(m, Attention):
            m.kernel = "triton"
        if isinstance(m, HyperConnection):
            m.sinkhorn_kernel = "triton"
    holder = nn.Module()
    holder.layers = nn.ModuleDict({"0": module})
    apply_compile(holder)
    torch._dynamo.reset()
    metrics.reset()
    RAN.clear()
    backward(run(holder.layers["0"]))
    gpu_ops = {"bf16_mm", "sinkhorn", "sinkhorn_backward"}
    if kind != "mhc":
        gpu_ops |= {"fused_attention", "fused_attention_backward"}
    if missing := gpu_ops - RAN:
        raise RuntimeError(f"the compiled {kind} block did not call {sorted(missing)}: it took other paths than "
                           "the GPU's, and its count would not be the GPU's")
    return metrics.num_bytes_accessed, metrics.generated_kernel_count


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--blocks", default=",".join(KINDS), help=f"comma-separated, of {', '.join(KINDS)}")
    parser.add_argument("--bandwidth-tbs", type=float, default=4.0, help="attainable HBM bandwidth, as "
                        "estimate_gpu_time.py's")
    opts = parser.parse_args(argv)
    kinds = opts.blocks.split(",")
    if unknown := [k for k in kinds if k not in KINDS]:
        parser.error(f"--blocks: unknown {unknown}; allowed: {', '.join(KINDS)}")
    torch._inductor.config.fx_graph_cache = False  # a cached graph is not counted again
    torch._functorch.config.enable_autograd_cache = False
    torch._logging.set_logs(inductor_metrics=True)  # inductor counts bytes only while this log is on ...
    compile_fx.inductor_metrics_log.info = lambda *args, **kwargs: None  # ... and it prints every node
    gpu_code_paths_on_cpu()
    args = bench_gpu.bench_args(1)
    print(f"{opts.batch} x {opts.seq} tokens, forward + backward, bench_gpu.py's model; GB by inductor's count "
          "(CPU code), one kernel per aten op (eager) and the fusion bound (estimate_gpu_time.py)")
    print(f"{'block':<9}{'eager GB':>10}{'kernels':>9}{'compiled GB':>13}{'kernels':>9}{'bound GB':>10}"
          f"{'compiled/bound':>16}{'s':>6}")
    measured: dict[str, tuple[float, float]] = {}  # kind: (compiled bytes, bound bytes)
    for kind in kinds:
        began = time.perf_counter()
        eager_bytes, eager_kernels, bound = estimated(kind, args, opts.batch, opts.seq)
        compiled_bytes, compiled_kernels = compiled(kind, args, opts.batch, opts.seq)
        measured[kind] = compiled_bytes, bound
        print(f"{kind:<9}{eager_bytes / 1e9:10.2f}{eager_kernels:9,}{compiled_bytes / 1e9:13.2f}"
              f"{compiled_kernels:9,}{bound / 1e9:10.2f}{compiled_bytes / bound:16.2f}"
              f"{time.perf_counter() - began:6.0f}", flush=True)
    blocks = [kind_of(args, i) for i in range(args.num_hidden_layers)] + ["mtp"] * args.num_mtp_layers
    if set(blocks) <= measured.keys():  # what the compiled step moves beyond the fusion bound
        compiled_total, bound_total = (sum(measured[kind][i] for kind in blocks) for i in (0, 1))
        extra = compiled_total - bound_total
        print(f"the model's {len(blocks)} blocks ({', '.join(blocks)}): {compiled_total / 1e9:.1f} GB compiled, "
              f"{bound_total / 1e9:.1f} GB at the bound ({compiled_total / bound_total:.2f}x): "
              f"{extra / 1e9:.1f} GB more, {extra / (opts.bandwidth_tbs * 1e12):.3f} s at {opts.bandwidth_tbs} TB/s")


if __name__ == "__main__":
    main()
