"""DeepSeek-V4's chat format, for fine-tuning on conversations.

A conversation renders as the released checkpoint's ``encoding/encoding_dsv4.py`` renders it for the model
(``encode_messages`` with its default ``drop_thinking=True``), so the model trains on exactly the text an
inference server gives it::

    <BOS>{system}<｜User｜>{user}<｜Assistant｜></think>{answer}<EOS><｜User｜>{user}<｜Assistant｜></think>...

Consecutive user and tool messages are one user turn, their parts joined by blank lines (a tool's output as
``<tool_result>...</tool_result>``, in the order of the calls). An assistant's tool calls follow its answer as
a DSML block; a system message's ``tools`` and ``response_format`` follow its content as the encoder's tools
and response-format sections. A developer message is rendered as a system one would be, but as a user turn
(``<｜User｜>{content}...``). In thinking mode (some assistant message has ``reasoning_content``) the user turn
the model answers after ends in ``<think>`` and the answers after it render ``{reasoning}</think>{answer}<EOS>``;
earlier answers lose their reasoning and earlier developer messages are left out, as in a served
conversation's history, unless the conversation has tools (then every answer keeps its reasoning and every
user turn opens ``<think>``). The model is trained on what it would generate: each assistant message's
rendering, its closing EOS included; the rest is context.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .tokenizer import BOS, EOS

USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
THINK_START, THINK_END = "<think>", "</think>"
DSML = "｜DSML｜"
MESSAGE_KEYS = {  # role -> the keys its messages may have
    "system": ("role", "content", "tools", "response_format"),
    "developer": ("role", "content", "tools", "response_format"),
    "user": ("role", "content"),
    "assistant": ("role", "content", "reasoning_content", "tool_calls"),
    "tool": ("role", "content", "tool_call_id", "name"),
}
TOOLS_SECTION = """## Tools

You have access to a set of tools to help answer the user's question. You can invoke tools by writing a \
"<{dsml}tool_calls>" block like the following:

<{dsml}tool_calls>
<{dsml}invoke name="$TOOL_NAME">
<{dsml}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{dsml}parameter>
...
</{dsml}invoke>
<{dsml}invoke name="$TOOL_NAME2">
...
</{dsml}invoke>
</{dsml}tool_calls>

String parameters should be specified as is and set `string="true"`. For all other types (numbers, booleans, \
arrays, objects), pass the value in JSON format and set `string="false"`.

If thinking_mode is enabled (triggered by {think_start}), you MUST output your complete reasoning inside \
{think_start}...{think_end} BEFORE any tool calls or final response.

Otherwise, output directly after {think_end} with tool calls or final response.

### Available Tool Schemas

{schemas}

You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.
"""
RESPONSE_FORMAT = "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n{schema}"


@dataclass(frozen=True)
class Conversation:
    """A rendered conversation and the character spans ``[start, end)`` of ``text`` the model is trained to
    produce (the assistant messages)."""

    text: str
    targets: tuple[tuple[int, int], ...]


def render_conversation(messages: object) -> Conversation:
    """``messages``: OpenAI-style messages (a key set to null counts as absent), at least one from the
    assistant: ``system`` (``content``, optional ``tools``: ``[{"type": "function", "function": {...}}]`` and
    ``response_format``, a JSON schema), ``developer`` (as system, a user turn in the prompt), ``user``
    (``content``), ``assistant`` (``content``, optional ``reasoning_content`` and ``tool_calls``: ``[{"id": ...,
    "function": {"name": ..., "arguments": JSON text or object}}]``) and ``tool`` (``content``, optional
    ``tool_call_id``). Raises ValueError naming the message and key that do not fit."""
    _check_messages(messages)
    turns = _turns(messages)
    thinking = any(m.get("reasoning_content") for m in messages)
    keep_reasoning = any(m.get("tools") for m in messages)  # the encoder's drop_thinking is off with tools
    last_user = _last_user(turns)
    if thinking and not keep_reasoning:  # the encoder drops the developer messages of earlier turns
        turns = [turn for i, turn in enumerate(turns) if turn[0] != "developer" or i >= last_user]
        last_user = _last_user(turns)
    text, targets = [BOS], []
    length = len(BOS)
    for i, (role, message) in enumerate(turns):
        if role == "assistant":
            reasoning = message.get("reasoning_content") or ""
            piece = (reasoning + THINK_END if thinking and (keep_reasoning or i > last_user) else "")
            piece += (message.get("content") or "") + _tool_calls(message.get("tool_calls")) + EOS
            targets.append((length, length + len(piece)))
        else:
            if role == "user":
                piece = USER + "\n\n".join(message)
            else:
                piece = (USER if role == "developer" else "") + (message.get("content") or "")
                piece += _tools_section(message.get("tools")) + _response_format(message.get("response_format"))
            if role != "system" and (i + 1 == len(turns) or turns[i + 1][0] == "assistant"):
                opens = thinking and (keep_reasoning or i >= last_user)
                piece += ASSISTANT + (THINK_START if opens else THINK_END)
        text.append(piece)
        length += len(piece)
    return Conversation("".join(text), tuple(targets))


def _last_user(turns: list[tuple[str, object]]) -> int:
    """The index of the last user or developer turn (-1: none)."""
    return max((i for i, (role, _) in enumerate(turns) if role in ("user", "developer")), default=-1)


def _turns(messages: list[dict]) -> list[tuple[str, object]]:
    """``(role, message)``, each run of user and tool messages merged into one user turn: the list of its
    parts."""
    turns: list[tuple[str, object, dict[str, int]]] = []
    call_order: dict[str, int] = {}  # the latest tool calls' ids -> their order
    for message in messages:
        role = message["role"]
        if role in ("user", "tool"):
            if not turns or turns[-1][0] != "user":
                turns.append(("user", [], call_order))
            turns[-1][1].append(message)
            continue
        turns.append((role, message, call_order))
        if role == "assistant" and message.get("tool_calls"):
            ids = [call.get("id") or call["function"].get("id") for call in message["tool_calls"]]
            call_order = {call_id: k for k, call_id in enumerate(ids) if call_id}
    return [(role, _user_parts(message, order) if role == "user" else message) for role, message, order in turns]


def _user_parts(messages: list[dict], call_order: dict[str, int]) -> list[str]:
    """A user turn's parts: user text as it is, tool outputs as ``<tool_result>``, these in the order of the
    calls that asked for them (the rest keep theirs) in the tool outputs' places."""
    results = iter(sorted((m for m in messages if m["role"] == "tool"),
                          key=lambda m: call_order.get(m.get("tool_call_id") or "", 0)))
    return [f"<tool_result>{next(results)['content']}</tool_result>" if m["role"] == "tool" else m["content"]
            for m in messages]


