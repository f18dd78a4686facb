"""The examples of a run: a data file (or the built-in task) read, tokenized and checked."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..data import DataConfig, build_examples, read_records


@dataclass
class Split:
    records: list[dict[str, Any]]
    examples: list[dict[str, Any]]
    stats: Any


def model_task(data: DataConfig) -> str:
    return {"classification": "sequence-classification", "regression": "regression"}.get(data.task, "causal-lm")


def read_split(path: str | None, records: list[dict] | None, tokenizer, data: DataConfig,
               label_names=None) -> Split:
    if records is None:
        records = read_records(path, data) if path else []
    examples, stats = build_examples(records, tokenizer, data, label_names=label_names, source=str(path or "data"))
    return Split(records, examples, stats)
