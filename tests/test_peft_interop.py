"""Files move both ways between lorakit and Hugging Face PEFT, with equal outputs."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import lorakit as lk
from models import example_input, make, randomize, run

peft = pytest.importorskip("peft")

OURS_TO_PEFT = [
    ("llama", dict(targets=["q_proj", "v_proj"])),
    ("llama", dict(targets="all-linear")),
    ("llama", dict(targets="all-linear", rslora=True, rank_pattern={"down_proj": 2}, alpha_pattern={"k_proj": 5.0})),
    ("gpt2", dict(targets=["c_attn"])),
    ("gpt2", dict(targets="all-linear")),
    ("gpt2", dict(targets=["c_attn"], slices={"c_attn": [True, False, True]})),
    ("gpt2", dict(targets=["c_attn"], slices={"c_attn": [True, False, True]}, rslora=True)),
    ("bert", dict(targets=["query", "value"], modules_to_save=["classifier"])),
]


@pytest.mark.parametrize("kind,kwargs", OURS_TO_PEFT, ids=[f"{k}-{i}" for i, (k, _) in enumerate(OURS_TO_PEFT)])
def test_peft_loads_ours(kind, kwargs, tmp_path):
    model = make(kind)
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, **kwargs))
    randomize(model, std=0.2)
    if kwargs.get("modules_to_save"):
        with torch.no_grad():
            model.classifier.weight.add_(1.0)
    x = example_input(kind)
    ours = run(model, kind, x)
    lk.save_adapter(model, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(make(kind), str(tmp_path)).eval()
        got = run(theirs, kind, x)
    torch.testing.assert_close(got, ours, rtol=1e-5, atol=1e-5)


PEFT_TO_OURS = [
    ("llama", dict(target_modules=["q_proj", "v_proj"])),
    ("llama", dict(target_modules="all-linear", use_rslora=True)),
    ("llama", dict(target_modules=["q_proj", "down_proj"], rank_pattern={"down_proj": 2}, alpha_pattern={"q_proj": 3})),
    ("llama", dict(target_modules=r".*layers\.1\..*_proj")),
    ("gpt2", dict(target_modules=["c_attn"], fan_in_fan_out=True)),
    ("gpt2", dict(target_modules=["c_attn", "c_proj", "c_fc", "wte"], fan_in_fan_out=True)),
    ("bert", dict(target_modules=["query", "value"], modules_to_save=["classifier"])),
    # PEFT saves the targeted embedding's own weight beside the adapter (save_embedding_layers="auto")
    ("llama", dict(target_modules=["q_proj", "embed_tokens"])),
]


@pytest.mark.parametrize("kind,kwargs", PEFT_TO_OURS, ids=[f"{k}-{i}" for i, (k, _) in enumerate(PEFT_TO_OURS)])
def test_we_load_peft(kind, kwargs, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(make(kind), peft.LoraConfig(r=4, lora_alpha=8, **kwargs)).eval()
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for name, p in theirs.named_parameters():
                if "lora_" in name or "modules_to_save" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        x = example_input(kind)
        expected = run(theirs, kind, x)
        theirs.save_pretrained(str(tmp_path))
    ours = make(kind)
    lk.load_adapter(ours, tmp_path)
    torch.testing.assert_close(run(ours, kind, x), expected, rtol=1e-5, atol=1e-5)
    # and back out again: our re-save loads in PEFT to the same outputs
    lk.save_adapter(ours, tmp_path / "again")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(make(kind), str(tmp_path / "again")).eval()
        torch.testing.assert_close(run(back, kind, x), expected, rtol=1e-5, atol=1e-5)


def test_config_fields_peft_understands(tmp_path):
    model = make("llama")
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, targets=["q_proj"], rslora=True, dropout=0.1))
    lk.save_adapter(model, tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "LORA" and data["r"] == 4 and data["lora_alpha"] == 8
    assert data["use_rslora"] is True and data["lora_dropout"] == 0.1
    assert "lorakit" not in data  # PEFT would warn about an unknown field
    from safetensors import safe_open
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["lorakit"])
    assert meta["base_fingerprint"]["modules"]["model.layers.0.self_attn.q_proj"] == [32, 32]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = peft.PeftConfig.from_pretrained(str(tmp_path))
    assert cfg.r == 4 and cfg.use_rslora


def test_a_peft_copy_of_changed_embeddings_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(make("llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"]))
        theirs.save_pretrained(str(tmp_path))
    weights = tmp_path / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in tensors if k.endswith("embed_tokens.base_layer.weight"))
    tensors[key] = tensors[key] + 1.0
    save_file(tensors, weights)
    ours = make("llama")
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(lk.AdapterFileError, match="changed embeddings.*resize_token_embeddings"):
        lk.load_adapter(ours, tmp_path)
    assert not list(lk.lora_layers(ours))
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in before.items())
