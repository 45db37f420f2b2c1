"""Fine-tuning on conversations: DeepSeek-V4's chat format, the assistant-only labels, resume, errors, and
training under pipeline parallelism with MTP equal to one process."""

import json

import numpy as np
import pytest
import torch

from launch import REPO, read_metrics, run_training, training_command
from titan_dsv4.components.chat import render_conversation, target_mask
from titan_dsv4.components.dataloader import CHAT, DataError, build_dataloader, file_documents, pydocs_split
from titan_dsv4.components.tokenizer import Tokenizer
from titan_dsv4.models.deepseek_v4.mtp import IGNORE_INDEX

BOS, EOS, USER, ASSISTANT = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"
DSML = "｜DSML｜"


def user(text):
    return {"role": "user", "content": text}


def assistant(text, reasoning=None):
    return {"role": "assistant", "content": text, **({"reasoning_content": reasoning} if reasoning else {})}


# Written out by hand from the released encoding/encoding_dsv4.py's rules (encode_messages, drop_thinking=True).
RENDERED = [
    ([{"role": "system", "content": "Be brief."}, user("hello"), assistant("Hi."), user("1+1=?"), assistant("2")],
     f"{BOS}Be brief.{USER}hello{ASSISTANT}</think>Hi.{EOS}{USER}1+1=?{ASSISTANT}</think>2{EOS}",
     [f"Hi.{EOS}", f"2{EOS}"]),
    # thinking: history turns lose their reasoning; the last user's turn opens <think>
    ([user("hello"), assistant("Hello! I am DeepSeek.", "thinking..."), user("1+1=?"), assistant("2", "add")],
     f"{BOS}{USER}hello{ASSISTANT}</think>Hello! I am DeepSeek.{EOS}{USER}1+1=?{ASSISTANT}<think>add</think>2{EOS}",
     [f"Hello! I am DeepSeek.{EOS}", f"add</think>2{EOS}"]),
    # consecutive user messages are one turn; a trailing user turn is context
    ([user("a"), user("b"), assistant("c"), user("d")],
     f"{BOS}{USER}a\n\nb{ASSISTANT}</think>c{EOS}{USER}d{ASSISTANT}</think>", [f"c{EOS}"]),
    # thinking, the last answer without reasoning; a system message mid-way takes the assistant tag's place
    ([user("q"), {"role": "system", "content": "S"}, assistant("x", "r"), user("q2"), assistant("y")],
     f"{BOS}{USER}qSx{EOS}{USER}q2{ASSISTANT}<think></think>y{EOS}", [f"x{EOS}", f"</think>y{EOS}"]),
]


def call(call_id, name, arguments):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def tool(call_id, content):
    return {"role": "tool", "tool_call_id": call_id, "content": content}


def invoke(name, *parameters):
    lines = [f'<{DSML}parameter name="{k}" string="{s}">{v}</{DSML}parameter>' for k, s, v in parameters]
    return f'<{DSML}invoke name="{name}">\n' + "\n".join(lines) + f"\n</{DSML}invoke>"


