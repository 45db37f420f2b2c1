"""Packing, positions, document-boundary labels, sharding, resumable state and the validation split."""

import gzip
import itertools
import json
import random
import threading

import torch

import pytest

from titan_dsv4.components import dataloader
from titan_dsv4.components.dataloader import (DataError, DataLoader, PackedSequences, build_dataloader,
                                             file_documents, pydocs_corpus, pydocs_split, read_batches)
from titan_dsv4.components.tokenizer import Tokenizer
from titan_dsv4.models.deepseek_v4.mtp import IGNORE_INDEX


def from_list(docs):
    """A ``documents_fn`` over a list."""
    return lambda epoch, start: iter(docs[start:])


class CharTokenizer:
    bos_id, eos_id = 0, 1

    def encode(self, text):
        return [ord(c) for c in text]

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]


def test_packing_positions_and_labels():
    docs = ["abc", "defgh", "ij"]  # tokens: [0 a b c 1] [0 d e f g h 1] [0 i j 1]
    seqs = PackedSequences(from_list(docs), CharTokenizer(), seq_len=6)
    ids, labels, pos = seqs.next_sequence()
    assert ids.tolist() == [0, 97, 98, 99, 1, 0]
    assert pos.tolist() == [0, 1, 2, 3, 4, 0]
    assert labels.tolist() == [97, 98, 99, 1, -100, 100]  # EOS -> next doc's BOS is never a target
    ids, labels, pos = seqs.next_sequence()
    assert ids.tolist() == [100, 101, 102, 103, 104, 1]  # continues the document, positions too
    assert pos.tolist() == [1, 2, 3, 4, 5, 6]
    assert labels.tolist() == [101, 102, 103, 104, 1, -100]
    ids, _, pos = seqs.next_sequence()
    assert ids.tolist() == [0, 105, 106, 1, 0, 97] and pos.tolist() == [0, 1, 2, 3, 0, 1]  # wraps to epoch 1
    assert seqs.state_dict()["epoch"] == 1


def reference_windows(docs, tok, seq_len, count):
    """The module docstring's definition, in plain lists: every epoch's ``[BOS] tokens [EOS]`` documents
    concatenated; sequence i is ``stream[i*S : i*S + S + 1]`` with in-document positions."""
    stream, positions = [], []
    while len(stream) < count * seq_len + 1:
        for d in docs:
            doc = [tok.bos_id, *tok.encode(d), tok.eos_id]
            stream += doc
            positions += range(len(doc))
    return [(stream[i * seq_len:(i + 1) * seq_len + 1], positions[i * seq_len:(i + 1) * seq_len + 1])
            for i in range(count)]


def assert_batches_follow(loader, windows, local_batch_size):
    for first in range(0, len(windows), local_batch_size):
        batch = next(loader)
        for row, (ids, pos) in enumerate(windows[first:first + local_batch_size]):
            labels = [IGNORE_INDEX if p == 0 else t for t, p in zip(ids[1:], pos[1:])]
            assert batch.input_ids[row].tolist() == ids[:-1] and batch.positions[row].tolist() == pos[:-1]
            assert batch.labels[row].tolist() == labels


