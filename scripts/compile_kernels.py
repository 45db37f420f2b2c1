"""Compile the Triton kernels (fused attention, indexer scores, Sinkhorn) for an H100/H200 (sm_90) without a
GPU and report what ptxas gave each: registers per thread, spill stack, shared memory. Triton's wheel carries
the compiler and ``cuobjdump``.

A kernel the interpreter runs may still not compile for the GPU, or spill its 512-d tiles out of
registers: this shows both before any GPU time is spent.

    python scripts/compile_kernels.py [--heads 64] [--head-dim 512] [--window 128] [--entries 512]
                                      [--index-heads 64] [--index-head-dim 128] [--hc-mult 4] [--json]

Run it without ``TRITON_INTERPRET`` (interpreted kernels do not compile).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from titan_dsv4.models.deepseek_v4 import attention_kernel, indexer_kernel, sinkhorn_kernel  # noqa: E402

H100_SHARED_BYTES = 227 * 1024  # the most shared memory one block may use on sm_90
POINTER_TYPES = {
    "idx_ptr": "*i32", "doc_ptr": "*i32", "sink_ptr": "*fp32", "out_ptr": "*fp32", "lse_ptr": "*fp32",
    "mass_ptr": "*fp32", "delta_ptr": "*fp32",
    "dkv_ptr": "*fp32", "dent_ptr": "*fp32", "w_ptr": "*fp32",
}  # the attention and indexer kernels' other tensors are bf16; the Sinkhorn kernels' all fp32
FLOAT_ARGS = {"scale", "eps"}


def _variants(heads: int, head_dim: int, window: int, entries: int, hc_mult: int, index_heads: int,
              index_head_dim: int):
    """``(label, kernel, constexprs, num_warps, pointer type)`` of each kernel as launched for these shapes."""
    attention = attention_kernel.launch_config(heads, head_dim, window, entries)
    warps = attention.pop("num_warps")
    attention["UPCAST"] = False
    index = dict(indexer_kernel.launch_config(index_heads, index_head_dim), UPCAST=False)
    index_warps = index.pop("num_warps")
    mhc = dict(N=hc_mult, BLOCK=sinkhorn_kernel.BLOCK)
    return (("attention forward", attention_kernel._forward_kernel, dict(attention, MASS=False), warps, "*bf16"),
            ("attention forward, indexer trained", attention_kernel._forward_kernel, dict(attention, MASS=True),
             warps, "*bf16"),
            ("attention backward", attention_kernel._backward_kernel, attention, warps, "*bf16"),
            ("indexer scores", indexer_kernel._scores_kernel, index, index_warps, "*bf16"),
            ("sinkhorn forward", sinkhorn_kernel._forward_kernel, mhc, sinkhorn_kernel.NUM_WARPS, "*fp32"),
            ("sinkhorn backward", sinkhorn_kernel._backward_kernel, mhc, sinkhorn_kernel.NUM_WARPS, "*fp32"))


def signature(kernel, constexprs: dict, pointer: str) -> dict[str, str]:
    """Triton's type of each argument of ``kernel`` as compiled here (``tests/test_attention_kernel.py``
    checks the model launches the kernels with these pointer types)."""
    out = {}
    for name in kernel.arg_names:
        if name in constexprs:
            out[name] = "constexpr"
        elif name.endswith("_ptr"):
            out[name] = POINTER_TYPES.get(name, pointer)
        else:
            out[name] = "fp32" if name in FLOAT_ARGS else "i32"
    return out


def compile_for_sm90(heads: int, head_dim: int, window: int, entries: int, hc_mult: int = 4,
                     index_heads: int = 64, index_head_dim: int = 128) -> dict[str, dict[str, int]]:
    """``{kernel: {"registers", "spill_bytes", "shared_bytes"}}`` of the kernels as launched for these shapes."""
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    report = {}
    for label, kernel, config, num_warps, pointer in _variants(heads, head_dim, window, entries, hc_mult,
                                                               index_heads, index_head_dim):
        source = ASTSource(fn=kernel, signature=signature(kernel, config, pointer), constexprs=config)
        compiled = triton.compile(source,
                                  target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
        with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
            cubin.write(compiled.asm["cubin"])
            cubin.flush()
            usage = subprocess.run([cuobjdump, "-res-usage", cubin.name], capture_output=True, text=True,
                                   check=True).stdout
        fields = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", usage))
        report[label] = {
            "registers": int(fields["REG"]), "spill_bytes": int(fields["STACK"]) + int(fields["LOCAL"]),
            "shared_bytes": compiled.metadata.shared,
        }
    return report


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
    for name, usage in report.items():
        fits = "fits" if usage["shared_bytes"] <= H100_SHARED_BYTES else "EXCEEDS sm_90 shared memory"
        print(f"{name:35s} registers/thread {usage['registers']:3d}  spill {usage['spill_bytes']:5d} B  "
              f"shared {usage['shared_bytes'] / 1024:6.1f} KiB ({fits})")


if __name__ == "__main__":
    main()
