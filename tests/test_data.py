"""Data layer contracts: readers on real GLUE/E2E files, tokenization, collator, sampler, errors."""

from __future__ import annotations

import copy
import gzip
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorakit.data import (
    IGNORE_INDEX,
    DataConfig,
    LengthGroupedBatchSampler,
    PadCollator,
    build_examples,
    detect_format,
    group_references,
    load_records,
    resolve_labels,
)
from lorakit.errors import ConfigError

from models import SHARED as DATA  # ../shared/data, or $LORAKIT_SHARED_DATA

TOKENIZER_FILE = DATA / "gpt2-tokenizer" / "tokenizer.json"

needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data not present")


@pytest.fixture(scope="module")
def tok():
    if not TOKENIZER_FILE.is_file():
        pytest.skip("GPT-2 tokenizer not present in ../shared/data")
    from transformers import GPT2TokenizerFast

    t = GPT2TokenizerFast(tokenizer_file=str(TOKENIZER_FILE))
    t.pad_token = t.eos_token
    return t


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- readers: real files


@needs_data
@pytest.mark.parametrize(
    "rel, n, columns",
    [
        ("glue/SST-2/dev.tsv", 872, {"text", "label"}),
        ("glue/SST-2/test.tsv", 1821, {"idx", "text"}),
        ("glue/MRPC/dev.tsv", 408, {"text", "text_pair", "label"}),
        ("glue/MRPC/train.tsv", 3668, {"text", "text_pair", "label"}),
        ("glue/MRPC/test.tsv", 1725, {"idx", "text", "text_pair"}),
        ("glue/RTE/dev.tsv", 277, {"text", "text_pair", "label", "idx"}),
        ("glue/RTE/test.tsv", 3000, {"text", "text_pair", "label", "idx"}),
        ("e2e/devset.csv", 4672, {"prompt", "completion"}),
        ("e2e/testset_w_refs.csv", 4693, {"prompt", "completion"}),
        ("e2e/testset.csv", 630, {"prompt"}),
        ("e2e/lora-format/valid.txt", 4672, {"text"}),
    ],
)
def test_real_files_read_with_expected_counts(rel, n, columns):
    records = load_records(DATA / rel)
    assert len(records) == n
    assert all(set(r) == columns for r in records)


@needs_data
def test_glue_label_balance_and_quoting():
    sst = load_records(DATA / "glue/SST-2/dev.tsv")
    assert Counter(r["label"] for r in sst) == {"1": 444, "0": 428}
    mrpc = load_records(DATA / "glue/MRPC/train.tsv")  # BOM header, lone '"' in sentences
    assert Counter(r["label"] for r in mrpc) == {"1": 2474, "0": 1194}
    assert mrpc[0]["text"].startswith('Amrozi accused his brother, whom he called "the witness"')
    rte = load_records(DATA / "glue/RTE/dev.tsv")  # CSV-quoted TSV
    assert Counter(r["label"] for r in rte) == {"0": 146, "1": 131}
    assert any('famed as "Dr. Death,"' in r["text"] for r in rte)  # "" unescaped
    assert not any('""' in r["text"] for r in rte)


@needs_data
def test_format_detection_and_override():
    assert detect_format(DATA / "glue/MRPC/dev.tsv") == "glue"
    assert detect_format(DATA / "e2e/devset.csv") == "e2e"
    assert detect_format(DATA / "e2e/trainset.csv.gz") == "e2e"
    raw = load_records(DATA / "glue/SST-2/dev.tsv", format="tsv")
    assert set(raw[0]) == {"sentence", "label"}
    raw = load_records(DATA / "e2e/devset.csv", format="csv", limit=3)
    assert set(raw[0]) == {"mr", "ref"} and len(raw) == 3


@needs_data
def test_e2e_train_gz_and_grouping():
    train = load_records(DATA / "e2e/trainset.csv.gz")
    assert len(train) == 42061
    dev = group_references(load_records(DATA / "e2e/devset.csv"))
    assert len(dev) == 547
    mr, refs = dev[0]
    assert mr == "name[Alimentum], area[city centre], familyFriendly[no]"
    assert len(refs) == 6 and refs[0].startswith("There is a place in the city centre, Alimentum")
    assert sum(len(r) for _, r in dev) == 4672
    test = group_references(load_records(DATA / "e2e/testset_w_refs.csv"))
    assert len(test) == 630


