"""Forward+backward tokens/s of our DeepSeek-V4 vs Hugging Face transformers' DeepseekV4ForCausalLM.

Same weights, same process, same thread count, same batch; MTP off (transformers has none), fp32 on CPU.

    python scripts/bench_model.py [--seq 512] [--batch 2] [--iters 5] [--threads 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from hf_reference import random_model, transformers_twin  # noqa: E402

from titan_dsv4.models.deepseek_v4 import FLAVORS  # noqa: E402


def tokens_per_second(step, tokens: int, iters: int) -> float:
    step()  # warm-up
    start = time.perf_counter()
    for _ in range(iters):
        step()
    return tokens * iters / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved measurements; medians reported")
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)

    args = FLAVORS["debugmodel"].with_mtp_layers(0)
    ours = random_model(args).train()
    theirs = transformers_twin(ours).train()
    ids = torch.randint(0, args.vocab_size, (opts.batch, opts.seq))

    def ours_step():
        ours.zero_grad(set_to_none=True)
        ours(ids).float().logsumexp(-1).mean().backward()

    def theirs_step():
        theirs.zero_grad(set_to_none=True)
        theirs(input_ids=ids).logits.float().logsumexp(-1).mean().backward()

    tokens = opts.batch * opts.seq
    theirs_runs, ours_runs = [], []
    for _ in range(opts.rounds):  # interleaved, so machine noise hits both alike
        theirs_runs.append(tokens_per_second(theirs_step, tokens, opts.iters))
        ours_runs.append(tokens_per_second(ours_step, tokens, opts.iters))
    t_theirs, t_ours = statistics.median(theirs_runs), statistics.median(ours_runs)
    print(f"debugmodel fwd+bwd, batch {opts.batch} x seq {opts.seq}, {opts.threads} threads, fp32 CPU, "
          f"median of {opts.rounds} interleaved rounds of {opts.iters} steps")
    print(f"  transformers {t_theirs:10,.0f} tokens/s")
    print(f"  titan_dsv4   {t_ours:10,.0f} tokens/s")
    print(f"  speed-up     {t_ours / t_theirs:10.2f}x")


if __name__ == "__main__":
    main()