def _tool_calls(calls: list[dict] | None) -> str:
    if not calls:
        return ""
    invokes = [f'<{DSML}invoke name="{call["function"]["name"]}">\n{_parameters(call["function"]["arguments"])}'
               f"\n</{DSML}invoke>" for call in calls]
    return f"\n\n<{DSML}tool_calls>\n" + "\n".join(invokes) + f"\n</{DSML}tool_calls>"


def _parameters(arguments: str | dict) -> str:
    """One DSML parameter per argument: strings as they are, other values as JSON. Arguments that are not a
    JSON object's text are one string parameter ``arguments``, as the encoder does."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            arguments = {"arguments": arguments}
    if not isinstance(arguments, dict):
        raise ValueError(f"tool call arguments {_shown(arguments)} are not a JSON object")
    return "\n".join(f'<{DSML}parameter name="{key}" string="{str(isinstance(value, str)).lower()}">'
                     f"{value if isinstance(value, str) else _json(value)}</{DSML}parameter>"
                     for key, value in arguments.items())


def _tools_section(tools: list[dict] | None) -> str:
    if not tools:
        return ""
    schemas = "\n".join(_json(tool["function"]) for tool in tools)
    return "\n\n" + TOOLS_SECTION.format(dsml=DSML, think_start=THINK_START, think_end=THINK_END, schemas=schemas)


def _response_format(schema: object) -> str:
    return "\n\n" + RESPONSE_FORMAT.format(schema=_json(schema)) if schema else ""


def _json(value: object) -> str:
    return json.dumps(value, ensure_ascii=False)


def _check_messages(messages: object) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"'messages' must be a non-empty list of messages, not {_shown(messages)}")
    for i, message in enumerate(messages):
        where = f"message {i}"
        if not isinstance(message, dict):
            raise ValueError(f"{where} is {_shown(message)}, not an object with a 'role'")
        role = message.get("role")
        if role not in MESSAGE_KEYS:
            raise ValueError(f"{where} has role {role!r}; allowed: {', '.join(MESSAGE_KEYS)}")
        unknown = sorted(k for k, v in message.items() if k not in MESSAGE_KEYS[role] and v is not None)
        if unknown:
            raise ValueError(f"{where} ({role}) has keys {unknown}; allowed: {list(MESSAGE_KEYS[role])}")
        where = f"{where} ({role})"
        for key in ("content", "reasoning_content", "tool_call_id"):
            if message.get(key) is not None and not isinstance(message[key], str):
                raise ValueError(f"{where} has {key!r} = {_shown(message[key])}, not a string")
        if role in ("user", "tool") and not isinstance(message.get("content"), str):
            raise ValueError(f"{where} needs a string 'content'")
        if role == "developer" and not message.get("content"):
            raise ValueError(f"{where} needs a non-empty string 'content'")
        for key, inner in (("tools", ("name",)), ("tool_calls", ("name", "arguments"))):
            entries = message.get(key)
            if entries is not None and not (isinstance(entries, list) and all(
                    isinstance(e, dict) and isinstance(e.get("function"), dict)
                    and all(k in e["function"] for k in inner) for e in entries)):
                raise ValueError(f"{where} has {key!r} = {_shown(entries)}: a list of "
                                 f"{{'function': {{{', '.join(repr(k) for k in inner)}, ...}}}}")
        for call in message.get("tool_calls") or ():
            if not isinstance(call["function"]["arguments"], (str, dict)):
                raise ValueError(f"{where}: tool call arguments {_shown(call['function']['arguments'])} are not a "
                                 "JSON object or its text")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("the conversation has no assistant message: nothing to train on")


def _shown(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def target_mask(starts: np.ndarray, targets: Sequence[tuple[int, int]]) -> np.ndarray:
    """Per token (its first character at ``starts[i]``): does it begin inside a target span (the spans in
    ascending order)?"""
    spans = np.array(targets, dtype=np.int64).reshape(-1, 2)
    span = np.searchsorted(spans[:, 0], starts, side="right") - 1
    return (span >= 0) & (starts < spans[np.maximum(span, 0), 1]) if len(spans) else np.zeros(len(starts), bool)
