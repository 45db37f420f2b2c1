"""Documents -> packed ``(input_ids, labels, positions)`` batches, sharded by data-parallel rank, resumable.

Every document is ``[BOS] tokens [EOS]``. Documents are concatenated into one stream; sequence i is the
window ``stream[i*S : i*S + S + 1]`` (inputs are its first S tokens, labels the last S). ``positions``
count from 0 inside each document, and a label whose token starts a new document is ignored, so nothing is
ever predicted across a boundary.

The global batch of step n is sequences ``[n*G, (n+1)*G)`` whatever the layout: data-parallel rank r takes
its contiguous slice. So one process and N data-parallel processes see the same global batch, and a run
resumed with another layout continues with the same data.
"""

from __future__ import annotations

import ast
import json
import os
import random
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..models.deepseek_v4.mtp import IGNORE_INDEX
from .tokenizer import Tokenizer

MIN_DOC_CHARS = 200


# ---------------------------------------------------------------------- document sources
def pydocs_corpus() -> list[str]:
    """Real English text that ships with every Python: docstrings (>= 200 chars) of the top-level
    standard-library modules, in a fixed shuffled order (file order would feed one module's style at a time).
    Read with ``ast`` (nothing imported); cached per Python version."""
    cache = Path(tempfile.gettempdir()) / f"titan_dsv4_pydocs_v2_{sys.version_info[0]}{sys.version_info[1]}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    docs: list[str] = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        nodes = [tree] + [n for n in ast.walk(tree)
                          if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
        docs += [d for d in (ast.get_docstring(n) for n in nodes) if d and len(d) >= MIN_DOC_CHARS]
    random.Random(0).shuffle(docs)
    tmp = cache.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(docs))
    os.replace(tmp, cache)
    return docs


HELD_OUT_EVERY = 20  # pydocs: every 20th document is the validation split (60 of 1.2k), never trained on


def pydocs_split(split: str) -> list[str]:
    """The embedded corpus's ``"train"`` or ``"validation"`` documents (disjoint; together all of them)."""
    docs = pydocs_corpus()
    if split == "validation":
        return docs[::HELD_OUT_EVERY]
    return [d for i, d in enumerate(docs) if i % HELD_OUT_EVERY]


DATA_SUFFIXES = (".txt", ".jsonl", ".parquet")


class DataError(ValueError):
    """A document file that cannot be read as the dataset format says; the message names file and line."""


def data_files(path: str | Path) -> list[Path]:
    """The document files of ``path`` (itself, or a folder's ``.txt``/``.jsonl``/``.parquet`` files at any
    depth, in sorted order; other files such as a README are not documents)."""
    path = Path(path)
    if not path.is_dir():
        return [path] if path.suffix in DATA_SUFFIXES else []
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in DATA_SUFFIXES)


def text_documents(path: str | Path) -> Iterator[str]:
    """Documents from :func:`data_files`: ``.txt`` (one document per file), ``.jsonl`` (a string ``text``
    field per line), ``.parquet`` (a string ``text`` column, needs pyarrow)."""
    for file in data_files(path):
        if file.suffix == ".txt":
            try:
                yield file.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{file}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        elif file.suffix == ".jsonl":
            yield from _jsonl_texts(file)
        else:
            yield from _parquet_texts(file)


def _jsonl_texts(file: Path) -> Iterator[str]:
    with file.open("rb") as f:
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
                raise DataError(f"{file}:{line_no}: not a JSON line ({e})") from None
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                fields = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise DataError(f"{file}:{line_no}: a jsonl record needs a string 'text' field (found {fields})")
            yield text


def _parquet_texts(file: Path) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError("reading .parquet needs pyarrow: pip install 'titan_dsv4[data]'") from e
    parquet = pq.ParquetFile(file)
    if "text" not in parquet.schema_arrow.names:
        raise DataError(f"{file}: a parquet file needs a 'text' column (found {parquet.schema_arrow.names})")
    row = 0
    for batch in parquet.iter_batches(columns=["text"]):
        for text in batch.column(0).to_pylist():
            if not isinstance(text, str):
                raise DataError(f"{file}: row {row}: 'text' is {text!r}, not a string")
            row += 1
            yield text


# ---------------------------------------------------------------------- packing
@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, S]
    labels: torch.Tensor  # [B, S], IGNORE_INDEX where invalid
    positions: torch.Tensor  # [B, S]


