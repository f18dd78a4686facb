"""Chat data in the layouts users have it, mapped to the one conversation format lorakit trains on.

That format is a list of `{"role": "system" | "user" | "assistant" | ..., "content": str}` turns
(the `messages` column), rendered with the tokenizer's chat template; the loss is on the
assistant turns. Two other layouts are common and map onto it:

- ShareGPT: `{"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", ...}]}`,
  optionally with a top-level `system` prompt. Speaker names map to roles with `SHAREGPT_ROLES`.
- Alpaca: `{"instruction": ..., "input": ..., "output": ...}`: one user turn (the instruction,
  then the input after a blank line when there is one) and one assistant turn (the output);
  an optional `system` field becomes a system turn.

`detect_chat_format` names the layout of a record; `to_messages` converts one record.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lorakit.errors import ConfigError

SHAREGPT_ROLES: dict[str, str] = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
}
"""ShareGPT speaker names (`from`, lowercased) -> chat roles."""

SHAREGPT_COLUMN = "conversations"
ALPACA_COLUMNS = ("instruction", "output")  # required; "input" and "system" are optional


def detect_chat_format(record: Mapping[str, Any], messages_column: str, prompt_column: str) -> str | None:
    """The sft layout of `record`: "messages", "prompt-completion", "sharegpt", "alpaca", or None.

    Columns the user named win over the other layouts' fixed names: a record with
    `messages_column` is "messages", one with `prompt_column` is "prompt-completion"; then a
    `conversations` list makes it "sharegpt", `instruction` and `output` make it "alpaca".
    """
    if messages_column in record:
        return "messages"
    if prompt_column in record:
        return "prompt-completion"
    if isinstance(record.get(SHAREGPT_COLUMN), list):
        return "sharegpt"
    if all(c in record for c in ALPACA_COLUMNS):
        return "alpaca"
    return None


def to_messages(
    record: Mapping[str, Any], chat_format: str, i: int, source: str, messages_column: str = "messages"
) -> list[dict[str, str]]:
    """Record `i` of `source` as a list of role/content turns, whatever its chat layout.

    `chat_format` is "messages" (the list in `messages_column`, returned as it is), "sharegpt"
    or "alpaca"; `detect_chat_format` names it for a record. Every command that takes chat
    data (training, evaluation, generation from a file) reads conversations through here.

    Raises:
        ConfigError: the record lacks the layout's columns, a turn is not a `from`/`value`
            object, a speaker name is not in `SHAREGPT_ROLES`, or a text is not a string.
    """
    if chat_format == "messages":
        if messages_column not in record:
            have = ", ".join(repr(k) for k in record) or "(none)"
            raise ConfigError(
                f"Record {i} of {source} has no column {messages_column!r} (--messages-column). "
                f"Columns present: {have}."
            )
        return record[messages_column]
    if chat_format == "sharegpt":
        return _sharegpt(record, i, source)
    if chat_format == "alpaca":
        return _alpaca(record, i, source)
    raise ValueError(f"to_messages reads messages, sharegpt or alpaca records, not {chat_format!r}")


def _sharegpt(record: Mapping[str, Any], i: int, source: str) -> list[dict[str, str]]:
    turns = record.get(SHAREGPT_COLUMN)
    if not isinstance(turns, list):
        have = ", ".join(repr(k) for k in record) or "(none)"
        raise ConfigError(
            f"Record {i} of {source} has no {SHAREGPT_COLUMN!r} list, which ShareGPT data "
            f"(--chat-format sharegpt) needs. Columns present: {have}."
        )
    messages = []
    system = record.get("system")
    if isinstance(system, str) and system.strip():
        messages.append({"role": "system", "content": system})
    for k, turn in enumerate(turns):
        if isinstance(turn, Mapping) and "role" in turn and "content" in turn:
            speaker, text = turn["role"], turn["content"]  # already role/content inside conversations
        elif isinstance(turn, Mapping) and "from" in turn and "value" in turn:
            speaker, text = turn["from"], turn["value"]
        else:
            raise ConfigError(
                f"Record {i} of {source}: turn {k} of {SHAREGPT_COLUMN!r} must be an object with "
                f"'from' and 'value' (ShareGPT), got {turn!r:.80}."
            )
        role = SHAREGPT_ROLES.get(str(speaker).strip().lower())
        if role is None:
            raise ConfigError(
                f"Record {i} of {source}: turn {k} is from {speaker!r}, a speaker lorakit cannot map "
                f"to a chat role. Known speakers: {', '.join(SHAREGPT_ROLES)}. Rename it in the data, "
                f"or convert the data to a 'messages' column of role/content turns."
            )
        if not isinstance(text, str):
            raise ConfigError(
                f"Record {i} of {source}: turn {k}'s 'value' is a {type(text).__name__}, expected text."
            )
        messages.append({"role": role, "content": text})
    return messages


def _alpaca(record: Mapping[str, Any], i: int, source: str) -> list[dict[str, str]]:
    missing = [c for c in ALPACA_COLUMNS if c not in record]
    if missing:
        have = ", ".join(repr(k) for k in record) or "(none)"
        raise ConfigError(
            f"Record {i} of {source} has no {' or '.join(map(repr, missing))} column, which Alpaca "
            f"data (--chat-format alpaca) needs. Columns present: {have}."
        )
    texts = {}
    for column in ("instruction", "input", "output", "system"):
        value = record.get(column)
        if value is None:
            value = ""
        if not isinstance(value, str):
            raise ConfigError(
                f"Column {column!r} of record {i} in {source} is a {type(value).__name__}, expected text."
            )
        texts[column] = value
    prompt = texts["instruction"]
    if texts["input"].strip():
        prompt = f"{prompt}\n\n{texts['input']}" if prompt else texts["input"]
    messages = [{"role": "system", "content": texts["system"]}] if texts["system"].strip() else []
    return messages + [{"role": "user", "content": prompt}, {"role": "assistant", "content": texts["output"]}]