def test_group_references_consecutive_only():
    rows = [
        {"mr": "a", "ref": "1"},
        {"mr": "a", "ref": "2"},
        {"mr": "b", "ref": "3"},
        {"mr": "a", "ref": "4"},
    ]
    assert group_references(rows, "mr", "ref") == [("a", ["1", "2"]), ("b", ["3"]), ("a", ["4"])]
    with pytest.raises(ConfigError, match="Record 0 has no column 'prompt'.*it has: mr, ref"):
        group_references(rows)


# ----------------------------------------------------------------------------- readers: synthetic


def test_jsonl_json_text_csv(tmp_path):
    recs = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]
    p = write(tmp_path / "d.jsonl", "\n".join(json.dumps(r) for r in recs) + "\n\n")
    assert load_records(p) == recs
    assert load_records(write(tmp_path / "d.json", json.dumps(recs))) == recs
    assert (
        load_records(
            write(tmp_path / "lines.json", json.dumps(recs[0]) + "\n" + json.dumps(recs[1]))
        )
        == recs
    )
    p = write(tmp_path / "t.txt", "first line\n\nsecond line\n")
    assert load_records(p) == [{"text": "first line"}, {"text": "second line"}]
    assert load_records(p, text_unit="file") == [{"text": "first line\n\nsecond line\n"}]
    p = write(tmp_path / "d.csv", 'text,score\n"hello, world",0.5\nbye,1\n')
    assert load_records(p) == [
        {"text": "hello, world", "score": "0.5"},
        {"text": "bye", "score": "1"},
    ]
    p = tmp_path / "d.jsonl.gz"
    p.write_bytes(gzip.compress(json.dumps(recs[0]).encode()))
    assert load_records(p) == [recs[0]]


def test_reader_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(ConfigError, match="nope.jsonl does not exist"):
        load_records(missing)
    with pytest.raises(ConfigError, match="is a directory"):
        load_records(tmp_path, format="text")
    bad = write(tmp_path / "bad.jsonl", '{"a": 1}\n{"a": \n')
    with pytest.raises(ConfigError, match=r"bad.jsonl, line 2: not valid JSON"):
        load_records(bad)
    arr = write(tmp_path / "arr.jsonl", "[1, 2]\n")
    with pytest.raises(ConfigError, match="line 1: expected a JSON object"):
        load_records(arr)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="latin.txt is not valid utf-8"):
        load_records(latin)
    gz = tmp_path / "broken.csv.gz"
    gz.write_bytes(b"not gzip at all")
    with pytest.raises(ConfigError, match="broken.csv.gz"):
        load_records(gz)
    with pytest.raises(ConfigError, match="extension '.xml'"):
        load_records(write(tmp_path / "x.xml", "x"))
    with pytest.raises(ConfigError, match="Cannot read .*x.parquet as parquet"):
        load_records(write(tmp_path / "x.parquet", "x"))
    with pytest.raises(ConfigError, match="Unknown data format 'xml'"):
        load_records(bad, format="xml")
    ragged = write(tmp_path / "r.csv", "a,b\n1,2\n3\n")
    with pytest.raises(ConfigError, match="r.csv, row 3: 1 fields where the header has 2"):
        load_records(ragged)
    with pytest.raises(ConfigError, match="not a GLUE layout"):
        load_records(write(tmp_path / "g.tsv", "foo\tbar\n1\t2\n"), format="glue")


def test_empty_dataset_errors(tmp_path):
    with pytest.raises(ConfigError, match="No records in .*empty.jsonl"):
        load_records(write(tmp_path / "empty.jsonl", "\n\n"))
    with pytest.raises(ConfigError, match="No records in .*header_only.csv"):
        load_records(write(tmp_path / "header_only.csv", "prompt,completion\n"))


# ----------------------------------------------------------------------------- tokenization


def test_sft_prompt_is_masked(tok):
    recs = [{"prompt": "Translate: cat", "completion": " chat"}]
    (ex,), stats = build_examples(recs, tok, DataConfig(task="sft", separator=" =>"))
    prompt_ids = tok("Translate: cat =>")["input_ids"]
    completion_ids = tok(" chat", add_special_tokens=False)["input_ids"]
    assert ex["input_ids"] == prompt_ids + completion_ids + [tok.eos_token_id]
    assert ex["labels"] == [IGNORE_INDEX] * len(prompt_ids) + completion_ids + [tok.eos_token_id]
    assert stats.num_loss_tokens == len(completion_ids) + 1
    assert stats.num_truncated == stats.num_dropped == 0


