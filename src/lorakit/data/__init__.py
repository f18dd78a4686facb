"""Datasets for `lorakit train` / `eval`: read files, tokenize for a task, batch by length.

records = load_records("glue/SST-2/train.tsv")             # list of dicts
examples, stats = build_examples(records, tokenizer, DataConfig(task="classification"))
sampler = LengthGroupedBatchSampler([len(e["input_ids"]) for e in examples], 32, seed=0)
loader = DataLoader(examples, batch_sampler=sampler, collate_fn=PadCollator(tokenizer.pad_token_id, 8))
rows = pack_examples(examples, config.max_length)          # --packing: rows of several examples
"""

from lorakit.data.collate import PadCollator
from lorakit.data.chat import detect_chat_format, to_messages
from lorakit.data.config import CHAT_FORMATS, TASKS, DataConfig
from lorakit.data.examples import IGNORE_INDEX, DataStats, build_examples, resolve_labels
from lorakit.data.packing import block_causal_mask, pack_examples
from lorakit.data.readers import (
    FORMATS,
    GLUE_TASKS,
    detect_format,
    group_references,
    load_records,
    read_records,
)
from lorakit.data.sampler import LengthGroupedBatchSampler

__all__ = [
    "CHAT_FORMATS",
    "FORMATS",
    "GLUE_TASKS",
    "IGNORE_INDEX",
    "TASKS",
    "DataConfig",
    "DataStats",
    "LengthGroupedBatchSampler",
    "PadCollator",
    "block_causal_mask",
    "build_examples",
    "detect_chat_format",
    "detect_format",
    "group_references",
    "load_records",
    "pack_examples",
    "read_records",
    "resolve_labels",
    "to_messages",
]
