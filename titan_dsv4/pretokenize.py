"""Tokenize a text or chat dataset once, ahead of training (``components/pretokenized.py`` says why).

    python -m titan_dsv4.pretokenize --dataset chat --dataset-path data/chats --tokenizer /ckpt/DeepSeek-V4-Flash \
        --output data/chats.tokens

then train with ``--training.dataset pretokenized --training.dataset_path data/chats.tokens`` and the same
tokenizer. For a large corpus, tokenize its files in parallel into subfolders of one folder and train on it.
"""

from __future__ import annotations

import argparse
import sys
import time

from .components.dataloader import DATA_SUFFIXES, FORMATS, DataError, data_files, file_documents
from .components.pretokenized import write_pretokenized
from .components.tokenizer import Tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m titan_dsv4.pretokenize", description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", choices=sorted(FORMATS), required=True, help="what the files hold")
    parser.add_argument("--dataset-path", required=True, help="a document file or a folder of them")
    parser.add_argument("--tokenizer", default=None, help="a tokenizer.json or a folder holding one (a released "
                        "checkpoint's); default: the embedded debug tokenizer")
    parser.add_argument("--output", required=True, help="the folder to write (must not exist)")
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

    if not data_files(args.dataset_path):
        parser.error(f"--dataset-path {args.dataset_path!r}: no {'/'.join(DATA_SUFFIXES)} file there")
    documents = file_documents(args.dataset_path, 0, FORMATS[args.dataset])
    try:
        meta = write_pretokenized(documents, tokenizer, args.output, args.dataset, args.dataset_path, progress)
    except (DataError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    seconds = time.monotonic() - started
    print(f"wrote {args.output}: {meta['documents']} documents, {meta['tokens']} tokens in {seconds:.1f} s "
          f"({meta['tokens'] / max(seconds, 1e-9) / 1e6:.2f}M tokens/s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
