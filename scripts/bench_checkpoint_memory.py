"""Peak memory of HF <-> DCP conversion on a synthetic multi-GB DeepSeek-V4-shaped checkpoint.

    python scripts/bench_checkpoint_memory.py [--experts 64] [--layers 6] [--shard-mb 256] [--dir /tmp/x]

Writes a bf16 checkpoint in the released layout (streamed: random tensors generated one at a time), then
runs each conversion in a fresh process and reports its peak anonymous memory (what it allocated) and peak
RSS (also counting mapped file pages) next to the checkpoint and shard sizes and a process that merely
imports torch and titan_dsv4.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from titan_dsv4.components.hf_checkpoint import _full_shapes, save_hf
from titan_dsv4.models.deepseek_v4 import FLAVORS



class RandomTensors:
    """``items()`` generates each tensor when asked (the writer holds at most one shard)."""

    def __init__(self, shapes):
        self.shapes = shapes

    def items(self):
        g = torch.Generator().manual_seed(0)
        for name, meta in self.shapes.items():
            if meta.is_floating_point():
                yield name, torch.randn(meta.shape, generator=g) * 0.02
            else:
                yield name, torch.randint(0, 8, meta.shape, generator=g)


def peak_mb(code: str) -> tuple[int, int, float]:
    """Run ``code`` in a fresh process; (peak anonymous RSS MiB, peak total RSS MiB, seconds). Anonymous
    memory is what the process allocated; total RSS also counts file pages it has mapped (page cache of the
    checkpoint and of the torch libraries), which the kernel can drop."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code])
    anon = total = 0
    while proc.poll() is None:
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
        except FileNotFoundError:
            break
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        anon = max(anon, int(fields.get("RssAnon", "0 kB").split()[0]) // 1024)
        total = max(total, int(fields.get("VmRSS", "0 kB").split()[0]) // 1024)
        time.sleep(0.02)
    if proc.wait():
        raise RuntimeError(f"conversion failed: {code}")
    return anon, total, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--shard-mb", type=int, default=256)
    parser.add_argument("--dir", default=None)
    opts = parser.parse_args()
    base = FLAVORS["debugmodel"]
    args = dataclasses.replace(
        base.with_mtp_layers(0), vocab_size=32000, hidden_size=1024, num_hidden_layers=opts.layers,
        num_attention_heads=8, head_dim=128, qk_rope_head_dim=64, q_lora_rank=512, o_lora_rank=256, o_groups=4,
        n_routed_experts=opts.experts, num_experts_per_tok=4, moe_intermediate_size=1024, index_head_dim=128,
        compress_ratios=([0, 4, 16] * opts.layers)[: opts.layers], num_nextn_predict_layers=1)
    root = Path(opts.dir or tempfile.mkdtemp())
    hf, dcp, back = root / "hf", root / "dcp", root / "hf2"
    for p in (hf, dcp, back):
        shutil.rmtree(p, ignore_errors=True)
    save_hf(RandomTensors(_full_shapes(args)), args, hf, max_shard_bytes=opts.shard_mb * 2**20)
    total = sum(f.stat().st_size for f in hf.glob("*.safetensors")) / 2**20
    shard = max(f.stat().st_size for f in hf.glob("*.safetensors")) / 2**20
    runs = {
        "import only": "import time, torch, titan_dsv4.convert; time.sleep(1)",
        "hf-to-dcp": f"from titan_dsv4.convert import hf_to_dcp; hf_to_dcp({str(hf)!r}, {str(dcp)!r})",
        "dcp-to-hf": f"from titan_dsv4.convert import dcp_to_hf; dcp_to_hf({str(dcp)!r}, {str(back)!r}, "
                     f"max_shard_bytes={opts.shard_mb * 2**20})",
    }
    print(f"synthetic checkpoint: {args.num_params() / 1e9:.2f}B parameters, {total:,.0f} MiB bf16 in shards "
          f"of <= {shard:,.0f} MiB")
    print(f"{'run':12s} {'peak anon MiB':>14s} {'peak RSS MiB':>13s} {'seconds':>8s}")
    for name, code in runs.items():
        anon, rss, seconds = peak_mb(code)
        print(f"{name:12s} {anon:14,} {rss:13,} {seconds:8.0f}")
    if not opts.dir:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
