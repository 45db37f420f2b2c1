"""Pre-tokenized datasets: the files hold the tokenizer's ids, and training on them reads the same batches as
training on the text or conversations they came from."""

import json
import shutil

import pytest
import torch

from launch import DEBUG_TOML, run_training
from test_chat import conversations, write_jsonl
from test_config import run_cli
from titan_dsv4.components.chat import render_conversation
from titan_dsv4.components.dataloader import DataError, build_dataloader, pydocs_split
from titan_dsv4.components.pretokenized import pretokenized_documents, shuffled_order, write_pretokenized
from titan_dsv4.components.tokenizer import Tokenizer
from titan_dsv4.models.deepseek_v4.mtp import IGNORE_INDEX
from titan_dsv4.pretokenize import main as pretokenize


def write_texts(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


def datasets(tmp_path, dataset):
    """Two document files of the dataset's kind (the second with an empty text / a long conversation) and
    the documents in order."""
    if dataset == "text":
        docs = pydocs_split("train")[:90] + [""]
        write_texts(tmp_path / "src" / "a.jsonl", docs[:50])
        write_texts(tmp_path / "src" / "b.jsonl", docs[50:])
    else:
        docs = conversations(80)
        write_jsonl(tmp_path / "src" / "a.jsonl", docs[:50])
        write_jsonl(tmp_path / "src" / "b.jsonl", docs[50:])
    return docs


def assert_same_batches(want, got, count):
    for _ in range(count):
        a, b = next(want), next(got)
        for key in ("input_ids", "labels", "positions"):
            assert torch.equal(getattr(a, key), getattr(b, key)), key
        assert want.state_dict()["epoch"] == got.state_dict()["epoch"]


@pytest.mark.parametrize("dataset", ["text", "chat"])
def test_pretokenized_data_holds_the_tokenizers_ids_and_trains_on_the_same_batches(tmp_path, dataset):
    """The command writes each document's ids as the tokenizer encodes its text (a conversation's rendering,
    its labels decoding to the assistant messages); the loader over the folder, or over the folder of parts
    that two shards of the command wrote, gives the text/chat loader's batches over two epochs, and resumes
    exactly, also from the text/chat loader's state. A folder missing one of the shards is refused (a killed
    writer's partial folder is not one)."""
    (tmp_path / "src").mkdir()
    docs = datasets(tmp_path, dataset)
    assert pretokenize(["--dataset", dataset, "--dataset-path", str(tmp_path / "src"),
                        "--output", str(tmp_path / "whole")]) == 0
    for shard in (1, 0):  # the shards of a parallel job, finishing in any order
        assert pretokenize(["--dataset", dataset, "--dataset-path", str(tmp_path / "src"), "--output",
                            str(tmp_path / "parts"), "--num-shards", "2", "--shard", str(shard)]) == 0
    assert sorted(p.name for p in (tmp_path / "parts").iterdir()) == ["part-00000-of-00002", "part-00001-of-00002"]
    tok = Tokenizer()
    written = list(pretokenized_documents(tmp_path / "whole"))
    assert len(written) == len(docs)
    for doc, tokenized in zip(docs, written):
        if dataset == "text":
            assert tokenized.ids.tolist() == tok.encode(doc) and tokenized.trained is None
        else:
            conversation = render_conversation(doc)
            assert tokenized.ids.tolist() == tok.encode(conversation.text)
            answers = "".join(conversation.text[a:b] for a, b in conversation.targets)
            assert tok._tok.decode(tokenized.ids[tokenized.trained].tolist(), skip_special_tokens=False) == answers

    seq_len, local, dp = 96, 2, 2
    for folder in ("whole", "parts"):
        for rank in range(dp):
            reference = build_dataloader(dataset, str(tmp_path / "src"), tok, seq_len, local, rank, dp)
            loader = build_dataloader("pretokenized", str(tmp_path / folder), tok, seq_len, local, rank, dp)
            steps = 0
            while reference.state_dict()["epoch"] < 2:
                assert_same_batches(reference, loader, 1)
                steps += 1
            assert steps > 20 and (dataset == "text" or loader.sequences.first_cut is not None)
    state = loader.state_dict()
    resumed = build_dataloader("pretokenized", str(tmp_path / "parts"), tok, seq_len, local, rank, dp)
    resumed.load_state_dict(state)
    assert_same_batches(reference, resumed, 5)
    switched = build_dataloader("pretokenized", str(tmp_path / "whole"), tok, seq_len, local, rank, dp)
    switched.load_state_dict(reference.state_dict())  # a run on the files continues on their tokens
    assert_same_batches(reference, switched, 5)
    shutil.rmtree(tmp_path / "parts" / "part-00000-of-00002")  # a killed shard's leftover does not count
    shutil.copytree(tmp_path / "whole", tmp_path / "parts" / ".part-00000-of-00002.partial-99")
    with pytest.raises(DataError, match=r"holds 1 of the 2 shards of a sharded run \(missing part-00000-of"):
        next(pretokenized_documents(tmp_path / "parts"))


def test_shuffled_epochs_take_the_documents_in_their_own_order_and_resume_exactly(tmp_path):
    """With a shuffle seed each epoch reads the documents in a permutation drawn from the seed and the epoch:
    the first epoch's batches are the text loader's over the documents written in that order, the second
    epoch takes another permutation (a folder of parts: one over all its documents), and a loader restored
    mid-way through it continues exactly (rank 1 of 2)."""
    tok, docs = Tokenizer(), pydocs_split("train")[:60]
    write_pretokenized(docs, tok, tmp_path / "tok", "text", "pydocs")
    first, second = shuffled_order(60, 7, 0), shuffled_order(60, 7, 1)
    assert sorted(first.tolist()) == list(range(60)) and first.tolist() != second.tolist()
    write_texts(tmp_path / "first.jsonl", [docs[i] for i in first])
    reference = build_dataloader("text", str(tmp_path / "first.jsonl"), tok, 64, 2, 0, 1)
    shuffled = build_dataloader("pretokenized", str(tmp_path / "tok"), tok, 64, 2, 0, 1, shuffle_seed=7)
    steps = 0
    while reference.state_dict()["epoch"] == 0:
        batch = next(reference)
        if reference.state_dict()["epoch"] == 0:  # the batch that reaches the next epoch holds its documents
            assert torch.equal(batch.input_ids, next(shuffled).input_ids), steps
            steps += 1
    assert steps > 20
    assert [d.ids.tolist() for d in pretokenized_documents(tmp_path / "tok", 0, (7, 1))] == [
        tok.encode(docs[i]) for i in second]
    for shard, part in enumerate((docs[:25], docs[25:])):  # a folder of parts shuffles as one dataset
        write_pretokenized(part, tok, tmp_path / "parts" / f"part-0000{shard}-of-00002", "text", "pydocs")
    assert [d.ids.tolist() for d in pretokenized_documents(tmp_path / "parts", 3, (7, 1))] == [
        tok.encode(docs[i]) for i in second[3:]]

    loader = build_dataloader("pretokenized", str(tmp_path / "tok"), tok, 64, 2, 1, 2, shuffle_seed=7)
    while loader.state_dict()["epoch"] == 0:
        next(loader)
    next(loader)
    resumed = build_dataloader("pretokenized", str(tmp_path / "tok"), tok, 64, 2, 1, 2, shuffle_seed=7)
    resumed.load_state_dict(loader.state_dict())
    assert_same_batches(loader, resumed, 5)


def test_a_pretokenized_folder_appears_only_when_complete(tmp_path):
    """A record that cannot be read stops the writer with its file and line, and leaves nothing behind; an
    existing folder is never written into."""
    (tmp_path / "src").mkdir()
    write_jsonl(tmp_path / "src" / "c.jsonl", conversations(30))
    with (tmp_path / "src" / "c.jsonl").open("a") as f:
        f.write('{"messages": [{"role": "user", "content": 3}]}\n')
    out = tmp_path / "out"
    assert pretokenize(["--dataset", "chat", "--dataset-path", str(tmp_path / "src"), "--output", str(out)]) == 1
    assert list(tmp_path.iterdir()) == [tmp_path / "src"]
    out.mkdir()
    (out / "keep").write_text("mine")
    with pytest.raises(FileExistsError, match="exists"):
        write_pretokenized(["some text"], Tokenizer(), out, "text", "list")
    assert [p.name for p in out.iterdir()] == ["keep"]
    with pytest.raises(SystemExit):  # argparse: no document files there
        pretokenize(["--dataset", "text", "--dataset-path", str(out), "--output", str(tmp_path / "new")])
    with pytest.raises(SystemExit):  # more shards than files
        pretokenize(["--dataset", "chat", "--dataset-path", str(tmp_path / "src"), "--output", str(tmp_path / "new"),
                     "--num-shards", "2", "--shard", "1"])


def other_tokenizer(folder):
    """The embedded tokenizer with its last 200 merges dropped: the same ids for BOS/EOS, other ids for text."""
    spec = json.loads(Tokenizer().path.read_text())
    spec["model"]["merges"] = spec["model"]["merges"][:-200]
    folder.mkdir()
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    return Tokenizer(folder)


@pytest.mark.parametrize("section", ["training", "validation"])
def test_data_of_another_tokenizer_or_a_broken_copy_stops_the_run_before_training(tmp_path, section):
    """Ids of another tokenizer are other text: the run names the key, both tokenizers and the fix; a folder
    missing bytes or meta.json is named too. One line each, nothing trained."""
    other = other_tokenizer(tmp_path / "other")
    docs = pydocs_split("train")[:40]
    assert other.encode(docs[0]) != Tokenizer().encode(docs[0])
    write_pretokenized(docs, other, tmp_path / "foreign", "text", "pydocs")
    write_pretokenized(docs, Tokenizer(), tmp_path / "cut", "text", "pydocs")
    (tmp_path / "cut" / "ends.i64").write_bytes((tmp_path / "cut" / "ends.i64").read_bytes()[:-8])
    (tmp_path / "texts").mkdir()
    write_texts(tmp_path / "texts" / "a.jsonl", docs)
    enable = ["--validation.enable"] if section == "validation" else []
    for folder, message in [("foreign", f"was tokenized with {other.path}"),
                            ("cut", "ends.i64: 320 bytes expected for 40 entries, found 312"),
                            ("texts", "not a pretokenized dataset (no meta.json")]:
        path = str(tmp_path / folder)
        result = run_cli("--job.config_file", DEBUG_TOML, "--parallelism.pipeline_parallel_degree", "1", *enable,
                         f"--{section}.dataset", "pretokenized", f"--{section}.dataset_path", path)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2 and len(lines) == 1 and not result.stdout, result.stderr
        assert f"`{section}.dataset_path` = {path!r}" in lines[0] and message in lines[0], lines[0]
    assert "pretokenize the data again with this run's tokenizer" in run_cli(
        "--job.config_file", DEBUG_TOML, "--training.dataset", "pretokenized", "--training.dataset_path",
        str(tmp_path / "foreign")).stderr


def test_training_on_pretokenized_conversations_equals_training_on_the_files(tmp_path):
    """The trainer (validation included) on the pretokenized folder logs the chat run's losses, gradient
    norms and token counts; with training.shuffle it trains on the shuffled loader's batches (seed 0)."""
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "chat.jsonl", conversations(120))
    assert pretokenize(["--dataset", "chat", "--dataset-path", str(tmp_path / "data"),
                        "--output", str(tmp_path / "tok")]) == 0
    common = ("--training.steps", "2", "--training.seq_len", "256", "--training.local_batch_size", "2",
              "--validation.enable", "--validation.freq", "2", "--validation.steps", "1")
    runs = [run_training(tmp_path / f"run_{dataset}", *common, "--training.dataset", dataset,
                         "--training.dataset_path", str(tmp_path / folder), "--validation.dataset", dataset,
                         "--validation.dataset_path", str(tmp_path / folder))
            for dataset, folder in (("chat", "data"), ("pretokenized", "tok"))]
    for a, b in zip(*runs, strict=True):
        for key in ("loss", "mtp_losses", "valid_tokens", "grad_norm"):
            assert a[key] == b[key], key
        assert a["valid_tokens"] > 0
    assert runs[0][-1]["validation"] == runs[1][-1]["validation"] and runs[0][-1]["validation"]["valid_tokens"] > 0
    shuffled = run_training(tmp_path / "run_shuffled", *common, "--training.dataset", "pretokenized",
                            "--training.dataset_path", str(tmp_path / "tok"), "--training.shuffle")
    loader = build_dataloader("pretokenized", str(tmp_path / "tok"), Tokenizer(), 256, 2, 0, 1, shuffle_seed=0)
    counts = [int((next(loader).labels != IGNORE_INDEX).sum()) for _ in shuffled]
    assert [r["valid_tokens"] for r in shuffled] == counts != [r["valid_tokens"] for r in runs[1]]
