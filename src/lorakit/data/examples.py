"""Turn records into token-id examples for one task, with the loss mask and the label ids.

An example is a dict of Python lists / scalars (the collator makes tensors):

- sft / lm: `input_ids: list[int]`, `labels: list[int]` of the same length, -100 where the
  loss is off (prompt tokens, chat turns that are not the assistant's). Labels are not
  shifted: the model shifts them, as Hugging Face causal LMs do.
- classification: `input_ids`, optionally `token_type_ids`, and `labels: int` (a class id).
- regression: the same with `labels: float`.

Sequences over `max_length` are cut from the right and counted in `DataStats`; an sft
example left with no loss token is dropped (and counted), since it would teach nothing and
make a batch's mean loss 0/0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lorakit.data.chat import detect_chat_format, to_messages
from lorakit.data.config import DataConfig
from lorakit.errors import ConfigError

IGNORE_INDEX = -100  # label value that torch.nn.functional.cross_entropy skips


@dataclass
class DataStats:
    """What tokenization did to a dataset. Nothing is printed; callers report these."""

    num_records: int = 0
    """Records given."""
    num_examples: int = 0
    """Examples returned (records minus the dropped ones)."""
    num_truncated: int = 0
    """Examples cut to max_length."""
    num_dropped: int = 0
    """sft examples dropped because truncation left no completion token."""
    num_tokens: int = 0
    """Tokens over all returned examples, after truncation."""
    num_loss_tokens: int = 0
    """sft / lm: tokens that carry a loss (label != -100)."""
    longest: int = 0
    """Longest example before truncation, in tokens."""
    label_names: list[str] | None = None
    """classification: class names in id order (pass them back to tokenize a dev split)."""
    chat_turns: str | None = None
    """sft with chat messages: "all" (every assistant turn is in the loss) or "last" (the
    template does not render conversations as prefixes of one another, so only the last
    assistant turn is)."""
    notes: list[str] = field(default_factory=list)
    """Anything else worth telling the user."""

    def describe(self) -> str:
        """One line for logs, e.g. '872 examples, 3 truncated to max_length, longest 67 tokens'."""
        parts = [f"{self.num_examples} examples"]
        if self.num_truncated:
            parts.append(f"{self.num_truncated} truncated to max_length")
        if self.num_dropped:
            parts.append(f"{self.num_dropped} dropped (no completion token left)")
        parts.append(f"longest {self.longest} tokens")
        if self.label_names is not None:
            parts.append(f"{len(self.label_names)} classes")
        return ", ".join(parts + self.notes)


def build_examples(
    records: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    config: DataConfig,
    *,
    label_names: Sequence[str] | None = None,
    source: str = "the dataset",
) -> tuple[list[dict[str, Any]], DataStats]:
    """Tokenize records for `config.task`.

    Args:
        records: from `load_records`.
        tokenizer: a Hugging Face tokenizer (callable, with `eos_token_id`; chat data also
            needs `apply_chat_template` and a chat template).
        config: columns, task, max_length (see `DataConfig`).
        label_names: classification class names in id order, e.g. the training split's
            `stats.label_names` when tokenizing its dev split; overrides `config.labels`.
        source: how error messages name the data (e.g. its path).

    Returns:
        `(examples, stats)`; examples in record order, minus dropped ones.

    Raises:
        ConfigError: no records; a record lacks a needed column (the message lists the
            columns it has); a label is unknown, negative or out of range, or a regression
            score is not a number; chat data without a chat template or assistant turn;
            every example dropped.
    """
    config.validate()
    if len(records) == 0:
        raise ConfigError(f"{source} has no records: nothing to train or evaluate on.")
    stats = DataStats(num_records=len(records))
    task = config.task

    if task == "sft":
        layout = _sft_layout(records[0], config, source)
        chat = layout != "prompt-completion"
        if chat:
            _check_chat_tokenizer(tokenizer, layout)
        per_record: list[list[tuple[str, bool]]] = []
        all_turns = True
        for i, rec in enumerate(records):
            if chat:
                if layout == "messages":
                    messages = _column(rec, config.messages_column, "messages_column", i, source)
                else:
                    messages = to_messages(rec, layout, i, source, config.messages_column)
                segments, every = _chat_segments(tokenizer, messages, i, source)
                all_turns = all_turns and every
            else:
                prompt = _text(rec, config.prompt_column, "prompt_column", i, source)
                completion = _text(rec, config.completion_column, "completion_column", i, source)
                segments = [(prompt + config.separator, False), (completion, True)]
            per_record.append(segments)
        examples = _sft_examples(tokenizer, per_record, config, chat, stats)
        if chat:
            stats.chat_turns = "all" if all_turns else "last"
            if not all_turns:
                stats.notes.append(
                    "chat template is not prefix-stable: loss on last assistant turn only"
                )
    elif task == "lm":
        texts = [
            _text(r, config.text_column, "text_column", i, source) for i, r in enumerate(records)
        ]
        eos = _eos(tokenizer, config)
        examples = []
        for ids in _encode_many(tokenizer, texts, special=True):
            ids = ids + eos
            examples.append(_sft_example_from_ids(ids, list(ids), config, stats))
    else:
        examples = _sequence_examples(records, tokenizer, config, label_names, source, stats)

    examples = [ex for ex in examples if ex is not None]
    stats.num_examples = len(examples)
    stats.num_tokens = sum(len(ex["input_ids"]) for ex in examples)
    if task in ("sft", "lm"):
        stats.num_loss_tokens = sum(
            sum(1 for t in ex["labels"] if t != IGNORE_INDEX) for ex in examples
        )
    if not examples:
        raise ConfigError(
            f"Every example of {source} was dropped: after truncation to max_length="
            f"{config.max_length} no completion token is left. Raise max_length or shorten "
            f"the prompts."
        )
    return examples, stats


def resolve_labels(
    values: Sequence[Any],
    names: Sequence[str] | None = None,
    *,
    source: str = "the dataset",
    column: str = "label",
) -> tuple[list[int], list[str]]:
    """Map raw class labels to ids.

    With `names`, a label is one of the names (its id is its position) or an integer id
    into them. Without, integer labels (ints or strings such as "1") are the ids and the
    names are "0".."max"; any other labels are strings whose sorted unique values become
    the names.

    Returns:
        `(ids, names)`, ids in the order of `values`.

    Raises:
        ConfigError: a missing/empty label, a negative id (GLUE test splits mark "no label"
            with -1), an id >= len(names), or a string that is not one of `names`.
    """
    for i, v in enumerate(values):
        if v is None or (isinstance(v, str) and not v.strip()):
            raise ConfigError(
                f"Record {i} of {source} has an empty {column!r}. Unlabeled data (e.g. a GLUE "
                f"test split) cannot be used for classification training or evaluation."
            )
    ints = [_as_int(v) for v in values]

    if names is not None:
        names = [str(n) for n in names]
        index = {n: k for k, n in enumerate(names)}
        ids = []
        for i, (v, iv) in enumerate(zip(values, ints, strict=True)):
            key = str(v).strip()
            if key in index:
                ids.append(index[key])
            elif iv is not None and 0 <= iv < len(names):
                ids.append(iv)
            elif iv is not None:
                raise ConfigError(
                    f"Label {iv} of record {i} in {source} is out of range for {len(names)} "
                    f"classes ({', '.join(names)}): ids must be 0..{len(names) - 1}. Fix the "
                    f"labels or the class list (--labels)."
                )
            else:
                raise ConfigError(
                    f"Unknown label {key!r} in record {i} of {source}; the known classes are: "
                    f"{', '.join(names)}. Add it to the class list (--labels) or fix "
                    f"the data."
                )
        return ids, names

    if all(iv is not None for iv in ints):
        bad = [(i, iv) for i, iv in enumerate(ints) if iv < 0]
        if bad:
            i, iv = bad[0]
            raise ConfigError(
                f"Label {iv} of record {i} in {source} is out of range: class ids must be >= 0 "
                f"({len(bad)} records have negative labels). GLUE test splits use -1 for "
                f"'no label'; use a labeled split (train/dev) instead."
            )
        return list(ints), [str(k) for k in range(max(ints) + 1)]

    names = sorted({str(v).strip() for v in values})
    index = {n: k for k, n in enumerate(names)}
    return [index[str(v).strip()] for v in values], names


def chat_prompt_ids(tokenizer: Any, messages: Any, *, source: str = "the conversation") -> list[int]:
    """Token ids of the prompt for the next assistant turn of `messages`, exactly as `build_examples`
    tokenizes a conversation before its last assistant turn.

    When `messages` ends with an assistant turn, that turn is the one to generate (it is left out,
    as a reference to score against); otherwise the reply to the last message is. The ids are
    those training saw: the same chat template, special tokens and segment boundaries.

    Raises:
        ConfigError: no chat template, malformed messages, or a template that cannot render them.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"Cannot render {source}: a conversation needs a chat template and the tokenizer has "
            f"none. Use the tokenizer of an instruct/chat model, or give the prompt as plain text."
        )
    if isinstance(messages, list) and messages and isinstance(messages[-1], Mapping) \
            and messages[-1].get("role") != "assistant":
        # a stand-in reply: only the text before it is kept
        messages = [*messages, {"role": "assistant", "content": "."}]
    segments, _ = _chat_segments(tokenizer, messages, 0, source)
    last = max(k for k, (_, in_loss) in enumerate(segments) if in_loss)
    return [t for ids in _encode_many(tokenizer, [s for s, _ in segments[:last]], special=False) for t in ids]