def test_sft_truncation_and_drop_counts(tok):
    recs = [
        {"prompt": "short", "completion": " answer " * 20},  # truncated, keeps some completion
        {"prompt": "word " * 40, "completion": " x"},  # prompt fills max_length: dropped
        {"prompt": "hi", "completion": " ok"},
    ]
    examples, stats = build_examples(recs, tok, DataConfig(max_length=16))
    assert (stats.num_records, stats.num_examples) == (3, 2)
    assert stats.num_truncated == 2 and stats.num_dropped == 1
    assert stats.longest > 40
    assert all(len(ex["input_ids"]) <= 16 for ex in examples)
    assert "2 truncated" in stats.describe() and "1 dropped" in stats.describe()
    with pytest.raises(ConfigError, match="Every example of .* was dropped.*max_length=4"):
        build_examples(recs[1:2], tok, DataConfig(max_length=4))


def test_lm_labels_are_inputs(tok):
    (ex,), stats = build_examples([{"text": "Hello world"}], tok, DataConfig(task="lm"))
    assert ex["input_ids"] == [15496, 995, tok.eos_token_id] == ex["labels"]
    (ex,), _ = build_examples([{"text": "Hello world"}], tok, DataConfig(task="lm", add_eos=False))
    assert ex["input_ids"] == [15496, 995]


def test_chat_every_assistant_turn_in_loss(tok):
    t = copy.deepcopy(tok)
    t.chat_template = CHAT_TEMPLATE
    msgs = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "see you"},
    ]
    (ex,), stats = build_examples([{"messages": msgs}], t, DataConfig())
    assert stats.chat_turns == "all"
    full = t.apply_chat_template(msgs, tokenize=False)
    assert t.decode(ex["input_ids"]) == full
    in_loss = t.decode(
        [i for i, lab in zip(ex["input_ids"], ex["labels"], strict=True) if lab != IGNORE_INDEX]
    )
    assert in_loss == "hello<|endoftext|>see you<|endoftext|>"


def test_chat_falls_back_to_last_turn(tok):
    t = copy.deepcopy(tok)
    # drops the reasoning of earlier assistant turns (as reasoning-model templates do), so a
    # conversation cut after an earlier turn is not a prefix of the whole one
    t.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>"
        "{% if m['role'] == 'assistant' and not loop.last %}{{ m['content'].split('</think>')[-1] }}"
        "{% else %}{{ m['content'] }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    msgs = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "<think>x</think>b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
    ]
    (ex,), stats = build_examples([{"messages": msgs}], t, DataConfig())
    assert stats.chat_turns == "last" and stats.notes
    in_loss = t.decode(
        [i for i, lab in zip(ex["input_ids"], ex["labels"], strict=True) if lab != IGNORE_INDEX]
    )
    assert in_loss == "d"


def test_chat_errors(tok):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    with pytest.raises(ConfigError, match="no chat template"):
        build_examples([{"messages": msgs}], tok, DataConfig())
    t = copy.deepcopy(tok)
    t.chat_template = CHAT_TEMPLATE
    with pytest.raises(ConfigError, match="Record 0 of chat.jsonl has no assistant message"):
        build_examples([{"messages": msgs[:1]}], t, DataConfig(), source="chat.jsonl")


def test_missing_column_lists_existing_columns(tok):
    recs = [{"mr": "x", "ref": "y"}]
    with pytest.raises(
        ConfigError, match=r"e2e.csv is in no layout the sft task reads.*--prompt-column.*'mr', 'ref'"
    ):
        build_examples(recs, tok, DataConfig(), source="e2e.csv")
    with pytest.raises(ConfigError, match=r"no column 'completion' \(--completion-column\).*'prompt', 'ref'"):
        build_examples([{"prompt": "x", "ref": "y"}], tok, DataConfig(), source="e2e.csv")
    with pytest.raises(ConfigError, match=r"no column 'text'.*'mr', 'ref'"):
        build_examples(recs, tok, DataConfig(task="lm"))
    with pytest.raises(ConfigError, match=r"no column 'label' \(--label-column\).*'text'"):
        build_examples([{"text": "a"}], tok, DataConfig(task="classification"))
    with pytest.raises(ConfigError, match="has no records"):
        build_examples([], tok, DataConfig())


