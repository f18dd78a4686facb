"""One conversation format through train, generate and eval, on a tiny Llama whose GPT-2 tokenizer carries a
ChatML template: the prompt a command feeds the model is token for token the one training saw before the
assistant turn; messages data is scored on its last assistant turn; the closing hint is a runnable command."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch

from lorakit.cli import main
from models import SHARED

TOKENIZER = SHARED / "gpt2-tokenizer" / "tokenizer.json"
pytestmark = pytest.mark.skipif(not TOKENIZER.exists(), reason="../shared/data (GPT-2 tokenizer) not present")

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    """A tiny random Llama with the GPT-2 tokenizer plus ChatML's special tokens and template."""
    from transformers import GPT2TokenizerFast, LlamaConfig, LlamaForCausalLM
    path = tmp_path_factory.mktemp("tiny-chat")
    tok = GPT2TokenizerFast(tokenizer_file=str(TOKENIZER))
    tok.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    tok.pad_token = tok.eos_token
    tok.chat_template = CHATML
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


SYSTEM = "You answer with one colour."
ONE_TURN = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Sky?"},
            {"role": "assistant", "content": " blue"}]
TWO_TURNS = [{"role": "user", "content": "Grass?"}, {"role": "assistant", "content": " green"},
             {"role": "user", "content": "And the sun?"}, {"role": "assistant", "content": " yellow"}]


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    rows = [ONE_TURN, TWO_TURNS] * 8
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in rows))
    return path


def trained_prompt(model_dir: Path, messages: list[dict]) -> list[int]:
    """The token ids training puts before the last assistant turn of `messages` (the loss starts after them)."""
    from lorakit.data import DataConfig, build_examples
    from lorakit.models import load_model
    _, tok = load_model(str(model_dir))
    (ex,), _ = build_examples([{"messages": messages}], tok, DataConfig(task="sft"))
    last_prompt = max(i for i in range(len(ex["labels"])) if ex["labels"][i] == -100 and
                      i + 1 < len(ex["labels"]) and ex["labels"][i + 1] != -100)
    return ex["input_ids"][:last_prompt + 1]


EAGER = ["--cuda-graphs", "off"]  # decoding through `model.generate` on a GPU too, where the tests watch it


@pytest.fixture
def seen_prompts(monkeypatch) -> list[list[int]]:
    """The unpadded input ids of every `generate` call (which then returns one new token per prompt)."""
    from transformers import GenerationMixin
    seen: list[list[int]] = []

    def fake_generate(self, input_ids=None, attention_mask=None, **kwargs):
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            seen.append([t for t, m in zip(ids, mask) if m])
        return torch.cat([input_ids, torch.full_like(input_ids[:, :1], 42)], 1)

    monkeypatch.setattr(GenerationMixin, "generate", fake_generate)
    return seen


def test_generate_feeds_the_prompt_training_saw(chat_model, tmp_path, seen_prompts, capsys):
    convo = tmp_path / "convo.jsonl"
    convo.write_text(json.dumps({"messages": TWO_TURNS[:3]}) + "\nWhat about snow?\n")
    assert main(["generate", "--model", str(chat_model), "--system", SYSTEM, "--prompt", "Sky?",
                 "--input-file", str(convo), "--max-new-tokens", "1", *EAGER]) == 0
    assert seen_prompts[0] == trained_prompt(chat_model, ONE_TURN)
    # a conversation without a system turn gets --system's
    assert seen_prompts[1] == trained_prompt(chat_model, [ONE_TURN[0], *TWO_TURNS])
    # a plain line is a user turn after the --system turn
    assert seen_prompts[2] == trained_prompt(chat_model, [ONE_TURN[0], {"role": "user", "content": "What about snow?"},
                                                          {"role": "assistant", "content": "x"}])
    assert "### prompt: And the sun?" in capsys.readouterr().out

    # --raw: the text as it stands (prompt/completion training encodes it so)
    from lorakit.models import load_model
    _, tok = load_model(str(chat_model))
    assert main(["generate", "--model", str(chat_model), "--raw", "--prompt", "Sky?", "--max-new-tokens", "1",
                 *EAGER]) == 0
    assert seen_prompts[3] == tok("Sky?")["input_ids"]


def test_generate_reads_sharegpt_and_alpaca_lines_as_conversations(chat_model, tmp_path, seen_prompts):
    lines = tmp_path / "mixed.jsonl"
    sharegpt = {"conversations": [{"from": "system", "value": SYSTEM}, {"from": "human", "value": "Sky?"},
                                  {"from": "gpt", "value": " blue"}]}
    alpaca = {"instruction": "Sky?", "input": "", "output": " blue"}
    lines.write_text(json.dumps(sharegpt) + "\n" + json.dumps(alpaca) + "\n")
    assert main(["generate", "--model", str(chat_model), "--input-file", str(lines), "--max-new-tokens", "1",
                 *EAGER]) == 0
    assert seen_prompts[0] == trained_prompt(chat_model, ONE_TURN)
    assert seen_prompts[1] == trained_prompt(chat_model, ONE_TURN[1:])


