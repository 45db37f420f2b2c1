"""Compile the Triton kernels (fused attention, indexer scores, Sinkhorn) for an H100/H200 (sm_90) without a
GPU, as the model's launches would compile them, and report what ptxas gave each: registers per thread,
spill stack, shared memory, asynchronous copies (pipelined loads) and device-wide memory fences. Triton's
wheel carries the compiler and ``cuobjdump``.

A kernel the interpreter runs may still not compile for the GPU, spill its 512-d tiles out of registers,
wait for every tile's loads, or fence memory at each atomic add: this shows it before any GPU time is
spent.

    python scripts/compile_kernels.py [--heads 64] [--head-dim 512] [--window 128] [--entries 512]
                                      [--index-heads 64] [--index-head-dim 128] [--hc-mult 4] [--json]

Run it without ``TRITON_INTERPRET`` (interpreted kernels do not compile).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from titan_dsv4.models.deepseek_v4 import attention_kernel, indexer_kernel, sinkhorn_kernel  # noqa: E402
from titan_dsv4.models.deepseek_v4.args import CSA_RATIO, DeepseekV4ModelArgs  # noqa: E402

H100_SHARED_BYTES = 227 * 1024  # the most shared memory one block may use on sm_90
SEQ = 256  # tokens of the recorded launches: a multiple of 16 specialises as a 4k-token run's launch does
TRITON_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32",
                torch.int64: "i64"}
KERNELS = ((attention_kernel, "_forward_kernel"), (attention_kernel, "_backward_kernel"),
           (indexer_kernel, "_scores_kernel"), (sinkhorn_kernel, "_forward_kernel"),
           (sinkhorn_kernel, "_backward_kernel"))  # (module, name): every Triton kernel of the model


class _Recorder:
    """Stands in for a Triton kernel: keeps each launch's arguments instead of running it."""

    def __init__(self) -> None:
        self.launches: list[tuple[tuple, dict]] = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((args, kwargs))


