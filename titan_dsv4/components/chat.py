"""DeepSeek-V4's chat format, for fine-tuning on conversations.

A conversation renders as the released checkpoint's ``encoding/encoding_dsv4.py`` renders it for the model
(``encode_messages`` with its default ``drop_thinking=True``), so the model trains on exactly the text an
inference server gives it::

    <BOS>{system}<｜User｜>{user}<｜Assistant｜></think>{answer}<EOS><｜User｜>{user}<｜Assistant｜></think>...

In thinking mode (some assistant message has ``reasoning_content``) the user message after which the model
answers last ends in ``<think>`` instead, and the assistant messages after it render
``{reasoning}</think>{answer}<EOS>``; earlier assistant messages lose their reasoning, as in a served
conversation's history. The model is trained on what it would generate: each assistant message's rendering,
its closing EOS included; the rest is context.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .tokenizer import BOS, EOS

USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
THINK_START, THINK_END = "<think>", "</think>"
ROLES = ("system", "user", "assistant")
MESSAGE_KEYS = ("role", "content", "reasoning_content")


@dataclass(frozen=True)
class Conversation:
    """A rendered conversation and the character spans ``[start, end)`` of ``text`` the model is trained to
    produce (the assistant messages)."""

    text: str
    targets: tuple[tuple[int, int], ...]


def render_conversation(messages: object) -> Conversation:
    """``messages``: a list of ``{"role": "system" | "user" | "assistant", "content": str}``, an assistant
    message optionally with ``"reasoning_content": str``; at least one assistant message. Raises ValueError
    naming the message and key that do not fit (tool calls are not part of this format yet)."""
    _check_messages(messages)
    thinking = any(m.get("reasoning_content") for m in messages)
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    text, targets = [BOS], []
    length = len(BOS)
    for i, message in enumerate(messages):
        role, content = message["role"], message.get("content") or ""
        if role == "assistant":
            reasoning = message.get("reasoning_content") or ""
            piece = (reasoning + THINK_END if thinking and i > last_user else "") + content + EOS
            targets.append((length, length + len(piece)))
        elif role == "user":
            piece = USER + content
            if i + 1 == len(messages) or messages[i + 1]["role"] == "assistant":
                piece += ASSISTANT + (THINK_START if thinking and i >= last_user else THINK_END)
        else:
            piece = content
        text.append(piece)
        length += len(piece)
    return Conversation("".join(text), tuple(targets))


def _check_messages(messages: object) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"'messages' must be a non-empty list of messages, not {_shown(messages)}")
    for i, message in enumerate(messages):
        where = f"message {i}"
        if not isinstance(message, dict):
            raise ValueError(f"{where} is {_shown(message)}, not an object with keys {list(MESSAGE_KEYS)}")
        unknown = sorted(k for k, v in message.items() if k not in MESSAGE_KEYS and v is not None)
        if unknown:
            raise ValueError(f"{where} has keys {unknown}; a message has {list(MESSAGE_KEYS)}")
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"{where} has role {role!r}; allowed: {', '.join(ROLES)}")
        for key in ("content", "reasoning_content"):
            if message.get(key) is not None and not isinstance(message[key], str):
                raise ValueError(f"{where} ({role}) has {key!r} = {_shown(message[key])}, not a string")
        if role != "assistant" and message.get("reasoning_content") is not None:
            raise ValueError(f"{where} ({role}) has 'reasoning_content': only assistant messages reason")
        if role != "assistant" and not isinstance(message.get("content"), str):
            raise ValueError(f"{where} ({role}) needs a string 'content'")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("the conversation has no assistant message: nothing to train on")


def _shown(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def target_mask(starts: np.ndarray, targets: Sequence[tuple[int, int]]) -> np.ndarray:
    """Per token (its first character at ``starts[i]``, ascending): does it begin inside a target span?"""
    spans = np.array(targets, dtype=np.int64).reshape(-1, 2)
    span = np.searchsorted(spans[:, 0], starts, side="right") - 1
    return (span >= 0) & (starts < spans[np.maximum(span, 0), 1]) if len(spans) else np.zeros(len(starts), bool)
