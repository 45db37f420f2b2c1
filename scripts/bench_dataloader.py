"""How long a training step waits for its data, with the batches read in step and read ahead.

    python scripts/bench_dataloader.py [--seq-len 4096] [--global-batch 32] [--steps 8] [--step-ms 1500]
        [--dataset-path CORPUS [--dataset chat] --tokenizer TOKENIZER.json]

Every data-parallel rank reads and tokenizes the whole global batch (so any layout sees the same data).
This measures, in one run, on the embedded corpus and tokenizer unless given others:

1. reading throughput (tokens/s of packed batches): documents tokenized one ``encode`` call at a time (how
   the loader read before) against ``encode_batch`` of up to ``TOKENIZE_AHEAD_CHARS`` of text (all cores, off the GIL),
   and against the same documents tokenized ahead (``python -m titan_dsv4.pretokenize``, into a temporary folder),
   in order and shuffled (``training.shuffle``);
2. the wait per step for its batch while the main thread runs a stand-in training step (``--step-ms`` of
   fp32 matmuls, which release the GIL as the real step's kernels do): reading in step (``prefetch = 0``)
   against the trainer's read-ahead thread (``prefetch = 1``).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from titan_dsv4.components.dataloader import FORMATS, build_dataloader, file_documents, pydocs_split
from titan_dsv4.components.pretokenized import write_pretokenized
from titan_dsv4.components.tokenizer import Tokenizer


class OneAtATime(Tokenizer):
    """The baseline: one document (or conversation) per ``encode`` call."""

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def encode_batch_with_starts(self, texts: list[str]) -> list[tuple[list[int], list[int]]]:
        return [(e.ids, [start for start, _ in e.offsets])
                for e in (self._tok.encode(t, add_special_tokens=False) for t in texts)]


def loader(args, tokenizer: Tokenizer, prefetch: int = 0, pretokenized: str | None = None,
           shuffle_seed: int | None = None):
    dataset, path = ("pretokenized", pretokenized) if pretokenized else (
        args.dataset if args.dataset_path else "pydocs", args.dataset_path)
    return build_dataloader(dataset, path, tokenizer, args.seq_len, args.global_batch, 0, 1, prefetch=prefetch,
                            shuffle_seed=shuffle_seed)


def reading_rate(args, tokenizer: Tokenizer, pretokenized: str | None = None,
                 shuffle_seed: int | None = None) -> float:
    data = loader(args, tokenizer, pretokenized=pretokenized, shuffle_seed=shuffle_seed)
    next(data)  # the corpus read (and cached) once
    start = time.perf_counter()
    for _ in range(args.steps):
        next(data)
    return args.steps * args.global_batch * args.seq_len / (time.perf_counter() - start)


def stand_in_step(milliseconds: float) -> None:
    a = torch.randn(512, 512)
    end = time.perf_counter() + milliseconds / 1000
    while time.perf_counter() < end:
        a = torch.tanh(a @ a)


def waits(args, tokenizer: Tokenizer, prefetch: int) -> float:
    """Mean seconds a step waits for its batch (after a first step that fills the read-ahead)."""
    data = loader(args, tokenizer, prefetch)
    next(data)
    stand_in_step(args.step_ms)
    waited = 0.0
    for _ in range(args.steps):
        start = time.perf_counter()
        next(data)
        waited += time.perf_counter() - start
        stand_in_step(args.step_ms)
    data.close()
    return waited / args.steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--global-batch", type=int, default=32, help="sequences per step (all ranks read them)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--step-ms", type=float, default=1500.0, help="the stand-in training step's length")
    parser.add_argument("--dataset-path", help="a .txt/.jsonl/.parquet corpus (default: the embedded one)")
    parser.add_argument("--dataset", choices=("text", "chat"), default="text", help="what --dataset-path holds")
    parser.add_argument("--tokenizer", help="a tokenizer.json or its folder (default: the embedded one)")
    args = parser.parse_args()
    tokens = args.global_batch * args.seq_len
    print(f"global batch {args.global_batch} x {args.seq_len} = {tokens / 1e6:.2f}M tokens per step, "
          f"{torch.get_num_threads()} torch threads")

    serial, batched = (reading_rate(args, cls(args.tokenizer)) for cls in (OneAtATime, Tokenizer))
    print(f"reading: one encode per document {serial / 1e6:.3f}M tokens/s, encode_batch {batched / 1e6:.3f}M "
          f"tokens/s ({batched / serial:.2f}x)")
    with tempfile.TemporaryDirectory() as folder:
        documents = (file_documents(args.dataset_path, 0, FORMATS[args.dataset]) if args.dataset_path
                     else pydocs_split("train"))
        start = time.perf_counter()
        meta = write_pretokenized(documents, Tokenizer(args.tokenizer), Path(folder) / "tokens", args.dataset, "")
        written = meta["tokens"] / (time.perf_counter() - start)
        ahead = reading_rate(args, Tokenizer(args.tokenizer), str(Path(folder) / "tokens"))
        shuffled = reading_rate(args, Tokenizer(args.tokenizer), str(Path(folder) / "tokens"), shuffle_seed=0)
    print(f"pretokenized: {ahead / 1e6:.3f}M tokens/s ({ahead / batched:.1f}x encode_batch; the pretokenize "
          f"command wrote {written / 1e6:.3f}M tokens/s), shuffled {shuffled / 1e6:.3f}M tokens/s")
    in_step, ahead = (waits(args, Tokenizer(args.tokenizer), prefetch) for prefetch in (0, 1))
    print(f"wait per {args.step_ms:.0f} ms step: read in step {in_step * 1000:.0f} ms, read ahead "
          f"{ahead * 1000:.0f} ms ({in_step / max(ahead, 1e-6):.1f}x less)")


if __name__ == "__main__":
    main()