class PackedSequences:
    """Endless stream of packed sequences of ``seq_len + 1`` tokens with in-document positions.

    State is ``(epoch, next document index, unread tokens, sequences produced)``; restoring it continues
    exactly, skipping earlier documents of the epoch without tokenizing them.
    """

    def __init__(self, documents_fn, tokenizer: Tokenizer, seq_len: int):
        self.documents_fn, self.tokenizer, self.seq_len = documents_fn, tokenizer, seq_len
        self.epoch, self.doc_index, self.produced = 0, 0, 0
        self.tokens: list[int] = []
        self.positions: list[int] = []
        self._docs: Iterator[tuple[int, str]] | None = None

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "doc_index": self.doc_index, "produced": self.produced,
                "tokens": torch.tensor(self.tokens, dtype=torch.long),
                "positions": torch.tensor(self.positions, dtype=torch.long)}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.doc_index = int(state["epoch"]), int(state["doc_index"])
        self.produced = int(state["produced"])
        self.tokens = [int(t) for t in state["tokens"]]
        self.positions = [int(p) for p in state["positions"]]
        self._docs = None

    def _append_next_document(self) -> None:
        for _ in range(2):
            if self._docs is None:
                self._docs = enumerate(self.documents_fn())
            for index, text in self._docs:
                if index < self.doc_index:
                    continue  # resuming: skip without tokenizing
                doc = [self.tokenizer.bos_id, *self.tokenizer.encode(text), self.tokenizer.eos_id]
                self.tokens += doc
                self.positions += range(len(doc))
                self.doc_index = index + 1
                return
            if self.doc_index == 0:
                break
            self.epoch, self.doc_index, self._docs = self.epoch + 1, 0, None
        raise ValueError("the dataset has no documents")

    def next_sequence(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        while len(self.tokens) < self.seq_len + 1:
            self._append_next_document()
        ids = torch.tensor(self.tokens[: self.seq_len + 1], dtype=torch.long)
        pos = torch.tensor(self.positions[: self.seq_len + 1], dtype=torch.long)
        del self.tokens[: self.seq_len], self.positions[: self.seq_len]
        self.produced += 1
        labels = ids[1:].clone()
        labels[pos[1:] == 0] = IGNORE_INDEX  # the next token starts another document
        return ids[:-1], labels, pos[:-1]


class DataLoader:
    """Yields this data-parallel rank's :class:`Batch` of every global batch."""

    def __init__(self, sequences: PackedSequences, local_batch_size: int, dp_rank: int, dp_degree: int):
        self.sequences, self.local_batch_size = sequences, local_batch_size
        self.dp_rank, self.dp_degree = dp_rank, dp_degree

    def __iter__(self) -> "DataLoader":
        return self

    def __next__(self) -> Batch:
        rows = []
        for i in range(self.local_batch_size * self.dp_degree):
            seq = self.sequences.next_sequence()
            if i // self.local_batch_size == self.dp_rank:
                rows.append(seq)
        ids, labels, pos = (torch.stack(t) for t in zip(*rows))
        return Batch(input_ids=ids, labels=labels, positions=pos)

    def state_dict(self) -> dict:
        return self.sequences.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sequences.load_state_dict(state)


def build_dataloader(dataset: str, dataset_path: str | None, tokenizer: Tokenizer, seq_len: int,
                     local_batch_size: int, dp_rank: int, dp_degree: int, split: str = "train") -> DataLoader:
    """``split`` picks the embedded corpus's part (``pydocs_split``); a ``text`` dataset is what its path
    holds."""
    if dataset == "pydocs":
        docs = pydocs_split(split)
        documents_fn = lambda: iter(docs)  # noqa: E731
    elif dataset == "text":
        documents_fn = lambda: text_documents(dataset_path)  # noqa: E731
    else:
        raise ValueError(f"`training.dataset` = {dataset!r} is invalid: allowed pydocs, text")
    return DataLoader(PackedSequences(documents_fn, tokenizer, seq_len), local_batch_size, dp_rank, dp_degree)


def read_batches(loader: DataLoader, steps: int) -> list[Batch]:
    """The first ``steps`` batches of ``loader``, or with ``steps = -1`` every full global batch of one pass
    over its documents (all data-parallel ranks read the whole stream, so they agree where it ends)."""
    batches: list[Batch] = []
    while steps < 0 or len(batches) < steps:
        batch = next(loader)
        if loader.sequences.epoch > 0:  # the batch ran past the last document
            break
        batches.append(batch)
    global_batch = loader.local_batch_size * loader.dp_degree
    if not batches or 0 < len(batches) < steps:
        raise ValueError(f"the dataset holds {len(batches)} full global batches of {global_batch} x "
                         f"{loader.sequences.seq_len} tokens, {steps if steps > 0 else 'at least 1'} needed")
    return batches
