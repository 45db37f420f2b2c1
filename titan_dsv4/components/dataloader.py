"""Documents -> packed ``(input_ids, labels, positions)`` batches, sharded by data-parallel rank, resumable.

Every text document is ``[BOS] tokens [EOS]``; a conversation is its rendering in DeepSeek-V4's chat format
(``chat.py``), which starts with BOS. Documents are concatenated into one stream; sequence i is the window
``stream[i*S : i*S + S + 1]`` (inputs are its first S tokens, labels the last S). ``positions`` count from 0
inside each document, and a label whose token starts a new document is ignored, so nothing is ever predicted
across a boundary; in a conversation only the assistant messages' tokens are labels. Documents tokenized
ahead (``pretokenized.py``) enter as :class:`Tokenized` and are packed the same way.

The global batch of step n is sequences ``[n*G, (n+1)*G)`` whatever the layout: data-parallel rank r takes
its contiguous slice. So one process and N data-parallel processes see the same global batch, and a run
resumed with another layout continues with the same data.
"""

from __future__ import annotations

import ast
import gzip
import io
import itertools
import json
import os
import queue
import random
import sys
import sysconfig
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from ..models.deepseek_v4.mtp import IGNORE_INDEX
from .chat import Conversation, render_conversation, target_mask
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


DATA_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
OPTIONAL_READERS = {".parquet": "pyarrow", ".jsonl.zst": "zstandard"}  # suffix: the package reading it


def data_suffix(path: Path) -> str | None:
    """Which of :data:`DATA_SUFFIXES` the file's name ends in, if any."""
    return next((suffix for suffix in DATA_SUFFIXES if path.name.endswith(suffix)), None)


class DataError(ValueError):
    """A document file that cannot be read as the dataset format says; the message names file and line."""


def data_files(path: str | Path) -> list[Path]:
    """The document files of ``path`` (itself, or a folder's files with a :data:`DATA_SUFFIXES` suffix at any
    depth, in sorted order; other files such as a README are not documents)."""
    path = Path(path)
    if not path.is_dir():
        return [path] if data_suffix(path) else []
    return sorted(p for p in path.rglob("*") if p.is_file() and data_suffix(p))


Document = str | Conversation


@dataclass(frozen=True)
class RecordFormat:
    """Where a dataset's documents sit in jsonl records and parquet rows."""

    field: str  # the jsonl field and parquet column
    needs: str  # what a record needs, for errors
    parse: Callable[[object], Document]  # the field's value -> document; ValueError says what is wrong


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"'text' is {value!r}, not a string")
    return value


TEXT = RecordFormat("text", "a string 'text' field", _text)
CHAT = RecordFormat("messages", "a 'messages' list", render_conversation)
FORMATS = {"text": TEXT, "chat": CHAT}  # dataset name -> the records it reads
DATASETS = ("pydocs", *FORMATS, "pretokenized")


def file_documents(path: str | Path, start: int = 0, records: RecordFormat = TEXT) -> Iterator[Document]:
    """Documents ``start``, ``start + 1``, ... of :func:`data_files`: ``.txt`` (one text document per file),
    ``.jsonl`` (one record per non-blank line; also gzip- or zstandard-compressed, ``.jsonl.gz`` and
    ``.jsonl.zst``, the latter needing zstandard), ``.parquet`` (one per row, needs pyarrow); ``records``
    says which field holds the document (a string ``text``, or a conversation's ``messages``).
    The documents before ``start`` are counted, not parsed, so a resumed run gets to its place fast."""
    skip = start
    for file in data_files(path):
        suffix = data_suffix(file)
        if suffix == ".txt":
            if records is not TEXT:
                raise DataError(f"{file}: a .txt file holds plain text; this dataset reads {records.needs} from "
                                ".jsonl or .parquet records")
            if skip:
                skip -= 1
                continue
            try:
                yield file.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{file}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        elif suffix == ".parquet":
            skip = yield from _parquet_documents(file, skip, records)
        else:
            skip = yield from _jsonl_documents(file, skip, records)


def _jsonl_documents(file: Path, skip: int, records: RecordFormat) -> Generator[Document, None, int]:
    """The file's documents after its first ``skip``; returns how many of ``skip`` it did not hold."""
    with _open_lines(file) as f:
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            if skip:
                skip -= 1
                continue
            try:
                record = json.loads(raw)
            except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
                raise DataError(f"{file}:{line_no}: not a JSON line ({e})") from None
            value = record.get(records.field) if isinstance(record, dict) else None
            if value is None:
                fields = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise DataError(f"{file}:{line_no}: a jsonl record needs {records.needs} (found {fields})")
            try:
                document = records.parse(value)
            except ValueError as e:
                raise DataError(f"{file}:{line_no}: {e}") from None
            yield document
    return skip