# ---------------------------------------------------------------------------- internals


def _flag(field: str) -> str:
    """The command-line flag that sets DataConfig.`field`."""
    return "--" + field.replace("_", "-")


def _headerless_hint(rec: Mapping[str, Any]) -> str:
    """A hint for records read from a CSV/TSV whose first row was data, not a header."""
    if rec and all(isinstance(v, str) for v in rec.values()):
        return " If the file has no header row, name its columns with --columns (e.g. --columns text,label)."
    return ""


def _column(rec: Mapping[str, Any], column: str, field: str, i: int, source: str) -> Any:
    if column not in rec:
        have = ", ".join(repr(k) for k in rec) or "(none)"
        raise ConfigError(
            f"Record {i} of {source} has no column {column!r} ({_flag(field)}). Columns "
            f"present: {have}. Pass {_flag(field)} naming one of them, or pick another --task "
            f"(sft needs prompt/completion or chat data, lm needs text, classification and "
            f"regression need text and label).{_headerless_hint(rec)}"
        )
    return rec[column]


def _text(rec: Mapping[str, Any], column: str, field: str, i: int, source: str) -> str:
    value = _column(rec, column, field, i, source)
    if not isinstance(value, str):
        raise ConfigError(
            f"Column {column!r} of record {i} in {source} is a {type(value).__name__}, "
            f"expected text. Point {_flag(field)} at a text column."
        )
    return value


