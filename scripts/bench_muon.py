"""What Muon's optimizer step costs against AdamW's, on one device, for a DeepSeek-V4-shaped model.

    python scripts/bench_muon.py [--flavor debugmodel] [--hidden-size H] [--layers L] [--experts E]
                                 [--repeats 5] [--device cpu|cuda]

Measured in one run, with random gradients on every trainable parameter (the indexer frozen, as in
fine-tuning): the AdamW step (foreach), the Muon step (the matrices' Newton-Schulz batched by shape), and
the orthogonalizations alone done one weight at a time (the baseline the batching replaced; a stacked
experts tensor is one batch either way), with the Newton-Schulz FLOPs (``newton_schulz_flops``) and the
rate they run at.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from titan_dsv4.components.muon import matrix_shape, newton_schulz_flops, orthogonalized
from titan_dsv4.components.optimizer import build_optimizer
from titan_dsv4.config.job_config import Optimizer as OptimizerConfig
from titan_dsv4.models.deepseek_v4 import FLAVORS, DeepseekV4Model


def median_seconds(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flavor", default="debugmodel")
    parser.add_argument("--hidden-size", type=int, default=None, help="also the experts' width")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--experts", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    opts = parser.parse_args()
    device = torch.device(opts.device)
    changes = dict(hidden_size=opts.hidden_size, moe_intermediate_size=opts.hidden_size,
                   num_hidden_layers=opts.layers, n_routed_experts=opts.experts)
    args = dataclasses.replace(FLAVORS[opts.flavor], **{k: v for k, v in changes.items() if v is not None})
    torch.manual_seed(0)
    with torch.device(device):
        model = DeepseekV4Model(args)
    for p in model.indexer_parameters():
        p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        with torch.no_grad():
            p.normal_(0.0, 0.02)  # not left uninitialised: garbage values could time differently
        p.grad = torch.randn_like(p)
    trained = [(p, n) for p, n in model.matrix_parameters() if p.requires_grad]
    flops = sum(n * newton_schulz_flops(*matrix_shape(p, n)) for p, n in trained)

    seconds = {}
    for name in ("AdamW", "Muon"):
        optimizer = build_optimizer(params, OptimizerConfig(name=name, lr=1e-4), {id(p): n for p, n in trained})
        seconds[name] = median_seconds(optimizer.step, opts.repeats, device)
    updates = [(p, n, p.grad) for p, n in trained]
    seconds["batched"] = median_seconds(lambda: orthogonalized(updates), opts.repeats, device)
    seconds["one at a time"] = median_seconds(lambda: [orthogonalized([u]) for u in updates], opts.repeats, device)

    print(f"{opts.flavor} with hidden {args.hidden_size}, {args.num_hidden_layers} layers, {args.n_routed_experts} "
          f"experts on {device}: {sum(p.numel() for p in params) / 1e6:.1f}M trained parameters, "
          f"{len(updates)} Muon weights ({sum(n for _, n, _ in updates)} matrices), "
          f"{flops / 1e9:.1f} GFLOP of Newton-Schulz per step")
    print(f"optimizer step: AdamW {seconds['AdamW'] * 1e3:.1f} ms, Muon {seconds['Muon'] * 1e3:.1f} ms "
          f"({seconds['Muon'] / seconds['AdamW']:.1f}x)")
    print(f"orthogonalizations: batched by shape {seconds['batched'] * 1e3:.1f} ms "
          f"({flops / seconds['batched'] / 1e12:.2f} TFLOP/s), one weight at a time "
          f"{seconds['one at a time'] * 1e3:.1f} ms ({seconds['one at a time'] / seconds['batched']:.1f}x slower)")


if __name__ == "__main__":
    main()
