"""Tokenize a text or chat dataset once, ahead of training (``components/pretokenized.py`` says why).

    python -m titan_dsv4.pretokenize --dataset chat --dataset-path data/chats --tokenizer /ckpt/DeepSeek-V4-Flash \
        --output data/chats.tokens

then train with ``--training.dataset pretokenized --training.dataset_path data/chats.tokens`` and the same
tokenizer. For a large corpus, ``--num-shards N --shard I`` (I = 0 .. N-1, e.g. a SLURM array job's task id)
tokenizes the I-th of N contiguous runs of its files into ``OUTPUT/part-I-of-N``: the N processes run in
parallel, and the folder of parts holds the documents in the files' order.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

from .components.dataloader import DATA_SUFFIXES, FORMATS, DataError, data_files, file_documents
from .components.pretokenized import shard_name, write_pretokenized
from .components.tokenizer import Tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m titan_dsv4.pretokenize",
        description="Tokenize a text or chat dataset once, ahead of training: training on the folder "
                    "(training.dataset = 'pretokenized') reads the same batches without tokenizing on every rank.")
    parser.add_argument("--dataset", choices=sorted(FORMATS), required=True, help="what the files hold")
    parser.add_argument("--dataset-path", required=True, help="a document file or a folder of them")
    parser.add_argument("--tokenizer", default=None, help="a tokenizer.json or a folder holding one (a released "
                        "checkpoint's); default: the embedded debug tokenizer")
    parser.add_argument("--output", required=True, help="the folder to write (must not exist; with --num-shards: "
                        "the folder of parts)")
    parser.add_argument("--num-shards", type=int, default=1, help="split the files into this many parts")
    parser.add_argument("--shard", type=int, default=0, help="the part this process writes (0 .. num-shards - 1)")
    args = parser.parse_args(argv)
    try:
        tokenizer = Tokenizer(args.tokenizer)
    except (FileNotFoundError, ValueError) as e:
        parser.error(f"--tokenizer {args.tokenizer!r}: {e}")
    started = last = time.monotonic()

    def progress(documents: int, tokens: int) -> None:
        nonlocal last
        if time.monotonic() - last >= 10:
            last = time.monotonic()
            print(f"{documents} documents, {tokens} tokens ({tokens / (last - started) / 1e6:.2f}M tokens/s)",
                  flush=True)

    files = data_files(args.dataset_path)
    if not files:
        parser.error(f"--dataset-path {args.dataset_path!r}: no {'/'.join(DATA_SUFFIXES)} file there")
    output, source = Path(args.output), args.dataset_path
    if args.num_shards != 1 or args.shard != 0:
        if not 0 <= args.shard < args.num_shards <= len(files):
            parser.error(f"--num-shards {args.num_shards} --shard {args.shard}: a shard in 0 .. num-shards - 1, "
                         f"at most one per file ({len(files)} files)")
        files = files[args.shard * len(files) // args.num_shards:(args.shard + 1) * len(files) // args.num_shards]
        output = output / shard_name(args.shard, args.num_shards)
        source = f"{source} (files {', '.join(f.name for f in files[:3])}{', ...' if len(files) > 3 else ''})"
    documents = itertools.chain.from_iterable(file_documents(f, 0, FORMATS[args.dataset]) for f in files)
    try:
        meta = write_pretokenized(documents, tokenizer, output, args.dataset, source, progress)
    except (DataError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    seconds = time.monotonic() - started
    print(f"wrote {output}: {meta['documents']} documents, {meta['tokens']} tokens in {seconds:.1f} s "
          f"({meta['tokens'] / max(seconds, 1e-9) / 1e6:.2f}M tokens/s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