RENDERED += [
    # an agent's trajectory without tools in the prompt: the tool output is a user turn, so the first answer is
    # history and loses its reasoning; two calls' outputs in the order of the calls, not of the messages
    ([user("weather?"),
      {"role": "assistant", "content": None, "reasoning_content": "look it up",
       "tool_calls": [call("a", "get", '{"city": "Paris", "days": 2}'), call("b", "get", {"city": "Rome"})]},
      tool("b", "sun"), tool("a", "rain"), assistant("Rain, then sun.", "both known")],
     f"{BOS}{USER}weather?{ASSISTANT}</think>"
     f"\n\n<{DSML}tool_calls>\n{invoke('get', ('city', 'true', 'Paris'), ('days', 'false', '2'))}\n"
     f"{invoke('get', ('city', 'true', 'Rome'))}\n</{DSML}tool_calls>{EOS}"
     f"{USER}<tool_result>rain</tool_result>\n\n<tool_result>sun</tool_result>{ASSISTANT}<think>"
     f"both known</think>Rain, then sun.{EOS}",
     [f"\n\n<{DSML}tool_calls>\n{invoke('get', ('city', 'true', 'Paris'), ('days', 'false', '2'))}\n"
      f"{invoke('get', ('city', 'true', 'Rome'))}\n</{DSML}tool_calls>{EOS}",
      f"both known</think>Rain, then sun.{EOS}"]),
    # arguments that are not JSON are one string parameter; a user's text after tool outputs joins their turn
    ([user("q"), {"role": "assistant", "content": "Let me see.", "tool_calls": [call(None, "f", "not json")]},
      tool(None, "out"), user("and?"), assistant("done")],
     f"{BOS}{USER}q{ASSISTANT}</think>Let me see.\n\n<{DSML}tool_calls>\n"
     f"{invoke('f', ('arguments', 'true', 'not json'))}\n</{DSML}tool_calls>{EOS}"
     f"{USER}<tool_result>out</tool_result>\n\nand?{ASSISTANT}</think>done{EOS}",
     [f"Let me see.\n\n<{DSML}tool_calls>\n{invoke('f', ('arguments', 'true', 'not json'))}\n"
      f"</{DSML}tool_calls>{EOS}", f"done{EOS}"]),
]


def developer(text, **keys):
    return {"role": "developer", "content": text, **keys}


FORMAT = "\n\n## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"
RENDERED += [
    # a response format follows the system content; a developer message is a user turn, answered like one
    ([{"role": "system", "content": "S", "response_format": {"type": "object"}}, user("q"), assistant("a"),
      developer("Be formal."), assistant("b")],
     f'{BOS}S{FORMAT}{{"type": "object"}}{USER}q{ASSISTANT}</think>a{EOS}{USER}Be formal.{ASSISTANT}</think>b{EOS}',
     [f"a{EOS}", f"b{EOS}"]),
    # thinking: developer messages before the last user turn are left out, as history reasoning is
    ([developer("D1"), user("q"), assistant("a", "r1"), developer("D2"), user("q2"), assistant("b", "r2")],
     f"{BOS}{USER}q{ASSISTANT}</think>a{EOS}{USER}q2{ASSISTANT}<think>r2</think>b{EOS}",
     [f"a{EOS}", f"r2</think>b{EOS}"]),
    # thinking: a developer message as the last user turn stays, and the answer after it opens <think>
    ([user("q"), assistant("a", "r"), developer("D", response_format={"x": 1}), assistant("b", "s")],
     f'{BOS}{USER}q{ASSISTANT}</think>a{EOS}{USER}D{FORMAT}{{"x": 1}}{ASSISTANT}<think>s</think>b{EOS}',
     [f"a{EOS}", f"s</think>b{EOS}"]),
]


def test_tools_in_the_system_prompt_keep_every_answers_reasoning():
    """With tools the encoder keeps all reasoning: every user turn opens <think>. The tools section follows the
    system content: the released prompt's heading and closing line around one JSON schema per line."""
    schema = {"name": "get", "description": "Weather of a city", "parameters": {"type": "object"}}
    messages = [{"role": "system", "content": "S", "tools": [{"type": "function", "function": schema}]},
                user("weather?"),
                {"role": "assistant", "reasoning_content": "look", "tool_calls": [call("a", "get", "{}")]},
                tool("a", "rain"), assistant("Rain.", "known")]
    conversation = render_conversation(messages)
    head = f"{BOS}S\n\n## Tools\n\nYou have access to a set of tools to help answer the user's question."
    tail = ("### Available Tool Schemas\n\n"
            '{"name": "get", "description": "Weather of a city", "parameters": {"type": "object"}}\n\n'
            "You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.\n"
            f"{USER}weather?{ASSISTANT}<think>look</think>\n\n<{DSML}tool_calls>\n"
            f'<{DSML}invoke name="get">\n\n</{DSML}invoke>\n</{DSML}tool_calls>{EOS}'
            f"{USER}<tool_result>rain</tool_result>{ASSISTANT}<think>known</think>Rain.{EOS}")
    assert conversation.text.startswith(head) and conversation.text.endswith(tail)
    assert f'<{DSML}parameter name="$PARAMETER_NAME" string="true|false">' in conversation.text
    assert [conversation.text[a:b] for a, b in conversation.targets] == [
        f"look</think>\n\n<{DSML}tool_calls>\n<{DSML}invoke name=\"get\">\n\n</{DSML}invoke>\n</{DSML}tool_calls>{EOS}",
        f"known</think>Rain.{EOS}"]