def test_classification_labels_and_pairs(tok):
    recs = [
        {"text": "good", "text_pair": "fine", "label": "positive"},
        {"text": "bad", "text_pair": "awful", "label": "negative"},
        {"text": "meh", "text_pair": "ok", "label": "neutral"},
    ]
    examples, stats = build_examples(recs, tok, DataConfig(task="classification"))
    assert stats.label_names == ["negative", "neutral", "positive"]
    assert [ex["labels"] for ex in examples] == [2, 0, 1]
    assert examples[0]["input_ids"] == tok("good", "fine")["input_ids"]
    # a dev split reuses the training split's mapping
    dev, dev_stats = build_examples(
        recs[:1], tok, DataConfig(task="classification"), label_names=stats.label_names
    )
    assert dev[0]["labels"] == 2 and dev_stats.label_names == stats.label_names
    with pytest.raises(ConfigError, match="Unknown label 'mixed'.*negative, neutral, positive"):
        build_examples(
            [{"text": "x", "label": "mixed"}],
            tok,
            DataConfig(task="classification"),
            label_names=stats.label_names,
        )


def test_label_ranges():
    assert resolve_labels(["1", "0", 2]) == ([1, 0, 2], ["0", "1", "2"])
    assert resolve_labels(["1", "neg"], ["neg", "pos"]) == ([1, 0], ["neg", "pos"])
    with pytest.raises(ConfigError, match="Label 3 of record 1 .* out of range for 2 classes"):
        resolve_labels([0, 3], ["neg", "pos"])
    with pytest.raises(ConfigError, match="Label -1 of record 0 .*GLUE test splits"):
        resolve_labels(["-1", "-1"])
    with pytest.raises(ConfigError, match="Record 1 of .* has an empty 'label'"):
        resolve_labels(["0", ""])


@needs_data
def test_glue_classification_real(tok):
    recs = load_records(DATA / "glue/MRPC/dev.tsv")
    examples, stats = build_examples(recs, tok, DataConfig(task="classification", max_length=48))
    assert stats.label_names == ["0", "1"] and len(examples) == 408
    assert stats.num_truncated > 0 and stats.longest > 48
    assert max(len(ex["input_ids"]) for ex in examples) == 48
    test = load_records(DATA / "glue/RTE/test.tsv", limit=5)
    with pytest.raises(ConfigError, match="Label -1 .*test.tsv.*use a labeled split"):
        build_examples(
            test, tok, DataConfig(task="classification"), source=str(DATA / "glue/RTE/test.tsv")
        )
    sst_test = load_records(DATA / "glue/SST-2/test.tsv", limit=5)
    with pytest.raises(ConfigError, match=r"no column 'label'.*'idx', 'text'"):
        build_examples(sst_test, tok, DataConfig(task="classification"))


@needs_data
def test_e2e_sft_real(tok):
    recs = load_records(DATA / "e2e/devset.csv", limit=50)
    examples, stats = build_examples(recs, tok, DataConfig(separator=" ||"))
    assert len(examples) == 50 and stats.num_truncated == 0
    ex = examples[0]
    n_prompt = len(tok(recs[0]["prompt"] + " ||")["input_ids"])
    assert all(label == IGNORE_INDEX for label in ex["labels"][:n_prompt])
    assert tok.decode(ex["labels"][n_prompt:]) == recs[0]["completion"] + tok.eos_token


def test_regression(tok):
    examples, _ = build_examples(
        [{"text": "a", "label": "3.5"}, {"text": "b", "label": 1}],
        tok,
        DataConfig(task="regression"),
    )
    assert [ex["labels"] for ex in examples] == [3.5, 1.0]
    with pytest.raises(ConfigError, match="Regression target 'high' of record 0 .*not a number"):
        build_examples([{"text": "a", "label": "high"}], tok, DataConfig(task="regression"))


def test_config_validation():
    with pytest.raises(ConfigError, match="Unknown --task .chat."):
        DataConfig(task="chat").validate()
    with pytest.raises(ConfigError, match="--max-length must be at least 2"):
        DataConfig(max_length=1).validate()


# ----------------------------------------------------------------------------- collator


def test_collator_pads_and_masks():
    exs = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    b = PadCollator(pad_token_id=0)(exs)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    b = PadCollator(0, pad_to_multiple_of=8, padding_side="left")(exs)
    assert b["input_ids"].shape == (2, 8)
    assert b["input_ids"][1].tolist() == [0] * 7 + [8]
    assert b["attention_mask"][1].tolist() == [0] * 7 + [1]
    cls = PadCollator(0)(
        [
            {"input_ids": [1, 2], "token_type_ids": [0, 1], "labels": 2},
            {"input_ids": [3], "token_type_ids": [0], "labels": 0},
        ]
    )
    assert cls["labels"].dtype == torch.long and cls["labels"].tolist() == [2, 0]
    assert cls["token_type_ids"].tolist() == [[0, 1], [0, 0]]
    reg = PadCollator(0)([{"input_ids": [1], "labels": 0.5}])
    assert reg["labels"].dtype == torch.float32
    with pytest.raises(
        ConfigError, match="no pad token.*tokenizer.pad_token = tokenizer.eos_token"
    ):
        PadCollator(None)


