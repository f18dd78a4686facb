"""`DataConfig`: which file, which columns, which task, how long. The CLI exposes every field as a flag."""

from __future__ import annotations

from dataclasses import dataclass

from lorakit.errors import ConfigError

TASKS = ("sft", "lm", "classification", "regression")
CHAT_FORMATS = ("auto", "messages", "sharegpt", "alpaca", "prompt-completion")


@dataclass
class DataConfig:
    """How records become training examples.

    Column fields name keys of the records that `load_records` returns. GLUE files read as
    `text` / `text_pair` / `label`, E2E files as `prompt` / `completion`, so the defaults fit
    them; other files may need their own names here.
    """

    task: str = "sft"
    """"sft" (prompt -> completion, or chat messages; loss on the completion only), "lm" (loss
    on every token of `text`), "classification" (text [+ text_pair] -> label id) or
    "regression" (text [+ text_pair] -> float score)."""

    format: str = "auto"
    """File format: auto, jsonl, json, text, csv, tsv, glue, e2e, parquet, arrow or datasets (save_to_disk folder)."""

    columns: list[str] | None = None
    """Column names of a CSV/TSV file without a header row, comma-separated (e.g. text,label)."""

    text_unit: str = "line"
    """For .txt files: "line" (one example per non-empty line) or "file" (the whole file)."""

    prompt_column: str = "prompt"
    """sft: the input part, masked out of the loss."""

    completion_column: str = "completion"
    """sft: the part the model learns to produce."""

    messages_column: str = "messages"
    """sft: a list of {"role", "content"} dicts, rendered with the tokenizer's chat template.
    Used instead of prompt/completion when the records have it."""

    chat_format: str = "auto"
    """sft record layout: auto (detected), messages, sharegpt, alpaca (instruction/input/output), prompt-completion."""

    text_column: str = "text"
    """lm / classification / regression: the text."""

    text_pair_column: str = "text_pair"
    """classification / regression: the second text of a pair; used when the records have it."""

    label_column: str = "label"
    """classification: the class (a name or an integer id); regression: the score."""

    labels: list[str] | None = None
    """classification: class names in id order (the records' labels are these names, or ids
    into this list). None: integer labels are used as ids, string labels are sorted."""

    separator: str = ""
    """sft: text appended to every prompt before the completion (e.g. " ||" or "\\n")."""

    add_eos: bool = True
    """sft / lm: end every sequence with the tokenizer's EOS token, so the model learns to stop."""

    max_length: int = 1024
    """Longest sequence in tokens; longer ones are truncated and counted in the stats."""

    packing: bool = False
    """sft / lm: pack examples into rows of up to max_length tokens, no attention or loss across examples."""

    def validate(self) -> DataConfig:
        """Check the fields; returns self.

        Raises:
            ConfigError: an unknown task, text_unit or chat_format; max_length < 2; packing
                for a task other than sft / lm.
        """
        if self.task not in TASKS:
            raise ConfigError(
                f"Unknown --task {self.task!r}. Use one of: {', '.join(TASKS)} (sft for "
                f"prompt/completion or chat data, lm for plain text)."
            )
        if self.text_unit not in ("line", "file"):
            raise ConfigError(f"--text-unit must be 'line' or 'file', got {self.text_unit!r}.")
        if self.chat_format not in CHAT_FORMATS:
            raise ConfigError(
                f"Unknown --chat-format {self.chat_format!r}. Use one of: {', '.join(CHAT_FORMATS)}."
            )
        if self.max_length < 2:
            raise ConfigError(f"--max-length must be at least 2 tokens, got {self.max_length}.")
        if self.packing and self.task not in ("sft", "lm"):
            raise ConfigError(
                f"--packing joins token sequences into longer rows, which fits the sft and lm tasks; "
                f"task {self.task!r} predicts one label per sequence. Drop --packing."
            )
        return self
