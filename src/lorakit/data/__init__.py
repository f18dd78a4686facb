"""Datasets for `lorakit train` / `eval`: read files, tokenize for a task, batch by length.

records = load_records("glue/SST-2/train.tsv")             # list of dicts
examples, stats = build_examples(records, tokenizer, DataConfig(task="classification"))
sampler = LengthGroupedBatchSampler([len(e["input_ids"]) for e in examples], 32, seed=0)
loader = DataLoader(examples, batch_sampler=sampler, collate_fn=PadCollator(tokenizer.pad_token_id, 8))
"""

from lorakit.data.collate import PadCollator
from lorakit.data.config import TASKS, DataConfig
from lorakit.data.examples import IGNORE_INDEX, DataStats, build_examples, resolve_labels
from lorakit.data.readers import FORMATS, detect_format, group_references, load_records
from lorakit.data.sampler import LengthGroupedBatchSampler

__all__ = [
    "FORMATS",
    "IGNORE_INDEX",
    "TASKS",
    "DataConfig",
    "DataStats",
    "LengthGroupedBatchSampler",
    "PadCollator",
    "build_examples",
    "detect_format",
    "group_references",
    "load_records",
    "resolve_labels",
]