# ----------------------------------------------------------------------------- sampler


LENGTHS = [(i * 37) % 101 + 1 for i in range(1000)]


def test_sampler_covers_every_index_once_and_groups_lengths():
    s = LengthGroupedBatchSampler(LENGTHS, batch_size=16, seed=3)
    batches = list(s)
    assert len(batches) == len(s) == s.num_batches == 63
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert max(LENGTHS[i] for i in batches[0]) == max(LENGTHS)  # longest batch first
    spread = sum(max(LENGTHS[i] for i in b) - min(LENGTHS[i] for i in b) for b in batches) / len(
        batches
    )
    assert spread < 10  # random batches of 16 would spread ~90


def test_sampler_deterministic_per_seed_and_epoch():
    a = LengthGroupedBatchSampler(LENGTHS, 16, seed=7)
    b = LengthGroupedBatchSampler(LENGTHS, 16, seed=7)
    torch.manual_seed(0)
    first = list(a)
    torch.manual_seed(1)  # global RNG state must not matter
    assert list(b) == first
    a.set_epoch(1)
    assert list(a) != first
    assert list(LengthGroupedBatchSampler(LENGTHS, 16, seed=8)) != first


def test_sampler_resume_skips_batches():
    s = LengthGroupedBatchSampler(LENGTHS, 16, seed=1)
    s.set_epoch(2)
    full = list(s)
    s.set_epoch(2, skip=10)
    assert len(s) == len(full) - 10
    assert list(s) == full[10:]
    fresh = LengthGroupedBatchSampler(LENGTHS, 16, seed=1)  # a restarted process
    fresh.set_epoch(2, skip=10)
    assert list(fresh) == full[10:]
    with pytest.raises(ConfigError, match="Cannot skip 64 batches: an epoch has 63"):
        s.set_epoch(2, skip=64)


def test_sampler_drop_last_unshuffled_and_ranks():
    s = LengthGroupedBatchSampler(LENGTHS, 16, shuffle=False, drop_last=True)
    batches = list(s)
    assert len(batches) == 62 and all(len(b) == 16 for b in batches)
    assert batches == list(
        LengthGroupedBatchSampler(LENGTHS, 16, shuffle=False, drop_last=True, seed=99)
    )
    ranks = [
        list(LengthGroupedBatchSampler(LENGTHS, 16, seed=5, num_replicas=4, rank=r))
        for r in range(4)
    ]
    assert len({len(r) for r in ranks}) == 1  # every rank runs the same number of steps
    assert set(i for r in ranks for b in r for i in b) == set(range(1000))
    with pytest.raises(ConfigError, match="rank must be in"):
        LengthGroupedBatchSampler(LENGTHS, 16, num_replicas=2, rank=2)
    with pytest.raises(ConfigError, match="empty dataset"):
        LengthGroupedBatchSampler([], 16)


def test_dataloader_end_to_end(tok):
    from torch.utils.data import DataLoader

    recs = [{"prompt": f"q{i}", "completion": " a" * (i % 7 + 1)} for i in range(40)]
    examples, _ = build_examples(recs, tok, DataConfig())
    sampler = LengthGroupedBatchSampler([len(e["input_ids"]) for e in examples], 8, seed=0)
    loader = DataLoader(
        examples, batch_sampler=sampler, collate_fn=PadCollator(tok.pad_token_id, 8)
    )
    batches = list(loader)
    assert len(batches) == 5
    assert all(b["input_ids"].shape[1] % 8 == 0 for b in batches)
    assert sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches) == sum(
        sum(1 for t in e["labels"] if t != IGNORE_INDEX) for e in examples
    )


# ----------------------------------------------------------------------------- packing