def _open_lines(file: Path) -> BinaryIO:
    """The file's bytes, decompressed by its suffix, readable line by line."""
    if file.name.endswith(".gz"):
        return gzip.open(file, "rb")
    if file.name.endswith(".zst"):
        import zstandard

        reader = zstandard.ZstdDecompressor().stream_reader(file.open("rb"), read_across_frames=True, closefd=True)
        return io.BufferedReader(reader)
    return file.open("rb")


def _parquet_documents(file: Path, skip: int, records: RecordFormat) -> Generator[Document, None, int]:
    """The file's documents after its first ``skip`` (whole row groups skipped unread); returns how many of
    ``skip`` it did not hold."""
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError("reading .parquet needs pyarrow: pip install 'titan_dsv4[data]'") from e
    parquet = pq.ParquetFile(file)
    if records.field not in parquet.schema_arrow.names:
        raise DataError(f"{file}: a parquet file needs a {records.field!r} column "
                        f"(found {parquet.schema_arrow.names})")
    row, first = 0, 0
    while first < parquet.num_row_groups and row + parquet.metadata.row_group(first).num_rows <= skip:
        row += parquet.metadata.row_group(first).num_rows
        first += 1
    if first == parquet.num_row_groups:
        return skip - row
    for batch in parquet.iter_batches(columns=[records.field], row_groups=range(first, parquet.num_row_groups)):
        for value in batch.column(0).to_pylist():
            row += 1
            if row <= skip:
                continue
            try:
                document = records.parse(value)
            except ValueError as e:
                raise DataError(f"{file}: row {row - 1}: {e}") from None
            yield document
    return 0


# ---------------------------------------------------------------------- tokenizing
@dataclass(frozen=True)
class Tokenized:
    """A document's token ids; a conversation's also say which are labels (``trained``; None for a text)."""

    ids: np.ndarray
    trained: np.ndarray | None = None


def encode_documents(tokenizer: Tokenizer, documents: Sequence[Document]) -> list[Tokenized]:
    """The documents (all texts or all conversations) tokenized in one ``encode_batch`` (all cores, off the
    GIL). A conversation's labels are its tokens that start in one of its target spans."""
    if not isinstance(documents[0], Conversation):
        return [Tokenized(np.array(ids, dtype=np.int64)) for ids in tokenizer.encode_batch(list(documents))]
    # all conversations as one array and one mask, then split (short ones cost per call, not per token)
    encoded = tokenizer.encode_batch_with_starts([c.text for c in documents])
    lengths = np.array([len(ids) for ids, _ in encoded], dtype=np.int64)
    flat = [np.fromiter(itertools.chain.from_iterable(e[k] for e in encoded), np.int64, int(lengths.sum()))
            for k in (0, 1)]
    offsets = np.cumsum([0] + [len(c.text) for c in documents[:-1]])  # each text's start in their concatenation
    spans = [(offset + a, offset + b) for offset, c in zip(offsets.tolist(), documents) for a, b in c.targets]
    trained = target_mask(flat[1] + np.repeat(offsets, lengths), spans)
    cuts = np.cumsum(lengths)[:-1]
    return [Tokenized(ids, mask) for ids, mask in zip(np.split(flat[0], cuts), np.split(trained, cuts))]


# ---------------------------------------------------------------------- packing
@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, S]
    labels: torch.Tensor  # [B, S], IGNORE_INDEX where invalid
    positions: torch.Tensor  # [B, S]


# Text tokenized per ``encode_batch`` call (all cores, off the GIL): from 64k characters at the start (a run
# starts without tokenizing more than it needs) doubling to 1M (~250k tokens, enough documents to keep all cores
# busy).
FIRST_TOKENIZE_CHARS, TOKENIZE_AHEAD_CHARS = 1 << 16, 1_000_000