def _sft_layout(rec: Mapping[str, Any], config: DataConfig, source: str) -> str:
    """The chat format of the data: `config.chat_format`, or detected from its first record."""
    if config.chat_format != "auto":
        return config.chat_format
    layout = detect_chat_format(rec, config.messages_column, config.prompt_column)
    if layout is None:
        have = ", ".join(repr(k) for k in rec) or "(none)"
        raise ConfigError(
            f"Record 0 of {source} is in no layout the sft task reads. It needs a "
            f"{config.messages_column!r} list of role/content turns (--messages-column), "
            f"{config.prompt_column!r} and {config.completion_column!r} columns (--prompt-column, "
            f"--completion-column), a 'conversations' list (ShareGPT) or 'instruction' and "
            f"'output' columns (Alpaca). Columns present: {have}. Name the columns with those "
            f"flags, or pick another --task (lm trains on a text column).{_headerless_hint(rec)}"
        )
    return layout


def _as_int(v: Any) -> int | None:
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        return int(v) if v.is_integer() else None
    if isinstance(v, str):
        try:
            return int(v.strip())
        except ValueError:
            return None
    return None


def _encode_many(tokenizer: Any, texts: list[str], special: bool) -> list[list[int]]:
    """Token ids of many texts: one batched call per chunk (the fast tokenizers' Rust batch
    path is several times faster than a call per text)."""
    out: list[list[int]] = []
    for start in range(0, len(texts), _CHUNK):
        chunk = texts[start : start + _CHUNK]
        out += [list(ids) for ids in tokenizer(chunk, add_special_tokens=special)["input_ids"]]
    return out