def recorded_launches(heads: int, head_dim: int, window: int, entries: int, hc_mult: int, index_heads: int,
                      index_head_dim: int) -> list[tuple[str, object, tuple, dict]]:
    """``[(label, kernel, args, kwargs)]``: each kernel's launch as the model's kernel ops make it for a bf16
    model at these shapes (CPU tensors stand in for CUDA ones: the same dtypes, strides and 16-byte
    alignment), forward and backward, with and without the indexer's second pass."""
    released, bf16 = DeepseekV4ModelArgs(), torch.bfloat16
    q, kv = torch.zeros(1, SEQ, heads, head_dim, dtype=bf16), torch.zeros(1, SEQ, head_dim, dtype=bf16)
    compressed = torch.zeros(1, SEQ // CSA_RATIO, head_dim, dtype=bf16)
    index, doc_ids = torch.zeros(1, SEQ, entries, dtype=torch.int32), torch.zeros(1, SEQ, dtype=torch.int32)
    per_head = torch.zeros(1, SEQ, heads)  # sinks' log-sum-exp, delta
    index_q = torch.zeros(1, SEQ, index_heads, index_head_dim, dtype=bf16)
    index_keys = torch.zeros(1, SEQ // CSA_RATIO, index_head_dim, dtype=bf16)
    comb = torch.zeros(1, SEQ, hc_mult, hc_mult)
    calls = (
        ("attention forward", attention_kernel, "_forward_kernel",
         lambda: attention_kernel._fused_attention(q, kv, compressed, index, doc_ids, per_head[0, 0], window, False)),
        ("attention forward, indexer trained", attention_kernel, "_forward_kernel",
         lambda: attention_kernel._fused_attention(q, kv, compressed, index, doc_ids, per_head[0, 0], window, True)),
        ("attention backward", attention_kernel, "_backward_kernel",
         lambda: attention_kernel._fused_attention_backward(q, q, kv, compressed, index, doc_ids, per_head,
                                                            per_head, window)),
        ("indexer scores", indexer_kernel, "_scores_kernel",
         lambda: indexer_kernel._index_scores(index_q, index_keys, torch.zeros(1, SEQ, index_heads), 1.0)),
        ("sinkhorn forward", sinkhorn_kernel, "_forward_kernel",
         lambda: sinkhorn_kernel._sinkhorn(comb, released.hc_sinkhorn_iters, released.hc_eps)),
        ("sinkhorn backward", sinkhorn_kernel, "_backward_kernel",
         lambda: sinkhorn_kernel._sinkhorn_backward(comb, comb, released.hc_sinkhorn_iters, released.hc_eps)),
    )
    launches = []
    for label, module, name, call in calls:
        kernel, recorder = getattr(module, name), _Recorder()
        setattr(module, name, recorder)
        try:
            call()
        finally:
            setattr(module, name, kernel)
        (launch_args, launch_kwargs), = recorder.launches
        launches.append((label, kernel, launch_args, launch_kwargs))
    return launches


def specialise(kernel, args: tuple, kwargs: dict) -> tuple[dict, dict, dict, dict]:
    """``(signature, constexprs, attrs, options)`` that Triton's launcher compiles for these arguments: an int
    of 1 becomes a constant, ints divisible by 16 and 16-byte aligned tensors are marked so
    (``tt.divisibility``), which decides vector widths and whether a loop's loads are pipelined. Compiled
    without these marks, a kernel is another kernel: narrower loads, other register counts, and no loop's
    loads pipelined (not even a plain matmul's)."""
    bound = {**dict(zip(kernel.arg_names, args)), **{k: v for k, v in kwargs.items() if k in kernel.arg_names}}
    options = {k: v for k, v in kwargs.items() if k not in kernel.arg_names}
    # read from the function: an interpreted kernel (the tests' launches) carries no parameter kinds
    declared = {name for name, p in inspect.signature(kernel.fn).parameters.items() if "constexpr" in str(p.annotation)}
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(kernel.arg_names):
        value = bound[name]
        if name in declared or (isinstance(value, int) and not isinstance(value, bool) and value == 1):
            signature[name], constexprs[name] = "constexpr", value
            continue
        if isinstance(value, torch.Tensor):
            signature[name], divisible = "*" + TRITON_TYPES[value.dtype], value.data_ptr() % 16 == 0
        elif isinstance(value, bool):
            signature[name], divisible = "i1", False
        elif isinstance(value, int):
            signature[name], divisible = ("i32" if -2**31 <= value < 2**31 else "i64"), value % 16 == 0
        else:
            signature[name], divisible = "fp32", False
        if divisible:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs, options


def usage(compiled) -> dict[str, int]:
    """What ptxas gave a compiled kernel (``triton.compile``'s here, or one from the launcher's cache on a GPU:
    ``bench_gpu.py`` reports those): ``registers`` per thread, ``spill_bytes``, ``shared_bytes``,
    ``async_copies`` (``cp.async`` instructions: a pipelined loop's prefetched loads) and ``device_fences``
    (GPU-wide ``MEMBAR`` instructions, which an atomic add in Triton's default ``acq_rel`` order puts before
    itself, with an L1 invalidation after)."""
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        resources, sass = (subprocess.run([cuobjdump, flag, cubin.name], capture_output=True, text=True,
                                          check=True).stdout for flag in ("-res-usage", "-sass"))
    fields = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", resources))
    return {"registers": int(fields["REG"]), "spill_bytes": int(fields["STACK"]) + int(fields["LOCAL"]),
            "shared_bytes": compiled.metadata.shared, "async_copies": compiled.asm["ptx"].count("cp.async.cg"),
            "device_fences": len(re.findall(r"\bMEMBAR\.\S*GPU\b", sass))}


def compile_for_sm90(heads: int, head_dim: int, window: int, entries: int, hc_mult: int = 4,
                     index_heads: int = 64, index_head_dim: int = 128) -> dict[str, dict[str, int]]:
    """``{kernel: usage}`` of the kernels as launched for these shapes, compiled for sm_90."""
    return {label: usage(compile_launch(kernel, args, kwargs))
            for label, kernel, args, kwargs in recorded_launches(heads, head_dim, window, entries, hc_mult,
                                                                 index_heads, index_head_dim)}


def compile_launch(kernel, args: tuple, kwargs: dict):
    """The kernel Triton's launcher would compile for this launch on an sm_90 GPU (``specialise``)."""
    signature, constexprs, attrs, options = specialise(kernel, args, kwargs)
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", type=int, default=64)
    parser.add_argument("--head-dim", type=int, default=512)
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--entries", type=int, default=512)
    parser.add_argument("--index-heads", type=int, default=64)
    parser.add_argument("--index-head-dim", type=int, default=128)
    parser.add_argument("--hc-mult", type=int, default=4)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args()
    report = compile_for_sm90(args.heads, args.head_dim, args.window, args.entries, args.hc_mult,
                              args.index_heads, args.index_head_dim)
    if args.json:
        print(json.dumps(report))
        return
    for name, figures in report.items():
        fits = "fits" if figures["shared_bytes"] <= H100_SHARED_BYTES else "EXCEEDS sm_90 shared memory"
        print(f"{name:35s} registers/thread {figures['registers']:3d}  spill {figures['spill_bytes']:5d} B  "
              f"shared {figures['shared_bytes'] / 1024:6.1f} KiB ({fits})  "
              f"async copies {figures['async_copies']:2d}  device fences {figures['device_fences']}")


if __name__ == "__main__":
    main()