@pytest.mark.parametrize("messages,text,targets", RENDERED)
def test_conversations_render_as_deepseek_v4s_encoder(messages, text, targets):
    conversation = render_conversation(messages)
    assert conversation.text == text
    assert [text[a:b] for a, b in conversation.targets] == targets


def test_target_mask_marks_tokens_starting_in_a_span():
    starts = np.array([0, 2, 2, 5, 7, 9, 12])
    assert target_mask(starts, [(2, 7), (9, 10)]).tolist() == [False, True, True, True, False, True, False]
    assert target_mask(starts, []).tolist() == [False] * 7


def conversations(count, seed=0):
    """Real-text conversations of uneven shape: a prompt (part of an embedded document, the whole of it a few
    times over now and then), a short answer (its first sentence), some with reasoning, a second turn, or a
    tool call and its output first."""
    docs, rng = pydocs_split("train"), np.random.default_rng(seed)
    result = []
    for i in range(count):
        doc = docs[i % len(docs)]
        answer = doc.split(".")[0] + "."
        prompt = doc[:rng.integers(50, 400)] if i % 7 else (doc + " ") * 4  # a long one now and then
        messages = [user("Summarise: " + prompt)]
        if i % 5 == 2:
            messages += [{"role": "assistant", "tool_calls": [call(f"c{i}", "count_words", {"text": prompt[:40]})]},
                         tool(f"c{i}", str(len(prompt.split())))]
        messages.append(assistant(answer, "It starts with the answer." if i % 3 == 0 else None))
        if i % 4 == 1:
            messages += [user("Shorter?"), assistant(answer[:30])]
        result.append(messages)
    return result


def write_jsonl(path, chats):
    path.write_text("".join(json.dumps({"id": i, "messages": m}) + "\n" for i, m in enumerate(chats)))


def test_conversations_are_never_split_and_only_answers_are_labels(tmp_path):
    """Each sequence holds whole conversations (its first token may be the previous sequence's last one, the
    windows' overlap), in order, as the tokenizer encodes their text; a conversation that does not fit in the
    rest of a sequence starts the next, the gap EOS padding without labels; one longer than a sequence is cut
    to it. The labels kept decode to exactly the assistant renderings (a prefix of them when cut). Restoring
    the loader's state continues with the same batches."""
    chats = conversations(60)
    write_jsonl(tmp_path / "c.jsonl", chats)
    tok = Tokenizer()
    seq_len, local = 256, 2
    loader = build_dataloader("chat", str(tmp_path), tok, seq_len, local, 0, 1)
    rows, states = [], []
    while loader.state_dict()["epoch"] == 0:  # one epoch and the start of the next
        states.append(loader.state_dict())
        batch = next(loader)
        rows += zip(batch.input_ids.tolist(), batch.labels.tolist(), batch.positions.tolist())
    seen = []  # per conversation: (tokens, labels kept, padding just before it)
    pads = 0
    for ids, labels, positions in rows:
        assert positions[0] == 0 or positions[1] == 0  # a conversation may only end on the overlap token
        starts = [j for j, p in enumerate(positions) if p == 0] + [seq_len]
        for j, k in zip(starts, starts[1:]):
            kept = [t for t in labels[j:k] if t != IGNORE_INDEX]
            if ids[j] == tok.eos_id:
                assert set(ids[j:k]) == {tok.eos_id} and not kept and k == seq_len
                pads = k - j
                continue
            assert ids[j] == tok.bos_id
            last = [labels[k - 1]] if k == seq_len and labels[k - 1] != IGNORE_INDEX else []
            seen.append((ids[j:k] + last, kept, pads))
            pads = 0
    assert len(seen) >= len(chats)
    cut = 0
    for messages, (tokens, kept, pads) in zip(chats, seen):
        conversation = render_conversation(messages)
        full = tok.encode(conversation.text)
        answers = "".join(conversation.text[a:b] for a, b in conversation.targets)
        decoded = tok._tok.decode(kept, skip_special_tokens=False)
        assert not pads or len(full) > pads + 1  # it would not have fit after the previous one
        if len(full) <= seq_len + 1:
            assert tokens == full and decoded == answers
        else:
            assert tokens == full[:len(tokens)] and len(tokens) >= seq_len
            assert answers.startswith(decoded.rstrip("\ufffd"))  # the cut may split a character's bytes
            cut += 1
    assert 0 < cut < len(chats) / 2 and sum(p > 0 for *_, p in seen) > 10

    for at in (3, 11):
        resumed = build_dataloader("chat", str(tmp_path), tok, seq_len, local, 0, 1)
        resumed.load_state_dict(states[at])
        for step in range(at, at + 3):
            batch = next(resumed)
            for row, (ids, labels, positions) in enumerate(rows[step * local:(step + 1) * local]):
                assert batch.input_ids[row].tolist() == ids and batch.labels[row].tolist() == labels
                assert batch.positions[row].tolist() == positions