_CHUNK = 1024  # texts per tokenizer call


def _eos(tokenizer: Any, config: DataConfig) -> list[int]:
    eos = getattr(tokenizer, "eos_token_id", None)
    return [eos] if config.add_eos and eos is not None else []


def _sft_examples(
    tokenizer: Any,
    per_record: list[list[tuple[str, bool]]],
    config: DataConfig,
    chat: bool,
    stats: DataStats,
) -> list[dict[str, Any] | None]:
    """Tokenize each record's (text, in_loss) segments apart and concatenate them.

    Segments are tokenized apart so the prompt/completion boundary is a token boundary, as
    it is at generation time (the prompt is encoded alone and the model continues it).
    Special tokens (e.g. BOS) are added to the first segment only; a chat template writes
    its own. None marks a dropped example.
    """
    # Flatten to two batched calls: first segments (with special tokens unless chat), the rest.
    heads = [segs[0][0] if segs else "" for segs in per_record]
    rest = [text for segs in per_record for text, _ in segs[1:]]
    head_ids = _encode_many(tokenizer, heads, special=not chat)
    rest_ids = iter(_encode_many(tokenizer, rest, special=False))
    eos = [] if chat else _eos(tokenizer, config)

    examples = []
    for segs, first in zip(per_record, head_ids, strict=True):
        ids: list[int] = []
        labels: list[int] = []
        for k, (_, in_loss) in enumerate(segs):
            seg = first if k == 0 else next(rest_ids)
            ids += seg
            labels += seg if in_loss else [IGNORE_INDEX] * len(seg)
        examples.append(_sft_example_from_ids(ids + eos, labels + eos, config, stats))
    return examples


def _sft_example_from_ids(
    ids: list[int], labels: list[int], config: DataConfig, stats: DataStats
) -> dict[str, Any] | None:
    stats.longest = max(stats.longest, len(ids))
    if len(ids) > config.max_length:
        stats.num_truncated += 1
        ids, labels = ids[: config.max_length], labels[: config.max_length]
    if all(t == IGNORE_INDEX for t in labels):
        stats.num_dropped += 1
        return None
    return {"input_ids": ids, "labels": labels}


def _check_chat_tokenizer(tokenizer: Any, layout: str) -> None:
    if not hasattr(tokenizer, "apply_chat_template") or not getattr(
        tokenizer, "chat_template", None
    ):
        raise ConfigError(
            f"The data is a chat ({layout} records) but the tokenizer has no chat template. Use "
            f"the tokenizer of an instruct/chat model, set tokenizer.chat_template to a Jinja "
            f"template, or convert the data to prompt/completion columns."
        )


def _render(tokenizer: Any, messages: list[Any], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )


