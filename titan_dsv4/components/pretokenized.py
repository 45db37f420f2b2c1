"""Pre-tokenized datasets: documents tokenized once, ahead of training, read back as token ids.

Every data-parallel rank reads the whole global batch (``dataloader.py``), so that any layout trains on the
same data; reading text means tokenizing it on every rank, which at cluster batch sizes is real work per step.
A pre-tokenized folder turns that into copying ids: ``python -m titan_dsv4.pretokenize`` writes it, and
``training.dataset = "pretokenized"`` trains on exactly the batches the text or chat dataset gives (the same
packing, the same resumable state), with the same tokenizer, which the folder records and training checks.
Reading documents in any order, it can also shuffle each epoch (``training.shuffle``), which files read in
order cannot.

A folder (one part) holds::

    meta.json     dataset ("text" | "chat"), documents, tokens, the tokenizer's sha256 and BOS/EOS ids
    tokens.u32    every document's token ids one after the other (little-endian uint32)
    ends.i64      each document's end in tokens.u32 (little-endian int64)
    trained.u8    chat only: per token, 1 where it is a label (starts in an assistant message)

A dataset is one part, or a folder of parts (its subfolders holding a ``meta.json``, read in sorted order), so
a large corpus can be tokenized in pieces in parallel.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from .dataloader import TOKENIZE_AHEAD_CHARS, DataError, Document, Tokenized, encode_documents, take_documents
from .tokenizer import Tokenizer

FORMAT, VERSION = "titan_dsv4 pretokenized", 1
TOKENS, ENDS, TRAINED = ("tokens.u32", "<u4"), ("ends.i64", "<i8"), ("trained.u8", "|b1")  # file, dtype
SHARD = re.compile(r"part-(\d{5})-of-(\d{5})")  # the part folders of ``pretokenize --num-shards``


def shard_name(shard: int, shards: int) -> str:
    return f"part-{shard:05d}-of-{shards:05d}"


def tokenizer_identity(tokenizer: Tokenizer) -> dict:
    """What makes token ids mean the same text: the tokenizer file's bytes and the BOS/EOS ids."""
    return {"sha256": hashlib.sha256(tokenizer.path.read_bytes()).hexdigest(), "bos_id": tokenizer.bos_id,
            "eos_id": tokenizer.eos_id, "vocab_size": tokenizer.vocab_size, "path": str(tokenizer.path)}