def test_a_text_loader_state_without_label_flags_still_resumes(tmp_path):
    """Checkpoints written before conversations hold no per-token label flags: a text document's tokens after
    its first are labels."""
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in pydocs_split("train")[:30]))
    loader = build_dataloader("text", str(tmp_path), Tokenizer(), 48, 2, 0, 1)
    next(loader)
    state = {k: v for k, v in loader.state_dict().items() if k != "trained"}
    resumed = build_dataloader("text", str(tmp_path), Tokenizer(), 48, 2, 0, 1)
    resumed.load_state_dict(state)
    for _ in range(3):
        want, got = next(loader), next(resumed)
        assert torch.equal(want.labels, got.labels) and torch.equal(want.input_ids, got.input_ids)


def test_parquet_conversations_read_as_jsonl_ones(tmp_path):
    """pyarrow stores messages as structs, filling keys a message lacks with nulls: read as absent."""
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    chats = conversations(9)
    pq.write_table(pa.table({"messages": chats}), tmp_path / "c.parquet", row_group_size=4)
    assert list(file_documents(tmp_path / "c.parquet", 2, CHAT)) == [render_conversation(m) for m in chats[2:]]


@pytest.mark.parametrize("record,message", [
    ({"text": "plain"}, r"c.jsonl:2: a jsonl record needs a 'messages' list \(found \['text'\]\)"),
    ({"messages": "hi"}, r"c.jsonl:2: 'messages' must be a non-empty list of messages, not 'hi'"),
    ({"messages": [user("q")]}, r"c.jsonl:2: the conversation has no assistant message"),
    ({"messages": [user("q"), {"role": "latest_reminder", "content": "x"}]},
     r"c.jsonl:2: message 1 has role 'latest_reminder'; allowed: system, developer, user, assistant, tool"),
    ({"messages": [user("q"), {"role": "developer", "content": ""}, assistant("x")]},
     r"c.jsonl:2: message 1 \(developer\) needs a non-empty string 'content'"),
    ({"messages": [user("q"), {"role": "assistant", "content": "", "weight": 0}]},
     r"c.jsonl:2: message 1 \(assistant\) has keys \['weight'\]; allowed: \['role', 'content', 'reasoning_content', "
     r"'tool_calls'\]"),
    ({"messages": [user("q"), {"role": "assistant", "tool_calls": [{"name": "f"}]}]},
     r"c.jsonl:2: message 1 \(assistant\) has 'tool_calls' = \[\{'name': 'f'\}\]: a list of \{'function': "
     r"\{'name', 'arguments', ...\}\}"),
    ({"messages": [user("q"), {"role": "assistant", "tool_calls": [call("a", "f", "[1, 2]")]}]},
     r"c.jsonl:2: tool call arguments \[1, 2\] are not a JSON object"),
    ({"messages": [user("q"), tool("a", None), assistant("x")]},
     r"c.jsonl:2: message 1 \(tool\) needs a string 'content'"),
    ({"messages": [{"role": "user", "content": ["a"]}, assistant("b")]},
     r"c.jsonl:2: message 0 \(user\) has 'content' = \['a'\], not a string"),
    ({"messages": [{"role": "user", "content": "q", "reasoning_content": "r"}, assistant("b")]},
     r"c.jsonl:2: message 0 \(user\) has keys \['reasoning_content'\]; allowed: \['role', 'content'\]"),
])
def test_malformed_conversations_name_their_file_line_and_message(tmp_path, record, message):
    write_jsonl(tmp_path / "c.jsonl", conversations(1))
    with (tmp_path / "c.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")
    with pytest.raises(DataError, match=message):
        list(file_documents(tmp_path, 0, CHAT))