def test_generate_refuses_chat_input_without_a_template(tiny_model, tmp_path, capsys):
    from models import cli_fails_cleanly
    cli_fails_cleanly(capsys, ["generate", "--model", str(tiny_model), "--system", "Be brief.", "--prompt", "Hi"],
                      "--system", "chat template")
    convo = tmp_path / "c.jsonl"
    convo.write_text(json.dumps({"messages": TWO_TURNS[:1]}) + "\n")
    cli_fails_cleanly(capsys, ["generate", "--model", str(tiny_model), "--input-file", str(convo)], "conversations")
    convo.write_text('{"messages": [oops\n')
    cli_fails_cleanly(capsys, ["generate", "--model", str(tiny_model), "--input-file", str(convo)], "line 1",
                      "messages")


def test_train_on_messages_evaluates_generation_and_prints_a_runnable_hint(chat_model, chat_file, tmp_path, capsys,
                                                                          monkeypatch):
    out = tmp_path / "run"
    assert main(["train", "--model", str(chat_model), "--train-file", str(chat_file), "--eval-file", str(chat_file),
                 "--output-dir", str(out), "--max-steps", "2", "--batch-size", "4", "--max-new-tokens", "2",
                 "--targets", "all-linear"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert "exact_match" in summary["before"] and "exact_match" in summary["after"]  # not skipped for messages
    printed = capsys.readouterr().out
    hint = printed.split("try it:\n", 1)[1].strip().splitlines()[0]
    assert "..." not in hint
    words = shlex.split(hint)
    assert words[:2] == ["lorakit", "generate"] and "--system" in words and words[words.index("--prompt") + 1] == "Sky?"

    from transformers import GenerationMixin
    seen = []
    real = GenerationMixin.generate

    def watch(self, input_ids=None, attention_mask=None, **kwargs):
        seen.append([t for t, m in zip(input_ids[0].tolist(), attention_mask[0].tolist()) if m])
        return real(self, input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    monkeypatch.setattr(GenerationMixin, "generate", watch)
    assert main(words[1:] + EAGER) == 0
    assert seen == [trained_prompt(chat_model, ONE_TURN)]
    assert capsys.readouterr().out.startswith("### prompt: Sky?")


def test_eval_generation_metrics_score_the_last_assistant_turn(chat_model, chat_file, tmp_path, capsys, monkeypatch,
                                                               seen_prompts):
    from lorakit.eval import metrics
    seen = {}
    real = metrics.generation_scores

    def without_meteor(hyps, refs, **kw):  # METEOR needs a JVM: covered in test_metrics
        seen["refs"] = refs
        return real(hyps, refs, with_meteor=False)

    monkeypatch.setattr(metrics, "generation_scores", without_meteor)
    assert main(["eval", "--model", str(chat_model), "--eval-file", str(chat_file), "--eval-generate", "false",
                 "--generation-metrics", "--max-new-tokens", "1", "--max-eval-examples", "2", *EAGER]) == 0
    assert seen["refs"] == [[" blue"], [" yellow"]]
    assert seen_prompts == [trained_prompt(chat_model, ONE_TURN), trained_prompt(chat_model, TWO_TURNS)]
    printed = capsys.readouterr()
    assert "scoring 2 of 16 examples" in printed.err
    result = json.loads(printed.out)
    assert result["examples_scored"] == 2 and result["examples_truncated"] == 0 and result["examples_dropped"] == 0


def test_generation_pairs_read_every_chat_layout(chat_model):
    from lorakit.data import DataConfig
    from lorakit.models import load_model
    from lorakit.train.evaluation import generation_pairs

    _, tok = load_model(str(chat_model))
    records = [{"messages": ONE_TURN[1:]}, {"instruction": "Sky?", "input": "", "output": " blue"},
               {"conversations": [{"from": "human", "value": "Sky?"}, {"from": "gpt", "value": " blue"}]}]
    prompts, refs = generation_pairs(records, tok, DataConfig(task="sft"))
    assert prompts[0] == prompts[1] == prompts[2] == trained_prompt(chat_model, ONE_TURN[1:])
    assert refs == [" blue"] * 3


def test_decoding_flags_reach_generate_and_are_checked(chat_model, monkeypatch, capsys):
    from transformers import GenerationMixin

    from models import cli_fails_cleanly
    seen = []

    def fake_generate(self, input_ids=None, attention_mask=None, **kwargs):
        seen.append(kwargs)
        return torch.cat([input_ids, torch.full_like(input_ids[:, :1], 42)], 1)

    monkeypatch.setattr(GenerationMixin, "generate", fake_generate)
    assert main(["generate", "--model", str(chat_model), "--prompt", "Sky?", "--max-new-tokens", "1", "--num-beams",
                 "10", "--length-penalty", "0.9", "--no-repeat-ngram-size", "4", *EAGER]) == 0
    assert seen[-1]["num_beams"] == 10 and seen[-1]["length_penalty"] == 0.9 and seen[-1]["no_repeat_ngram_size"] == 4
    assert main(["generate", "--model", str(chat_model), "--prompt", "Sky?", "--max-new-tokens", "1", *EAGER]) == 0
    assert "length_penalty" not in seen[-1] and "no_repeat_ngram_size" not in seen[-1]
    cli_fails_cleanly(capsys, ["generate", "--model", str(chat_model), "--prompt", "Sky?", "--length-penalty", "0.9"],
                      "--length-penalty", "--num-beams")
    cli_fails_cleanly(capsys, ["generate", "--model", str(chat_model), "--prompt", "Sky?", "--no-repeat-ngram-size",
                               "-1"], "--no-repeat-ngram-size")
