"""Data as users have it: Parquet / Arrow / save_to_disk, header-less CSV/TSV, every GLUE task's
layout, and ShareGPT / Alpaca chat records mapped onto the messages format."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from lorakit.data import IGNORE_INDEX, DataConfig, build_examples, detect_format, load_records
from lorakit.data.chat import SHAREGPT_ROLES, detect_chat_format, to_messages
from lorakit.errors import ConfigError
from models import SHARED

needs_data = pytest.mark.skipif(not SHARED.is_dir(), reason="shared data not present")
RTE = SHARED / "glue" / "RTE"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def tok():
    path = SHARED / "gpt2-tokenizer" / "tokenizer.json"
    if not path.is_file():
        pytest.skip("GPT-2 tokenizer not present in the shared data")
    from transformers import GPT2TokenizerFast

    t = GPT2TokenizerFast(tokenizer_file=str(path))
    t.pad_token = t.eos_token
    return t


@pytest.fixture(scope="module")
def chat_tok(tok):
    t = copy.deepcopy(tok)
    t.chat_template = CHAT_TEMPLATE
    return t


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------ Parquet, Arrow, datasets


@needs_data
def test_parquet_equals_the_tsv_row_for_row():
    tsv = load_records(RTE / "dev.tsv")  # canonical GLUE columns, strings as in the file
    parquet = load_records(RTE / "validation.parquet")  # the file's own columns and types
    assert detect_format(RTE / "validation.parquet") == "parquet"
    assert len(parquet) == len(tsv) == 277
    assert set(parquet[0]) == {"sentence1", "sentence2", "label", "idx"}
    for t, p in zip(tsv, parquet, strict=True):
        assert (p["sentence1"], p["sentence2"], p["label"], p["idx"]) == (
            t["text"], t["text_pair"], int(t["label"]), int(t["idx"])
        )
    assert len(load_records(RTE / "train.parquet", limit=5)) == 5
    # --format glue: the Hugging Face glue files' columns become the canonical ones
    assert load_records(RTE / "validation.parquet", format="glue") == [
        {**t, "label": int(t["label"]), "idx": int(t["idx"])} for t in tsv]


@needs_data
def test_save_to_disk_folders_and_arrow_files(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.feather as feather

    expected = load_records(RTE / "validation.parquet", limit=20)
    ds = datasets.Dataset.from_list(expected)
    ds.save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": ds, "validation": ds.select(range(3))}).save_to_disk(str(tmp_path / "dict"))

    assert detect_format(tmp_path / "one") == "datasets"
    assert load_records(tmp_path / "one") == expected
    assert load_records(tmp_path / "dict" / "validation") == expected[:3]
    with pytest.raises(ConfigError, match=r"DatasetDict with splits train, validation; pass one split's folder"):
        load_records(tmp_path / "dict")
    (arrow,) = (tmp_path / "one").glob("*.arrow")  # the datasets cache format: an Arrow IPC stream
    assert load_records(arrow) == expected
    feather.write_feather(pa.Table.from_pylist(expected), str(tmp_path / "x.arrow"))  # an Arrow IPC file
    assert load_records(tmp_path / "x.arrow", limit=4) == expected[:4]

    datasets.Dataset.from_list([{"a": 1, "b": "x"}]).save_to_disk(str(tmp_path / "ab"))
    with pytest.raises(ConfigError, match=r"columns a, b are not a Hugging Face GLUE layout.*Drop --format glue"):
        load_records(tmp_path / "ab", format="glue")

    (tmp_path / "plain").mkdir()
    with pytest.raises(ConfigError, match="plain is a folder but not one written by datasets' save_to_disk"):
        load_records(tmp_path / "plain")
    with pytest.raises(ConfigError, match="--columns names the columns of a CSV/TSV file"):
        load_records(tmp_path / "one", columns=["a"])


# ------------------------------------------------------------------ CSV / TSV without a header


def test_headerless_tsv_needs_columns(tmp_path, tok):
    path = write(tmp_path / "plain.tsv", 'a "quoted word\t1\nplain text\t0\n')
    records = load_records(path, columns=["text", "label"])
    assert records == [{"text": 'a "quoted word', "label": "1"}, {"text": "plain text", "label": "0"}]
    assert load_records(path, columns="text,label") == records  # the flag's comma list
    csv_path = write(tmp_path / "plain.csv", "hello,1\n\"a, b\",0\n")
    assert load_records(csv_path, columns=["text", "label"])[1] == {"text": "a, b", "label": "0"}

    # read without --columns, the first row is taken for a header: the error says what to pass
    wrong = load_records(path)
    with pytest.raises(ConfigError, match=r"no column 'label' \(--label-column\).*no header row.*--columns"):
        build_examples(wrong, tok, DataConfig(task="classification"), source=str(path))
    with pytest.raises(ConfigError, match=r"plain.tsv, row 1: 2 fields where the --columns list has 3"):
        load_records(path, columns=["text", "label", "extra"])
    with pytest.raises(ConfigError, match="--columns must name every column of the file once"):
        load_records(path, columns=["text", "text"])
    with pytest.raises(ConfigError, match="--columns names the columns of a CSV/TSV file"):
        load_records(write(tmp_path / "x.jsonl", '{"text": "a"}\n'), columns=["text"])
    examples, stats = build_examples(records, tok, DataConfig(task="classification"))
    assert [e["labels"] for e in examples] == [1, 0] and stats.label_names == ["0", "1"]


# ------------------------------------------------------------------ every GLUE task's layout

# Real rows of each GLUE file layout (the GLUE release's headers; a few rows per file).
_GLUE_FILES = {
    "CoLA/train.tsv": (
        "gj04\t1\t\tOur friends won't buy this analysis, let alone the next one we propose.\n"
        "gj04\t0\t*\tThey drank the pub.\n",
        [{"text": "Our friends won't buy this analysis, let alone the next one we propose.", "label": "1"},
         {"text": "They drank the pub.", "label": "0"}],
    ),
    "CoLA/test.tsv": (
        "index\tsentence\n0\tBill whistled past the house.\n",
        [{"idx": "0", "text": "Bill whistled past the house."}],
    ),
    "QQP/dev.tsv": (
        "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
        "172974\t266948\t175089\tIs there a reason why we should travel alone?\tWhat are some reasons to "
        "travel alone?\t1\n",
        [{"idx": "172974", "text": "Is there a reason why we should travel alone?",
          "text_pair": "What are some reasons to travel alone?", "label": "1"}],
    ),
    "QQP/test.tsv": (
        'id\tquestion1\tquestion2\n0\tWould the idea of "Mind the gap" work?\tWhy do we say "mind the gap"?\n',
        [{"idx": "0", "text": 'Would the idea of "Mind the gap" work?', "text_pair": 'Why do we say "mind the gap"?'}],
    ),
    "STS-B/dev.tsv": (
        "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
        "0\tmain-captions\tMSRvid\t2012test\t0000\tnone\tnone\tA man with a hard hat is dancing.\t"
        "A man wearing a hard hat is dancing.\t5.000\n"
        "3\tmain-captions\tMSRvid\t2012test\t0007\tnone\tnone\tA woman is playing the guitar.\t"
        "A man is playing guitar.\t2.400\n",
        [{"idx": "0", "text": "A man with a hard hat is dancing.",
          "text_pair": "A man wearing a hard hat is dancing.", "label": "5.000"},
         {"idx": "3", "text": "A woman is playing the guitar.", "text_pair": "A man is playing guitar.",
          "label": "2.400"}],
    ),
    "STS-B/test.tsv": (
        "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\n"
        "0\tmain-captions\tMSRvid\t2012test\t0024\tnone\tnone\tA girl is styling her hair.\t"
        "A girl is brushing her hair.\n",
        [{"idx": "0", "text": "A girl is styling her hair.", "text_pair": "A girl is brushing her hair."}],
    ),
    "MNLI/train.tsv": (
        "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
        "sentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label\n"
        "0\t31193\t31193n\tgovernment\t( ( Conceptually ( cream skimming ) ) )\t( ( ( Product and ) "
        "geography ) )\t(ROOT (S (NP (JJ Conceptually))))\t(ROOT (S (NP (NN Product))))\tConceptually "
        "cream skimming has two basic dimensions - product and geography.\tProduct and geography are what "
        "make cream skimming work. \tneutral\tneutral\n",
        [{"idx": "0", "text": "Conceptually cream skimming has two basic dimensions - product and geography.",
          "text_pair": "Product and geography are what make cream skimming work. ", "label": "neutral"}],
    ),
    "MNLI/dev_matched.tsv": (
        "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
        "sentence2_parse\tsentence1\tsentence2\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label\n"
        "0\t63735\t63735n\tslate\t( ( The ( new rights ) ) ( are ( nice enough ) ) )\t( Everyone ( really "
        "( likes ( the ( newest benefits ) ) ) ) )\t(ROOT (S (NP (DT The))))\t(ROOT (S (NP (NN Everyone))))\t"
        "The new rights are nice enough\tEveryone really likes the newest benefits \tneutral\tentailment\t"
        "neutral\tneutral\tneutral\tneutral\n",
        [{"idx": "0", "text": "The new rights are nice enough",
          "text_pair": "Everyone really likes the newest benefits ", "label": "neutral"}],
    ),
    "MNLI/test_mismatched.tsv": (
        "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
        "sentence2_parse\tsentence1\tsentence2\n"
        "0\t31493\t31493\ttravel\t( ( Hierbas , ) )\t( ( Hierbas ) )\t(ROOT (NP (NNS Hierbas)))\t"
        "(ROOT (S (NP (NNS Hierbas))))\tHierbas, ans seco, ans dulce, and frigola are just a few names "
        "worth keeping a look-out for.\tHierbas is a name worth looking out for.\n",
        [{"idx": "0", "text": "Hierbas, ans seco, ans dulce, and frigola are just a few names worth keeping a "
          "look-out for.", "text_pair": "Hierbas is a name worth looking out for."}],
    ),
    "QNLI/dev.tsv": (
        "index\tquestion\tsentence\tlabel\n"
        "0\tWhat came into force after the new constitution was herald?\tAs of that day, the new "
        "constitution heralding the Second Republic came into force.\tentailment\n",
        [{"idx": "0", "text": "What came into force after the new constitution was herald?",
          "text_pair": "As of that day, the new constitution heralding the Second Republic came into force.",
          "label": "entailment"}],
    ),
    "QNLI/test.tsv": (
        "index\tquestion\tsentence\n0\tWhat organization is devoted to Jihad against Israel?\t"
        "For some decades prior to the First Palestine Intifada in 1987, the Muslim Brotherhood in "
        "Palestine took a \"quiescent\" stance towards Israel.\n",
        [{"idx": "0", "text": "What organization is devoted to Jihad against Israel?",
          "text_pair": "For some decades prior to the First Palestine Intifada in 1987, the Muslim Brotherhood "
          "in Palestine took a \"quiescent\" stance towards Israel."}],
    ),
    "WNLI/train.tsv": (
        "index\tsentence1\tsentence2\tlabel\n0\tI stuck a pin through a carrot. When I pulled the pin out, "
        "it had a hole.\tThe carrot had a hole.\t1\n",
        [{"idx": "0", "text": "I stuck a pin through a carrot. When I pulled the pin out, it had a hole.",
          "text_pair": "The carrot had a hole.", "label": "1"}],
    ),
    "RTE/train.tsv": (
        "index\tsentence1\tsentence2\tlabel\n0\tNo Weapons of Mass Destruction Found in Iraq Yet.\t"
        "Weapons of Mass Destruction Found in Iraq.\tnot_entailment\n",
        [{"idx": "0", "text": "No Weapons of Mass Destruction Found in Iraq Yet.",
          "text_pair": "Weapons of Mass Destruction Found in Iraq.", "label": "not_entailment"}],
    ),
    "MNLI-hf/validation_matched.tsv": (
        'premise\thypothesis\tlabel\tidx\n"He said ""no"", twice."\tHe spoke.\t0\t7\n',
        [{"text": 'He said "no", twice.', "text_pair": "He spoke.", "label": "0", "idx": "7"}],
    ),
    "QQP-hf/train.tsv": (
        "question1\tquestion2\tlabel\tidx\nWhy?\tWhy not?\t0\t1\n",
        [{"text": "Why?", "text_pair": "Why not?", "label": "0", "idx": "1"}],
    ),
    "QNLI-hf/train.tsv": (
        "question\tsentence\tlabel\tidx\nWho?\tHim.\t1\t2\n",
        [{"text": "Who?", "text_pair": "Him.", "label": "1", "idx": "2"}],
    ),
    "CoLA-hf/train.tsv": (
        "sentence\tlabel\tidx\nThe pond froze solid.\t1\t0\n",
        [{"text": "The pond froze solid.", "label": "1", "idx": "0"}],
    ),
}


@pytest.mark.parametrize("name", sorted(_GLUE_FILES))
def test_every_glue_layout_reads_as_canonical_columns(tmp_path, name):
    text, expected = _GLUE_FILES[name]
    path = tmp_path / name.replace("/", "-")
    write(path, text)
    assert detect_format(path) == "glue"
    assert load_records(path) == expected
    assert load_records(path, format="glue") == expected


def test_glue_tasks_tokenize_for_their_task(tmp_path, tok):
    """STS-B is regression on the score; MNLI has three classes; CoLA single sentences."""
    stsb = load_records(write(tmp_path / "stsb.tsv", _GLUE_FILES["STS-B/dev.tsv"][0]))
    examples, _ = build_examples(stsb, tok, DataConfig(task="regression"))
    assert [e["labels"] for e in examples] == [5.0, 2.4]
    mnli = _GLUE_FILES["MNLI/dev_matched.tsv"][0]
    row = mnli.splitlines()[1]
    more = [row.replace("\tneutral\n", "").rsplit("\t", 1)[0] + f"\t{g}" for g in ("entailment", "contradiction")]
    path = write(tmp_path / "mnli.tsv", mnli + "\n".join(more) + "\n")
    examples, stats = build_examples(load_records(path), tok, DataConfig(task="classification"))
    assert stats.label_names == ["contradiction", "entailment", "neutral"]
    assert [e["labels"] for e in examples] == [2, 1, 0]
    cola = load_records(write(tmp_path / "cola.tsv", _GLUE_FILES["CoLA/train.tsv"][0]))
    examples, stats = build_examples(cola, tok, DataConfig(task="classification"))
    assert [e["labels"] for e in examples] == [1, 0]
    assert tok.decode(examples[1]["input_ids"]) == "They drank the pub."


def test_unknown_glue_header_lists_layouts_and_flags(tmp_path):
    with pytest.raises(ConfigError, match=r"not a GLUE layout.*QQP.*STS-B.*MNLI.*QNLI.*CoLA train/dev.*--columns"):
        load_records(write(tmp_path / "g.tsv", "foo\tbar\n1\t2\n"), format="glue")
    # a TSV that is not GLUE keeps its own columns
    assert load_records(write(tmp_path / "own.tsv", "foo\tbar\n1\t2\n")) == [{"foo": "1", "bar": "2"}]


# ------------------------------------------------------------------ ShareGPT and Alpaca

_CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "bye"},
    {"role": "assistant", "content": "see you"},
]


def _in_loss(tok, example) -> str:
    return tok.decode([i for i, lab in zip(example["input_ids"], example["labels"], strict=True)
                       if lab != IGNORE_INDEX])


def test_sharegpt_trains_as_the_same_messages(tmp_path, chat_tok):
    speaker = {"system": "system", "user": "human", "assistant": "gpt"}
    sharegpt = {"conversations": [{"from": speaker[m["role"]], "value": m["content"]} for m in _CONVERSATION]}
    path = write(tmp_path / "sharegpt.jsonl", json.dumps(sharegpt) + "\n")
    records = load_records(path)
    assert detect_chat_format(records[0], "messages", "prompt") == "sharegpt"

    (got,), stats = build_examples(records, chat_tok, DataConfig(), source=str(path))
    (want,), _ = build_examples([{"messages": _CONVERSATION}], chat_tok, DataConfig())
    assert got == want  # the same tokens and the same loss mask as the messages record
    assert stats.chat_turns == "all"
    assert _in_loss(chat_tok, got) == "hello<|endoftext|>see you<|endoftext|>"

    # a top-level system prompt (LLaMA-Factory's layout) is the first turn
    alt = {"system": "Be brief.", "conversations": sharegpt["conversations"][1:]}
    assert to_messages(alt, "sharegpt", 0, "x") == _CONVERSATION


def test_sharegpt_role_names_map_and_unknown_ones_are_refused(chat_tok):
    assert {SHAREGPT_ROLES[s] for s in ("human", "gpt", "system", "chatgpt", "bard", "bing", "model")} == {
        "user", "assistant", "system"}
    rec = {"conversations": [{"from": "Human", "value": "q"}, {"from": "ChatGPT", "value": "a"}]}
    assert to_messages(rec, "sharegpt", 0, "x") == [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    bad = {"conversations": [{"from": "narrator", "value": "q"}, {"from": "gpt", "value": "a"}]}
    with pytest.raises(ConfigError, match=r"Record 0 of d.jsonl: turn 0 is from 'narrator'.*Known speakers: system"):
        build_examples([bad], chat_tok, DataConfig(), source="d.jsonl")
    with pytest.raises(ConfigError, match=r"turn 1 of 'conversations' must be an object with 'from' and 'value'"):
        build_examples([{"conversations": [{"from": "human", "value": "q"}, "a"]}], chat_tok, DataConfig())
    no_reply = {"conversations": [{"from": "human", "value": "q"}]}
    with pytest.raises(ConfigError, match="has no assistant message"):
        build_examples([no_reply], chat_tok, DataConfig())


def test_alpaca_maps_to_a_user_and_an_assistant_turn(chat_tok):
    with_input = {"instruction": "Translate to French.", "input": "cat", "output": "chat"}
    without = {"instruction": "Name a colour.", "input": "", "output": "red"}
    assert detect_chat_format(with_input, "messages", "prompt") == "alpaca"
    assert to_messages(with_input, "alpaca", 0, "x") == [
        {"role": "user", "content": "Translate to French.\n\ncat"}, {"role": "assistant", "content": "chat"}]
    assert to_messages(without, "alpaca", 0, "x")[0] == {"role": "user", "content": "Name a colour."}
    examples, stats = build_examples([with_input, without], chat_tok, DataConfig())
    want, _ = build_examples([{"messages": to_messages(r, "alpaca", 0, "x")} for r in (with_input, without)],
                             chat_tok, DataConfig())
    assert examples == want
    assert [_in_loss(chat_tok, e) for e in examples] == ["chat<|endoftext|>", "red<|endoftext|>"]
    rendered = "<|user|>Name a colour.<|endoftext|><|assistant|>red<|endoftext|>"
    assert chat_tok.decode(examples[1]["input_ids"]) == rendered
    with pytest.raises(ConfigError, match=r"Record 0 of x has no 'output' column, which Alpaca data \(--chat-format"):
        build_examples([{"instruction": "a"}], chat_tok, DataConfig(chat_format="alpaca"), source="x")


@needs_data
def test_alpaca_on_the_self_instruct_seed_tasks(chat_tok):
    """The 175 self-instruct seed tasks, flattened to Alpaca records (one per instance)."""
    seeds = load_records(SHARED / "instruction-seed" / "seed_tasks.jsonl")
    records = [{"instruction": s["instruction"], "input": inst["input"], "output": inst["output"]}
               for s in seeds for inst in s["instances"]]
    examples, stats = build_examples(records, chat_tok, DataConfig(max_length=4096))
    assert stats.num_examples == len(records) >= 175 and stats.num_dropped == 0
    for rec, ex in zip(records[:20], examples, strict=False):
        assert _in_loss(chat_tok, ex) == rec["output"] + "<|endoftext|>"


def test_chat_format_override_and_errors(chat_tok, tok):
    # both a prompt column and a conversation: detection takes the named column, the flag overrides it
    rec = {"prompt": "p", "completion": " c",
           "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    (plain,), _ = build_examples([rec], chat_tok, DataConfig())
    assert chat_tok.decode(plain["input_ids"]) == "p c<|endoftext|>"
    (chat,), _ = build_examples([rec], chat_tok, DataConfig(chat_format="sharegpt"))
    assert _in_loss(chat_tok, chat) == "a<|endoftext|>"
    with pytest.raises(ConfigError, match=r"the tokenizer has no chat template"):
        build_examples([rec], tok, DataConfig(chat_format="sharegpt"))
    # one entry point for every layout (what evaluation and generation read conversations with)
    assert to_messages({"chat": _CONVERSATION}, "messages", 0, "x", messages_column="chat") == _CONVERSATION
    with pytest.raises(ConfigError, match=r"Record 3 of x has no column 'messages' \(--messages-column\)"):
        to_messages({"chat": _CONVERSATION}, "messages", 3, "x")
    with pytest.raises(ConfigError, match=r"Unknown --chat-format 'vicuna'.*sharegpt, alpaca"):
        DataConfig(chat_format="vicuna").validate()
    with pytest.raises(ConfigError, match=r"no layout the sft task reads.*'conversations' list \(ShareGPT\).*"
                                          r"'instruction' and 'output' columns \(Alpaca\).*present: 'question'"):
        build_examples([{"question": "q"}], chat_tok, DataConfig())


# ------------------------------------------------------------------ through `lorakit train`


@pytest.fixture(scope="module")
def chat_model(tiny_model, tmp_path_factory):
    """The tiny Llama of conftest with a chat template, as a model directory."""
    import shutil

    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("chat-llama") / "model"
    shutil.copytree(tiny_model, path)
    t = AutoTokenizer.from_pretrained(path)
    t.chat_template = CHAT_TEMPLATE
    t.save_pretrained(path)
    return path


def _train(model, data, out, *extra) -> str:
    import contextlib
    import io

    from lorakit.cli import main

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main(["train", "--model", str(model), "--train-file", str(data), "--output-dir", str(out),
                     "--targets", "all-linear", "--batch-size", "2", "--max-steps", "3", "--log-every", "1",
                     "--warmup-ratio", "0", "--eval-generate", "false", *extra])
    assert code == 0, buffer.getvalue()
    return buffer.getvalue()


def test_train_on_sharegpt_parquet_packed(chat_model, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    words = ["red", "green", "blue", "cat", "dog", "sun"]
    rows = [{"conversations": [{"from": "human", "value": f"Say {w}"}, {"from": "gpt", "value": f"{w} {w}"}]}
            for w in words for _ in range(2)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "chat.parquet")
    printed = _train(chat_model, tmp_path / "chat.parquet", tmp_path / "run", "--packing", "--max-length", "36")
    assert "Train data: 12 examples, longest 17 tokens" in printed  # every conversation is 17 tokens
    assert "packed into 6 rows of up to 36 tokens" in printed  # two to a row
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len([e for e in events if e["event"] == "train"]) == 3


def test_train_on_a_headerless_tsv_with_columns(tiny_model, tmp_path):
    data = write(tmp_path / "pairs.tsv", "".join(f"Say {w}:\t {w} {w}\n" for w in ["red", "cat", "sun", "dog"]))
    printed = _train(tiny_model, data, tmp_path / "run", "--columns", "prompt,completion")
    assert "Train data: 4 examples" in printed