@pytest.mark.slow
def test_fine_tuning_on_conversations_pipelined_with_mtp_equals_one_process(tmp_path):
    """The microbatches hold very different numbers of assistant tokens; the loss is normalised by the global
    count, so the 2-stage pipeline (4 microbatches, MTP on the last stage) gives one process's losses and
    gradient norm, and the valid-token count is the loader's assistant labels."""
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "chat.jsonl", conversations(200))
    args = ("--training.dataset", "chat", "--training.dataset_path", str(tmp_path / "data"),
            "--training.steps", "3", "--training.seq_len", "256", "--training.local_batch_size", "4",
            "--validation.enable", "--validation.dataset", "chat", "--validation.dataset_path", str(tmp_path / "data"),
            "--validation.freq", "3", "--validation.steps", "1")
    single = run_training(tmp_path / "one", *args)
    piped = run_training(tmp_path / "pp", *args, "--parallelism.pipeline_parallel_degree", "2",
                         "--parallelism.pipeline_parallel_microbatch_size", "1", nproc=2)
    loader = build_dataloader("chat", str(tmp_path / "data"), Tokenizer(), 256, 4, 0, 1)
    for a, b in zip(single, piped, strict=True):
        batch = next(loader)
        assert a["valid_tokens"] == b["valid_tokens"] == int((batch.labels != IGNORE_INDEX).sum())
        assert 0 < a["valid_tokens"] < 4 * 256 / 2  # most tokens are prompts
        for key in ("loss", "total_loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), key
        assert b["mtp_losses"] == pytest.approx(a["mtp_losses"], rel=1e-5)
    for key in ("loss", "mtp_losses", "valid_tokens"):  # after 3 AdamW steps summed in other orders
        assert piped[-1]["validation"][key] == pytest.approx(single[-1]["validation"][key], rel=2e-5), key


def test_cut_conversations_are_reported_and_a_batch_without_answers_trains_nothing(tmp_path):
    """Sequences shorter than some conversations: rank 0 says so once per data section, after the run's first
    line; a step whose batch holds no answer token (conversations cut before their answers) logs zero loss,
    gradient and tokens instead of stopping on 0/0, and training goes on."""
    import subprocess

    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "chat.jsonl", conversations(200))
    data = ("--training.dataset", "chat", "--training.dataset_path", str(tmp_path / "data"))
    cmd, env = training_command(tmp_path / "run", *data, "--training.steps", "3", "--training.seq_len", "128",
                                "--training.local_batch_size", "4", "--validation.enable", "--validation.dataset",
                                "chat", "--validation.dataset_path", str(tmp_path / "data"), "--validation.steps", "1")
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("titan_dsv4: DeepSeek-V4 debug model")
    cut = [line for line in lines if "conversations longer than training.seq_len + 1 = 129 tokens are cut" in line]
    assert len(cut) == 2 and "validation data" in cut[0] and "training data" in cut[1]
    records = read_metrics(tmp_path / "run")
    loader = build_dataloader("chat", str(tmp_path / "data"), Tokenizer(), 128, 4, 0, 1)
    assert [r["valid_tokens"] for r in records] == [int((next(loader).labels != IGNORE_INDEX).sum()) for _ in records]
    empty = [r for r in records if r["valid_tokens"] == 0]
    assert empty and all(r["loss"] == r["grad_norm"] == 0 and r["mtp_losses"] == [0] for r in empty)
    assert records[-1]["loss"] > 0