def _random_examples(n: int, seed: int, vocab: int = 96) -> list[dict]:
    """sft-like examples: 1-5 prompt tokens out of the loss, then 1-9 completion tokens in it."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(n):
        p, c = (int(torch.randint(1, 6, (1,), generator=g)), int(torch.randint(1, 10, (1,), generator=g)))
        ids = torch.randint(0, vocab, (p + c,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * p + ids[p:]})
    return examples


def test_pack_examples_fills_rows_with_whole_examples():
    from lorakit.data import pack_examples

    examples = _random_examples(40, seed=0)
    rows = pack_examples(examples, max_length=24)
    assert all(len(r["input_ids"]) <= 24 for r in rows)
    assert len(rows) == -(-sum(len(e["input_ids"]) for e in examples) // 24)  # best fit: no row wasted here
    seen = []
    for row in rows:
        starts = [k for k, pos in enumerate(row["position_ids"]) if pos == 0] + [len(row["input_ids"])]
        for a, b in zip(starts, starts[1:]):
            (i,) = [i for i, e in enumerate(examples) if e["input_ids"] == row["input_ids"][a:b] and i not in seen]
            seen.append(i)
            assert row["position_ids"][a:b] == list(range(b - a))
            assert row["labels"][a:b] == [IGNORE_INDEX, *examples[i]["labels"][1:]]
    assert sorted(seen) == list(range(40))  # every example once, never split
    assert pack_examples(examples, max_length=24) == rows  # deterministic
    with pytest.raises(ConfigError, match="Example 0 has no per-token labels.*sft and lm tasks only"):
        pack_examples([{"input_ids": [1, 2], "labels": 1}], 8)
    with pytest.raises(ConfigError, match="Example 0 has 3 tokens, more than the packed row length 2"):
        pack_examples([{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}], 2)
    with pytest.raises(ConfigError, match="--packing .*task 'classification'"):
        DataConfig(task="classification", packing=True).validate()


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(st.lists(st.integers(1, 16), min_size=1, max_size=30), st.integers(16, 40))
def test_packed_rows_and_mask_keep_examples_apart(lengths, max_length):
    from lorakit.data import block_causal_mask, pack_examples

    examples = [{"input_ids": [k] * n, "labels": [k] * n} for k, n in enumerate(lengths)]
    rows = pack_examples(examples, max_length)
    assert all(len(r["input_ids"]) <= max_length for r in rows)
    assert sorted(t for r in rows for t in r["input_ids"]) == sorted(t for e in examples for t in e["input_ids"])
    # no two rows could be one: best fit leaves no pair of rows that fits together
    sizes = sorted(len(r["input_ids"]) for r in rows)
    assert len(sizes) < 2 or sizes[0] + sizes[1] > max_length
    batch = PadCollator(-1)(rows)
    assert torch.equal(batch["attention_mask"], block_causal_mask(batch["position_ids"]))
    mask = batch["attention_mask"][:, 0] == 0  # (B, T, T): True where attention is open
    ids = batch["input_ids"]
    same = ids[:, :, None] == ids[:, None, :]  # tokens of one example share its id; padding is -1
    causal = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).tril()
    real = (ids != -1)[:, :, None]
    assert torch.equal(mask & real, same & causal & real)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_the_examples_loss_alone(attn):
    """A packed batch's loss is the token-weighted mean of each example's loss computed alone."""
    from models import llama

    from lorakit.data import pack_examples

    torch.manual_seed(0)
    model = llama().double().eval()
    model.config._attn_implementation = attn
    examples = _random_examples(9, seed=1)
    rows = pack_examples(examples, max_length=20)
    assert len(rows) < len(examples)
    batch = PadCollator(0, mask_dtype=torch.float64)(rows)
    assert batch["attention_mask"].shape == (len(rows), 1, batch["input_ids"].shape[1], batch["input_ids"].shape[1])
    with torch.no_grad():
        packed = model(**batch).loss
        total, count = 0.0, 0
        for ex in examples:
            n = sum(1 for t in ex["labels"][1:] if t != IGNORE_INDEX)  # tokens the shifted loss counts
            alone = model(input_ids=torch.tensor([ex["input_ids"]]), labels=torch.tensor([ex["labels"]])).loss
            total, count = total + float(alone) * n, count + n
        # (the loss is computed in float32 by transformers, whatever the model dtype)
        torch.testing.assert_close(packed.item(), total / count, rtol=1e-6, atol=0)

        # restarting position_ids with a plain padding mask (what transformers would otherwise get)
        # let examples attend across their boundaries: the loss changes
        leaky = dict(batch, attention_mask=(batch["input_ids"] != -1).long())
        assert abs(model(**leaky).loss.item() - total / count) > 1e-4