@pytest.mark.parametrize("prefetch", [0, 3])
def test_batches_are_windows_of_the_document_stream_and_resume_anywhere(prefetch, monkeypatch):
    """Against the plain-list reference over three epochs of documents of every length (empty, longer than a
    sequence, longer than a tokenize-ahead chunk): the batches, and a fresh loader restored from the state at
    each of several points (before any batch, mid-document, across an epoch) continuing exactly."""
    monkeypatch.setattr(dataloader, "TOKENIZE_AHEAD_CHARS", 60)
    rng = random.Random(0)
    docs = ["".join(chr(97 + rng.randrange(26)) for _ in range(rng.choice([0, 1, 5, 13, 40, 90])))
            for _ in range(101)]
    tok, seq_len, local = CharTokenizer(), 16, 3
    count = 3 * sum(len(d) + 2 for d in docs) // seq_len // local * local
    windows = reference_windows(docs, tok, seq_len, count + local * 4)

    def loader():
        return DataLoader(PackedSequences(from_list(docs), tok, seq_len), local, 0, 1, prefetch=prefetch)

    whole = loader()
    for at in range(0, count // local):
        if at % 17 == 0:
            resumed = loader()
            resumed.load_state_dict(whole.state_dict())
            assert_batches_follow(resumed, windows[at * local:(at + 4) * local], local)
            resumed.close()
        assert_batches_follow(whole, windows[at * local:(at + 1) * local], local)
    assert whole.state_dict()["epoch"] == 2
    whole.close()


def test_prefetching_hands_out_the_same_batches_state_and_errors(tmp_path, monkeypatch):
    """A background thread reading ahead changes nothing visible: the same batches, the state of the batches
    handed out (not of those read ahead), the same after ``close``, and a broken document raises at the same
    batch (of loaders started alike: the tokenizer's look-ahead may meet it up to a chunk early); the thread
    ends at ``close``."""
    monkeypatch.setattr(dataloader, "TOKENIZE_AHEAD_CHARS", 500)
    lines = [json.dumps({"text": f"document {i} " * (i % 7 + 1)}) for i in range(300)]
    (tmp_path / "d.jsonl").write_text("\n".join(lines[:200] + ['{"txt": "broken"}'] + lines[200:]) + "\n")
    sync, ahead = (build_dataloader("text", str(tmp_path), Tokenizer(), 32, 2, 0, 1, prefetch=n) for n in (0, 4))
    consumed = 0
    for _ in range(3):
        for _ in range(5):
            want, got = next(sync), next(ahead)
            assert torch.equal(want.input_ids, got.input_ids) and torch.equal(want.labels, got.labels)
        consumed += 5
        for key, value in sync.state_dict().items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(ahead.state_dict()[key])), (consumed, key)
        ahead.close()  # rewinds to what was handed out; the next batch starts the thread again
        assert not [t for t in threading.enumerate() if t.name == "titan_dsv4-dataloader"]
    failures = []
    for loader in (build_dataloader("text", str(tmp_path), Tokenizer(), 32, 2, 0, 1, prefetch=n) for n in (0, 4)):
        for index in itertools.count():
            try:
                next(loader)
            except DataError as e:
                failures.append((index, str(e)))
                break
        loader.close()
    assert failures[0] == failures[1] and failures[0][1].endswith("d.jsonl:201: a jsonl record needs a string "
                                                                  "'text' field (found ['txt'])")
    assert not [t for t in threading.enumerate() if t.name == "titan_dsv4-dataloader"]


def test_data_parallel_ranks_split_the_same_global_batch():
    tok = CharTokenizer()
    docs = [f"document number {i} " * (i % 5 + 1) for i in range(40)]
    single = DataLoader(PackedSequences(from_list(docs), tok, 16), 4, 0, 1)
    ranks = [DataLoader(PackedSequences(from_list(docs), tok, 16), 2, r, 2) for r in range(2)]
    for _ in range(3):
        whole = next(single).input_ids
        parts = torch.cat([next(r).input_ids for r in ranks])
        assert torch.equal(whole, parts)


def test_embedded_corpus_is_real_text():
    docs = pydocs_corpus()
    assert len(docs) > 500
    text = " ".join(docs[:200])
    assert text.count(" the ") > 100  # English prose, not random tokens
    tok = Tokenizer()
    assert tok.vocab_size == 2048 and (tok.bos_id, tok.eos_id) == (0, 1)
    ids = tok.encode("Return the number of items in the list.")
    assert tok.decode(ids) == "Return the number of items in the list." and len(ids) < 15


def test_the_embedded_validation_split_is_held_out():
    train, validation = pydocs_split("train"), pydocs_split("validation")
    assert sorted(train + validation) == sorted(pydocs_corpus())
    assert not set(train) & set(validation) and 50 <= len(validation) <= len(train) // 15
    loader = build_dataloader("pydocs", None, Tokenizer(), 32, 2, 0, 1, split="validation")
    first_tokens = next(loader).input_ids[0, 1:6].tolist()  # after the first document's BOS
    assert first_tokens == Tokenizer().encode(validation[0])[:5]


def test_validation_reads_one_pass_of_full_global_batches():
    """-1: every global batch that does not run past the last document, the same on every data-parallel
    rank (each rank's rows are its slice of it); a count the data cannot fill is an error."""
    tok = CharTokenizer()
    docs = [f"doc {i} " * 3 for i in range(10)]  # 10 x (18 + BOS + EOS) = 200 tokens
    stream = len(docs) * 20
    single = read_batches(DataLoader(PackedSequences(from_list(docs), tok, 16), 4, 0, 1), -1)
    assert len(single) == (stream - 1) // (16 * 4)  # sequence i needs tokens up to i * 16 + 16
    ranks = [read_batches(DataLoader(PackedSequences(from_list(docs), tok, 16), 2, r, 2), -1) for r in range(2)]
    for whole, *parts in zip(single, *ranks, strict=True):
        assert torch.equal(whole.input_ids, torch.cat([p.input_ids for p in parts]))
    assert len(read_batches(DataLoader(PackedSequences(from_list(docs), tok, 16), 4, 0, 1), 1)) == 1
    with pytest.raises(ValueError, match="holds 3 full global batches of 4 x 16 tokens, 4 needed"):
        read_batches(DataLoader(PackedSequences(from_list(docs), tok, 16), 4, 0, 1), 4)