def _chat_segments(
    tokenizer: Any, messages: Any, i: int, source: str
) -> tuple[list[tuple[str, bool]], bool]:
    """Split a rendered conversation into (text, in_loss) segments.

    Each assistant turn's span is where the rendering of the conversation up to and
    including that turn extends the rendering of the turns before it (with the generation
    prompt, so the "assistant:" header stays out of the loss). That needs the template to
    render every conversation as a prefix of its continuations; when it does not (some
    templates drop earlier reasoning, say), only the last assistant turn is in the loss.

    Returns:
        `(segments, every_turn)`: every_turn is False when only the last turn is used.
    """
    if not isinstance(messages, list) or not all(
        isinstance(m, Mapping) and "role" in m and "content" in m for m in messages
    ):
        raise ConfigError(
            f"Record {i} of {source}: 'messages' must be a list of {{'role': ..., 'content': "
            f"...}} objects."
        )
    turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise ConfigError(
            f"Record {i} of {source} has no assistant message, so there is nothing to learn. "
            f"Add the expected reply as a {{'role': 'assistant'}} message."
        )
    try:
        full = _render(tokenizer, messages, False)
        spans = []
        for k in turns:
            before = _render(tokenizer, messages[:k], True) if k else ""
            upto = _render(tokenizer, messages[: k + 1], False)
            if not (full.startswith(upto) and upto.startswith(before)):
                raise ValueError("template is not prefix-stable")
            spans.append((len(before), len(upto)))
        return _split(full, spans), True
    except Exception:  # noqa: BLE001 - any failure above means: fall back to the last turn
        pass
    last = turns[-1]
    try:
        before = _render(tokenizer, messages[:last], True) if last else ""
        upto = _render(tokenizer, messages[: last + 1], False)
    except Exception as e:  # noqa: BLE001 - the template itself rejects this conversation
        raise ConfigError(
            f"Record {i} of {source}: the tokenizer's chat template cannot render it ({e})."
        ) from e
    if not upto.startswith(before):
        raise ConfigError(
            f"Record {i} of {source}: the chat template renders the conversation up to the last "
            f"assistant turn differently from its own prompt, so the reply cannot be located. "
            f"Convert the data to prompt/completion columns instead."
        )
    return _split(upto, [(len(before), len(upto))]), False


def _split(text: str, spans: list[tuple[int, int]]) -> list[tuple[str, bool]]:
    segments, pos = [], 0
    for start, end in spans:
        segments.append((text[pos:start], False))
        segments.append((text[start:end], True))
        pos = end
    segments.append((text[pos:], False))
    return [(t, loss) for t, loss in segments if t]


def _sequence_examples(
    records: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    config: DataConfig,
    label_names: Sequence[str] | None,
    source: str,
    stats: DataStats,
) -> list[dict[str, Any]]:
    """classification / regression: encode text (+ pair) with the tokenizer's own pair format."""
    pair = config.text_pair_column in records[0]
    raw = [
        _column(r, config.label_column, "label_column", i, source) for i, r in enumerate(records)
    ]
    if config.task == "classification":
        names = label_names if label_names is not None else config.labels
        targets: list[Any]
        targets, stats.label_names = resolve_labels(
            raw, names, source=source, column=config.label_column
        )
    else:
        targets = [_as_float(v, i, source, config.label_column) for i, v in enumerate(raw)]

    texts = [_text(r, config.text_column, "text_column", i, source) for i, r in enumerate(records)]
    seconds = (
        [
            _text(r, config.text_pair_column, "text_pair_column", i, source)
            for i, r in enumerate(records)
        ]
        if pair
        else None
    )
    examples = []
    for start in range(0, len(texts), _CHUNK):
        t = texts[start : start + _CHUNK]
        p = seconds[start : start + _CHUNK] if seconds is not None else None
        enc = tokenizer(t, p, add_special_tokens=True)
        for k in range(len(t)):
            ids = list(enc["input_ids"][k])
            types = list(enc["token_type_ids"][k]) if "token_type_ids" in enc else None
            stats.longest = max(stats.longest, len(ids))
            if len(ids) > config.max_length:
                # Re-encode with the tokenizer's own truncation: for pairs it trims the longer
                # text first and keeps the closing special tokens.
                stats.num_truncated += 1
                one = tokenizer(
                    t[k],
                    p[k] if p is not None else None,
                    add_special_tokens=True,
                    truncation=True,
                    max_length=config.max_length,
                )
                ids = list(one["input_ids"])
                types = list(one["token_type_ids"]) if "token_type_ids" in one else None
            ex = {"input_ids": ids, "labels": targets[start + k]}
            if types is not None:
                ex["token_type_ids"] = types
            examples.append(ex)
    return examples


def _as_float(v: Any, i: int, source: str, column: str) -> float:
    try:
        if isinstance(v, bool) or v is None:
            raise ValueError
        return float(v)
    except (TypeError, ValueError):
        raise ConfigError(
            f"Regression target {v!r} of record {i} in {source} (column {column!r}) is not a "
            f"number. Fix the data or point label_column at the score column."
        ) from None