class PackedSequences:
    """Endless stream of packed sequences of ``seq_len + 1`` tokens with in-document positions.

    State is ``(epoch, next document index, unread tokens, sequences produced)``, where the unread tokens (with
    their positions and whether they are labels) are the rest of the document the next sequence starts in;
    restoring it continues exactly, skipping earlier documents of the epoch without tokenizing them. Documents
    are read and tokenized up to ``TOKENIZE_AHEAD_CHARS`` of text at a time into a token buffer (a look-ahead
    the state does not depend on), and sequences are slices of it.
    """

    def __init__(self, documents_fn: Callable[[int, int], Iterable[Document | Tokenized]], tokenizer: Tokenizer,
                 seq_len: int):
        """``documents_fn(epoch, start)``: the epoch's documents from index ``start`` on."""
        self.documents_fn, self.tokenizer, self.seq_len = documents_fn, tokenizer, seq_len
        self.produced = 0
        # numpy, not torch: torch ops on large tensors in a second thread start a second OpenMP team, which slows
        # every parallel region of the training thread (libgomp throttles spinning once threads outnumber cores)
        self._tokens = self._positions = np.zeros(0, dtype=np.int64)  # the buffer; the stream from _cursor
        self._trained = np.zeros(0, dtype=bool)  # per buffered token: is it a label (a target of training)?
        self._cursor = 0
        self._buffered_docs: deque[tuple[int, int, int]] = deque()  # (epoch, index, end in the buffer)
        self._read_epoch, self._read_index = 0, 0  # the next document to read
        self._reader: Iterator[tuple[int, Document]] | None = None
        self._chunk_chars = FIRST_TOKENIZE_CHARS
        self.first_cut: int | None = None  # tokens of the first conversation read that was cut to a sequence

    def _current_doc(self) -> tuple[int, int, int]:
        """(epoch, index, end) of the document holding the cursor; the reader's position before any."""
        while self._buffered_docs and self._buffered_docs[0][2] <= self._cursor:
            self._buffered_docs.popleft()
        return self._buffered_docs[0] if self._buffered_docs else (self._read_epoch, self._read_index - 1, 0)

    def state_dict(self) -> dict:
        epoch, index, end = self._current_doc()
        unread = slice(self._cursor, max(end, self._cursor))
        return {"epoch": epoch, "doc_index": index + 1, "produced": self.produced,
                "tokens": torch.from_numpy(self._tokens[unread].copy()),
                "positions": torch.from_numpy(self._positions[unread].copy()),
                "trained": torch.from_numpy(self._trained[unread].copy())}

    def load_state_dict(self, state: dict) -> None:
        self._read_epoch, self._read_index = int(state["epoch"]), int(state["doc_index"])
        self.produced = int(state["produced"])
        self._tokens, self._positions = (torch.as_tensor(state[k], dtype=torch.long).numpy().copy()
                                         for k in ("tokens", "positions"))
        # checkpoints from before conversations: every token but a document's first is a label
        trained = state.get("trained")
        self._trained = torch.as_tensor(trained).numpy().copy() if trained is not None else self._positions != 0
        self._cursor, self._reader = 0, None
        self._buffered_docs = deque([(self._read_epoch, self._read_index - 1, len(self._tokens))]
                                    if len(self._tokens) else [])

    def _read_documents(self) -> None:
        """Tokenize the next documents (the next epoch's first ones at the end of an epoch) into the buffer."""
        for _ in range(2):
            if self._reader is None:  # resuming: skip the epoch's earlier documents without tokenizing them
                self._reader = iter(self.documents_fn(self._read_epoch, self._read_index))
            documents = take_documents(self._reader, min(self._chunk_chars, TOKENIZE_AHEAD_CHARS))
            if documents:
                break
            if self._read_index == 0:
                raise DataError("the dataset has no documents")
            self._read_epoch, self._read_index, self._reader = self._read_epoch + 1, 0, None
        self._chunk_chars = min(2 * self._chunk_chars, TOKENIZE_AHEAD_CHARS)
        indices = range(self._read_index, self._read_index + len(documents))  # the reader goes on from there
        self._current_doc()  # forget the documents already read past
        kept = len(self._tokens) - self._cursor  # the cursor is where a sequence starts
        tokens, trained, positions, lengths = self._tokenize(documents, kept)
        ends = list(itertools.accumulate(lengths))
        self._buffered_docs = deque((e, i, end - self._cursor) for e, i, end in self._buffered_docs)
        self._buffered_docs.extend((self._read_epoch, i, kept + end) for i, end in zip(indices, ends))
        self._tokens = np.concatenate([self._tokens[self._cursor:], tokens])
        self._positions = np.concatenate([self._positions[self._cursor:], positions])
        self._trained = np.concatenate([self._trained[self._cursor:], trained])
        self._cursor, self._read_index = 0, indices.stop

    def _tokenize(self, documents: Sequence[Document | Tokenized], offset: int) -> tuple[
            np.ndarray, np.ndarray, np.ndarray, list[int]]:
        """The documents' ``(tokens, labels?, positions)`` laid out one after the other, the first ``offset``
        tokens after a sequence's start, and each one's length (one dataset's documents are of one kind).

        A text is ``[BOS] tokens [EOS]``, every token but BOS a label, split across sequences where the stream
        is. A conversation's labels are the tokens starting in an assistant message, and it is never split:
        every answer is trained with its whole prompt in view. One that does not fit in the rest of the
        sequence starts the next one, the gap padded with EOS tokens (a document of their own, no labels, and
        counted in the conversation's length); one longer than a sequence is cut to it (``seq_len + 1``
        tokens, the last one a label only)."""
        if not isinstance(documents[0], Tokenized):
            documents = encode_documents(self.tokenizer, documents)
        bos, eos = self.tokenizer.bos_id, self.tokenizer.eos_id
        if documents[0].trained is None:
            lengths = [len(d.ids) + 2 for d in documents]
            tokens = np.concatenate([piece for d in documents for piece in ([bos], d.ids, [eos])])
            positions = _positions_within(lengths)
            return tokens.astype(np.int64), positions > 0, positions, lengths
        tokens, trained, pieces, lengths = [], [], [], []  # pieces: the pads and the conversations
        span = self.seq_len + 1  # a sequence's tokens (inputs and the last label)
        for conversation in documents:
            if len(conversation.ids) > span and self.first_cut is None:
                self.first_cut = len(conversation.ids)
            ids, labels = conversation.ids[:span], conversation.trained[:span]
            sequence_end = offset // self.seq_len * self.seq_len + span
            gap = sequence_end - 1 - offset if offset + len(ids) > sequence_end else 0
            if gap:
                tokens.append(np.full(gap, eos))
                trained.append(np.zeros(gap, dtype=bool))
                pieces.append(gap)
            tokens.append(ids)
            trained.append(labels)
            pieces.append(len(ids))
            lengths.append(gap + len(ids))
            offset += gap + len(ids)
        return (np.concatenate(tokens).astype(np.int64), np.concatenate(trained), _positions_within(pieces),
                lengths)

    def next_sequence(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(input_ids, labels, positions)`` of the next sequence."""
        while len(self._tokens) - self._cursor < self.seq_len + 1:
            self._read_documents()
        window = slice(self._cursor, self._cursor + self.seq_len + 1)
        ids, pos = self._tokens[window], self._positions[window]
        self._cursor += self.seq_len
        self.produced += 1
        labels = ids[1:].copy()
        labels[~self._trained[window][1:]] = IGNORE_INDEX  # a document's first token, a conversation's context
        return ids[:-1], labels, pos[:-1]


def take_documents(documents: Iterator[Document | Tokenized], chars: int) -> list[Document | Tokenized]:
    """The iterator's next documents, up to the first that brings them to ``chars`` characters (fewer at its
    end): one ``encode_batch`` worth."""
    taken, total = [], 0
    for document in documents:
        taken.append(document)
        total += document_chars(document)
        if total >= chars:
            break
    return taken


def document_chars(document: Document | Tokenized) -> int:
    """A document's characters (of text, a conversation's rendering), about 4 per token once tokenized."""
    if isinstance(document, Tokenized):
        return 4 * len(document.ids)
    return len(document.text if isinstance(document, Conversation) else document)


def _positions_within(lengths: list[int]) -> np.ndarray:
    """``0, 1, ...`` counting from 0 again at the start of each of the consecutive runs of ``lengths``."""
    lengths = np.array(lengths, dtype=np.int64)
    return np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)


class DataLoader:
    """Yields this data-parallel rank's :class:`Batch` of every global batch.

    With ``prefetch`` > 0 a background thread reads that many batches ahead (tokenizing mostly off the GIL), so
    a training step does not wait for its data; ``state_dict`` stays that of the batches handed out, and
    ``close`` stops the thread and rewinds to them.
    """

    def __init__(self, sequences: PackedSequences, local_batch_size: int, dp_rank: int, dp_degree: int,
                 prefetch: int = 0):
        self.sequences, self.local_batch_size = sequences, local_batch_size
        self.dp_rank, self.dp_degree, self.prefetch = dp_rank, dp_degree, prefetch
        self._ahead: _Prefetcher | None = None
        self._state: dict = {}  # while prefetching: the sequences' state after the last batch handed out

    def __iter__(self) -> "DataLoader":
        return self

    def __next__(self) -> Batch:
        if not self.prefetch:
            return self._read_batch()
        if self._ahead is None:
            self._state = self.sequences.state_dict()
            self._ahead = _Prefetcher(lambda: (self._read_batch(), self.sequences.state_dict()), self.prefetch)
        batch, self._state = self._ahead.next()
        return batch

    def _read_batch(self) -> Batch:
        rows = []
        for i in range(self.local_batch_size * self.dp_degree):
            seq = self.sequences.next_sequence()
            if i // self.local_batch_size == self.dp_rank:
                rows.append(seq)
        ids, labels, pos = (torch.from_numpy(np.stack(t)) for t in zip(*rows))
        return Batch(input_ids=ids, labels=labels, positions=pos)

    def state_dict(self) -> dict:
        return self._state if self._ahead is not None else self.sequences.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.close()
        self.sequences.load_state_dict(state)

    def close(self) -> None:
        if self._ahead is not None:
            self._ahead.close()
            self._ahead = None
            self.sequences.load_state_dict(self._state)


class _Prefetcher:
    """Calls ``produce`` in a thread, up to ``depth`` results ahead of ``next``, which re-raises its errors.

    Not a daemon (a daemon thread killed at exit inside the tokenizer's native code can abort the process):
    it ends at ``close``, or when the main thread has ended."""

    def __init__(self, produce, depth: int):
        self._queue: queue.Queue = queue.Queue(depth)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(produce,), name="titan_dsv4-dataloader")
        self._thread.start()

    def _run(self, produce) -> None:
        while not self._stop.is_set():
            try:
                item = (produce(), None)
            except Exception as e:  # handed to the consumer, which raises it
                item = (None, e)
            if not self._put(item) or item[1] is not None:
                return

    def _put(self, item) -> bool:
        """Queue ``item`` once there is room; False when stopped (or the main thread has ended) first."""
        while not self._stop.is_set() and threading.main_thread().is_alive():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def next(self):
        if self._error is None:
            value, self._error = self._queue.get()
            if self._error is None:
                return value
        raise self._error

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def build_dataloader(dataset: str, dataset_path: str | None, tokenizer: Tokenizer, seq_len: int,
                     local_batch_size: int, dp_rank: int, dp_degree: int, split: str = "train",
                     prefetch: int = 0, shuffle_seed: int | None = None) -> DataLoader:
    """``split`` picks the embedded corpus's part (``pydocs_split``); a ``text``, ``chat`` or ``pretokenized``
    dataset is what its path holds. ``prefetch``: batches read ahead in a background thread. ``shuffle_seed``
    (pretokenized only, which reads documents in any order): each epoch takes its documents in an order drawn
    from the seed and the epoch."""
    if shuffle_seed is not None and dataset != "pretokenized":
        raise ValueError(f"shuffling needs random access to the documents: dataset 'pretokenized', not {dataset!r}")
    if dataset == "pydocs":
        docs = pydocs_split(split)
        documents_fn = lambda epoch, start: iter(docs[start:])  # noqa: E731
    elif dataset in FORMATS:
        documents_fn = lambda epoch, start: file_documents(dataset_path, start, FORMATS[dataset])  # noqa: E731
    elif dataset == "pretokenized":
        from .pretokenized import pretokenized_documents  # it reads documents into this module's Tokenized

        documents_fn = lambda epoch, start: pretokenized_documents(  # noqa: E731
            dataset_path, start, None if shuffle_seed is None else (shuffle_seed, epoch))
    else:
        raise ValueError(f"`training.dataset` = {dataset!r} is invalid: allowed {', '.join(DATASETS)}")
    return DataLoader(PackedSequences(documents_fn, tokenizer, seq_len), local_batch_size, dp_rank, dp_degree,
                      prefetch)


def read_batches(loader: DataLoader, steps: int) -> list[Batch]:
    """The first ``steps`` batches of ``loader``, or with ``steps = -1`` every full global batch of one pass
    over its documents (all data-parallel ranks read the whole stream, so they agree where it ends)."""
    batches: list[Batch] = []
    while steps < 0 or len(batches) < steps:
        batch = next(loader)
        if loader.state_dict()["epoch"] > 0:  # the batch ran past the last document
            break
        batches.append(batch)
    global_batch = loader.local_batch_size * loader.dp_degree
    if not batches or 0 < len(batches) < steps:
        raise ValueError(f"the dataset holds {len(batches)} full global batches of {global_batch} x "
                         f"{loader.sequences.seq_len} tokens, {steps if steps > 0 else 'at least 1'} needed")
    return batches