def test_text_dataset_reads_txt_jsonl_and_parquet_files_in_path_order(tmp_path):
    """A folder's .txt (whole file), .jsonl (``text`` per non-blank line; gzip- and zstandard-compressed too)
    and .parquet (``text`` column, as pyarrow writes it, in several row groups) documents, files in sorted
    path order at any depth; other files are not documents. A single file is a dataset too. From document
    ``start`` on, the earlier ones are counted, not parsed: the broken line before ``start`` goes unread, as a
    resumed run passes it."""
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    (tmp_path / "b.jsonl").write_text('{"text": "second", "id": 1}\n\n{"text": "third \\u00e9"}\n')
    (tmp_path / "a.txt").write_text("first\nline two")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("fourth")
    parquet_texts = [f"row {i} of the table" for i in range(7)]
    pq.write_table(pa.table({"id": list(range(7)), "text": parquet_texts}), tmp_path / "sub" / "d.parquet",
                   row_group_size=3)
    (tmp_path / "sub" / "e.jsonl").write_text('{"text": "after the table"}\n')
    (tmp_path / "sub" / "f.jsonl.gz").write_bytes(gzip.compress(b'{"text": "gzip"}\n\n{"text": "gzip 2"}\n'))
    zstd = pytest.importorskip("zstandard").ZstdCompressor()  # two frames, as a chunked writer leaves
    (tmp_path / "sub" / "g.jsonl.zst").write_bytes(zstd.compress(b'{"text": "zstd"}\n') +
                                                   zstd.compress(b'{"text": "zstd 2"}\n'))
    (tmp_path / "README.md").write_text("not a document")
    everything = ["first\nline two", "second", "third \u00e9", "fourth", *parquet_texts, "after the table",
                  "gzip", "gzip 2", "zstd", "zstd 2"]
    assert list(file_documents(tmp_path)) == everything
    for start in range(len(everything) + 2):
        assert list(file_documents(tmp_path, start)) == everything[start:], start
    assert list(file_documents(tmp_path / "b.jsonl")) == ["second", "third \u00e9"]
    (tmp_path / "b.jsonl").write_text('{"text": "second"}\nnot json\n{"text": "third \\u00e9"}\n')
    assert list(file_documents(tmp_path, 3)) == everything[2:]  # the broken line held document 2's place
    with pytest.raises(DataError, match="b.jsonl:2: not a JSON line"):
        list(file_documents(tmp_path, 2))


def test_unreadable_parquet_documents_name_their_file_and_row(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"content": ["a"]}), tmp_path / "a.parquet")
    with pytest.raises(DataError, match=r"a.parquet: a parquet file needs a 'text' column \(found \['content'\]\)"):
        list(file_documents(tmp_path / "a.parquet"))
    pq.write_table(pa.table({"text": ["x", "y", None]}), tmp_path / "b.parquet", row_group_size=2)
    with pytest.raises(DataError, match=r"b.parquet: row 2: 'text' is None, not a string"):
        list(file_documents(tmp_path / "b.parquet", 1))


@pytest.mark.parametrize("name,content,message", [
    ("d.jsonl", b'{"text": "ok"}\n{"content": "x"}\n', r"d.jsonl:2: a jsonl record needs a string 'text' field "
                                                        r"\(found \['content'\]\)"),
    ("d.jsonl", b'{"text": null}\n', r"d.jsonl:1: a jsonl record needs a string 'text' field"),
    ("d.jsonl", b'["text"]\n', r"d.jsonl:1: a jsonl record needs a string 'text' field \(found list\)"),
    ("d.jsonl", b'{"text": "ok"}\n\n{"text": "unterminated}\n', r"d.jsonl:3: not a JSON line"),
    ("d.txt", b"caf\xe9 au lait", r"d.txt: not UTF-8 text \(invalid continuation byte at byte 3\)"),
])
def test_unreadable_documents_name_their_file_and_line(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=message):
        list(file_documents(tmp_path))