def write_pretokenized(documents: Iterable[Document], tokenizer: Tokenizer, output: str | Path, dataset: str,
                       source: str, progress: Callable[[int, int], None] | None = None) -> dict:
    """Tokenize ``documents`` (of a ``dataset``: "text" or "chat") into the part folder ``output``; returns its
    meta. The folder appears only once complete (written beside it, then renamed); an existing one is kept.
    ``progress(documents, tokens)`` is called after each ``encode_batch``."""
    output = Path(output)
    if output.exists():
        raise FileExistsError(f"{output} exists: pretokenized data is written to a new folder")
    partial = output.with_name(f".{output.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    count = end = 0
    try:
        with (partial / TOKENS[0]).open("wb") as tokens, (partial / ENDS[0]).open("wb") as ends, \
                (partial / TRAINED[0]).open("wb") as trained:
            documents = iter(documents)
            while chunk := take_documents(documents, TOKENIZE_AHEAD_CHARS):
                encoded = encode_documents(tokenizer, chunk)
                tokens.write(np.concatenate([d.ids for d in encoded]).astype(TOKENS[1]).tobytes())
                if encoded[0].trained is not None:
                    trained.write(np.concatenate([d.trained for d in encoded]).astype(TRAINED[1]).tobytes())
                lengths = np.array([len(d.ids) for d in encoded], dtype=np.int64)
                ends.write((end + np.cumsum(lengths)).astype(ENDS[1]).tobytes())
                count, end = count + len(encoded), end + int(lengths.sum())
                if progress:
                    progress(count, end)
            for file in (tokens, ends, trained):  # on disk before the folder is named complete
                file.flush()
                os.fsync(file.fileno())
        if not count:
            raise DataError(f"{source}: the dataset has no documents")
        if dataset != "chat":
            (partial / TRAINED[0]).unlink()
        meta = {"format": FORMAT, "version": VERSION, "dataset": dataset, "documents": count, "tokens": end,
                "tokenizer": tokenizer_identity(tokenizer), "source": source}
        (partial / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        partial.rename(output)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return meta


def pretokenized_parts(path: str | Path) -> list[tuple[Path, dict]]:
    """The dataset's parts and their metas, checked (format, files' sizes, one kind and one tokenizer, every
    shard of a sharded run there)."""
    path = Path(path)
    folders = [path] if (path / "meta.json").is_file() else sorted(
        p.parent for p in path.glob("*/meta.json") if not p.parent.name.startswith(".")) if path.is_dir() else []
    if not folders:
        raise DataError(f"{path}: not a pretokenized dataset (no meta.json in it or its subfolders; "
                        "python -m titan_dsv4.pretokenize writes one)")
    shards = {m.group(0): int(m.group(2)) for m in (SHARD.fullmatch(f.name) for f in folders) if m}
    for total in set(shards.values()):
        missing = sorted(set(shard_name(i, total) for i in range(total)) - set(shards))
        if missing:
            raise DataError(f"{path}: holds {total - len(missing)} of the {total} shards of a sharded run "
                            f"(missing {', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
    parts = [(folder, _read_meta(folder)) for folder in folders]
    first = parts[0][1]
    for folder, meta in parts[1:]:
        for key in ("dataset", "tokenizer"):
            if meta[key] != first[key]:
                raise DataError(f"{folder}: its {key} differs from {folders[0]}'s ({meta[key]} vs {first[key]})")
    return parts


def _read_meta(folder: Path) -> dict:
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except ValueError as e:
        raise DataError(f"{folder / 'meta.json'}: not JSON ({e})") from None
    if (not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION
            or not {"dataset", "documents", "tokens", "tokenizer"} <= meta.keys()):
        raise DataError(f"{folder / 'meta.json'}: not a {FORMAT} version {VERSION} meta.json")
    sizes = {TOKENS: meta["tokens"], ENDS: meta["documents"]}
    if meta["dataset"] == "chat":
        sizes[TRAINED] = meta["tokens"]
    for (name, dtype), count in sizes.items():
        file = folder / name
        want = count * np.dtype(dtype).itemsize
        if not file.is_file() or file.stat().st_size != want:
            found = file.stat().st_size if file.is_file() else "no file"
            raise DataError(f"{file}: {want} bytes expected for {count} entries, found {found} (an incomplete "
                            "copy?)")
    return meta


def check_tokenizer(path: str | Path, tokenizer: Tokenizer) -> None:
    """Raise unless the dataset was tokenized by ``tokenizer`` (ids from another one are other text)."""
    recorded, ours = pretokenized_parts(path)[0][1]["tokenizer"], tokenizer_identity(tokenizer)
    if any(recorded[k] != ours[k] for k in ("sha256", "bos_id", "eos_id")):
        raise DataError(f"{path} was tokenized with {recorded['path']} (sha256 {recorded['sha256'][:12]}, BOS "
                        f"{recorded['bos_id']}, EOS {recorded['eos_id']}); this run's tokenizer is {ours['path']} "
                        f"(sha256 {ours['sha256'][:12]}, BOS {ours['bos_id']}, EOS {ours['eos_id']}): "
                        "pretokenize the data again with this run's tokenizer")


def pretokenized_documents(path: str | Path, start: int = 0,
                           shuffle: tuple[int, int] | None = None) -> Iterator[Tokenized]:
    """Documents ``start``, ``start + 1``, ... of the dataset, as token ids (and labels, for chat); with
    ``shuffle = (seed, epoch)``, of the documents in the order :func:`shuffled_order` draws."""
    if shuffle is not None:
        yield from _shuffled_documents(pretokenized_parts(path), start, *shuffle)
        return
    for folder, meta in pretokenized_parts(path):
        count = meta["documents"]
        if start >= count:
            start -= count
            continue
        arrays = _part_arrays(folder, meta)
        for local in range(start, count):
            yield _document(arrays, local)
        start = 0


def shuffled_order(count: int, seed: int, epoch: int) -> np.ndarray:
    """A permutation of ``range(count)`` that depends only on the seed and the epoch (so a resumed run, and
    every rank, draws the same one). uint32 while it fits: 4 bytes per document."""
    order = np.random.default_rng([seed, epoch]).permutation(count)
    return order.astype(np.uint32) if count < 2**32 else order


def _shuffled_documents(parts: list[tuple[Path, dict]], start: int, seed: int, epoch: int) -> Iterator[Tokenized]:
    arrays = [_part_arrays(folder, meta) for folder, meta in parts]
    firsts = np.cumsum([0] + [meta["documents"] for _, meta in parts])  # each part's first document
    order = shuffled_order(int(firsts[-1]), seed, epoch)
    for chunk in range(start, len(order), 1 << 16):  # Python ints for a chunk at a time, not the whole order
        indices = order[chunk:chunk + (1 << 16)].astype(np.int64)
        parts_of = np.searchsorted(firsts, indices, side="right") - 1
        for part, local in zip(parts_of.tolist(), (indices - firsts[parts_of]).tolist()):
            yield _document(arrays[part], local)


PartArrays = tuple[np.ndarray, np.ndarray, np.ndarray | None]  # a part's tokens, ends and (chat) label flags


def _part_arrays(folder: Path, meta: dict) -> PartArrays:
    return (_array(folder, TOKENS), _array(folder, ENDS),
            _array(folder, TRAINED) if meta["dataset"] == "chat" else None)


def _document(arrays: PartArrays, local: int) -> Tokenized:
    """The part's document ``local``."""
    tokens, ends, trained = arrays
    begin, end = (ends[local - 1] if local else 0), ends[local]
    return Tokenized(tokens[begin:end], None if trained is None else trained[begin:end])


def _array(folder: Path, file: tuple[str, str]) -> np.ndarray:
    """A part's file as a read-only array, mapped rather than read (an empty file cannot be mapped)."""
    name, dtype = file
    if not (folder / name).stat().st_size:
        return np.zeros(0, dtype=dtype)
    return np.asarray(np.memmap(folder / name, dtype=dtype, mode="r"))  # slices: plain views, fast to make
