"""Bad input raises LoraError subclasses with messages that name the problem and the fix."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

import lorakit as lk
from models import SHARED, example_input, make, randomize, run


def saved_llama(tmp_path, **kwargs):
    model = make("llama")
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"], **kwargs))
    randomize(model)
    lk.save_adapter(model, tmp_path / "ad")
    return model, tmp_path / "ad"


def test_targets_matching_nothing_lists_real_names():
    with pytest.raises(lk.TargetError, match=r"matched no module.*q_proj"):
        lk.inject(make("llama"), lk.LoraConfig(targets=["query_projection"]))


@pytest.mark.parametrize("field,value", [("rank_pattern", {"down_proj": 2, "q_proj": 4}),
                                         ("alpha_pattern", {"layers.9.self_attn.q_proj": 3.0}),
                                         ("slices", {"k_proj": [True, False]})])
def test_pattern_keys_that_match_no_adapted_module_are_refused(field, value):
    model = make("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    unused = [k for k in value if k != "q_proj"]
    with pytest.raises(lk.ConfigError, match=rf"{field} key.*{unused[0]}.*none of the \d+ modules"):
        lk.inject(model, lk.LoraConfig(r=2, targets=["q_proj", "v_proj"], **{field: value}))
    assert not list(lk.lora_layers(model))
    assert before.keys() == model.state_dict().keys()


def test_target_of_unsupported_type():
    with pytest.raises(lk.TargetError, match="LlamaRMSNorm"):
        lk.inject(make("llama"), lk.LoraConfig(targets=["input_layernorm"]))


BAD_CONFIGS = [
    (dict(r=0), r"r must be a positive integer, got 0\b"),
    (dict(r=2.5), "r must be a positive integer, got 2.5"),
    (dict(r=True), "r must be a positive integer, got True"),
    (dict(alpha=-1), "alpha must be a positive finite number, got -1"),
    (dict(alpha=float("nan")), "alpha must be a positive finite number, got nan"),
    (dict(alpha=True), "alpha must be a positive finite number, got True"),
    (dict(alpha="16"), "alpha must be a positive finite number, got '16'"),
    (dict(dropout=1.0), r"dropout must be a number in \[0, 1\), got 1.0"),
    (dict(dropout="0.1"), r"dropout must be a number in \[0, 1\), got '0.1'"),
    (dict(rslora="false"), "rslora must be True or False, got 'false'"),
    (dict(init="xavier"), "init must be one of kaiming, gaussian, pissa, zeros; got 'xavier'"),
    (dict(bias="some"), "bias must be one of none, all, lora_only; got 'some'"),
    (dict(targets=[]), "targets must be a non-empty list"),
    (dict(targets=["q_proj", 3]), r"targets must be a non-empty list .*got \['q_proj', 3\]"),
    (dict(targets="(unclosed"), r"targets '\(unclosed' is not a valid regular expression"),
    (dict(targets="(.*)*x"), r"targets '\(\.\*\)\*x' is refused: it has a repeat inside a repeat"),
    (dict(exclude=5), "exclude must be None, a list of module names or a regex string; got 5"),
    (dict(rank_pattern={"v_proj": 0.5}), r"rank_pattern\['v_proj'\] must be a positive integer, got 0.5"),
    (dict(alpha_pattern={"q_proj": 8, "v_proj": float("inf")}),
     r"alpha_pattern\['v_proj'\] must be a positive finite number, got inf"),
    (dict(alpha_pattern={"v_proj": 1e308}), r"alpha_pattern\['v_proj'\] must be a positive finite number, got 1e\+308"),
    (dict(rank_pattern={"(a+)+$x": 2}), r"rank_pattern key '\(a\+\)\+\$x' is refused: it has a repeat inside a repeat"),
    (dict(slices={"c_attn": [False, False]}), r"slices\['c_attn'\] must be a list of booleans with at least one True"),
    (dict(modules_to_save="classifier"), "modules_to_save must be None or a list of module names; got 'classifier'"),
]


@pytest.mark.parametrize("bad,message", BAD_CONFIGS, ids=[str(b) for b, _ in BAD_CONFIGS])
def test_bad_config_values(bad, message):
    with pytest.raises(lk.ConfigError, match=message):
        lk.LoraConfig(**bad)


@pytest.mark.parametrize("kwargs,message", [
    (dict(path=None), "the adapter's path as a str or os.PathLike .*got None"),
    (dict(path=3), "the adapter's path as a str or os.PathLike .*got 3"),
    (dict(model=None), "expects a torch.nn.Module as model, got NoneType"),
    (dict(name=None), "Adapter name None must be letters"),
    (dict(name="a\n"), "Adapter name 'a.n' must be letters"),
    (dict(alpha="16"), "alpha must be a positive number .*got '16'"),
    (dict(alpha=float("nan")), "alpha must be a positive number .*got nan"),
    (dict(slices="qv"), "slices must be a list of booleans .*got 'qv'"),
    (dict(check_base="no"), "check_base must be True or False, got 'no'"),
])
def test_load_adapter_argument_types(tmp_path, kwargs, message):
    model, path = saved_llama(tmp_path)
    args = {"model": make("llama"), "path": path, **kwargs}
    with pytest.raises(lk.ConfigError, match=message):
        lk.load_adapter(args.pop("model"), args.pop("path"), **args)


def test_truncated_safetensors_names_the_file(tmp_path):
    _, path = saved_llama(tmp_path)
    weights = path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(lk.AdapterFileError, match="adapter_model.safetensors.*truncated or corrupt"):
        lk.load_adapter(make("llama"), path)


def test_malformed_config(tmp_path):
    _, path = saved_llama(tmp_path)
    (path / "adapter_config.json").write_text('{"r": 4, "lora_alpha": ')
    with pytest.raises(lk.AdapterFileError, match="adapter_config.json is not valid JSON"):
        lk.load_adapter(make("llama"), path)
    (path / "adapter_config.json").write_text('{"r": "four", "lora_alpha": 8}')
    with pytest.raises(lk.AdapterFileError, match="'r' must be a positive integer, found 'four'"):
        lk.load_adapter(make("llama"), path)


def test_empty_and_missing_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(lk.AdapterFileError, match="holds no adapter_config.json"):
        lk.load_adapter(make("llama"), tmp_path / "empty")
    with pytest.raises(lk.AdapterFileError, match="does not exist"):
        lk.load_adapter(make("llama"), tmp_path / "nope")


def test_other_size_names_module_and_both_shapes(tmp_path):
    _, path = saved_llama(tmp_path)
    from transformers import LlamaConfig, LlamaForCausalLM
    bigger = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=48, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(lk.ShapeMismatchError, match=r"model\.layers\.0\.self_attn\.q_proj.*\(48, 48\).*\(32, 32\)"):
        lk.load_adapter(bigger, path)
    assert not list(lk.lora_layers(bigger))  # nothing half-loaded


def test_other_architecture(tmp_path):
    _, path = saved_llama(tmp_path)
    with pytest.raises(lk.ShapeMismatchError, match="model.layers.0.self_attn.q_proj"):
        lk.load_adapter(make("gpt2"), path)
    # without lorakit's fingerprint (a PEFT file), the per-module shape check still catches it
    from safetensors.torch import load_file, save_file
    weights = path / "adapter_model.safetensors"
    save_file(load_file(weights), weights)
    with pytest.raises(lk.ShapeMismatchError, match="model.layers.0.self_attn.q_proj"):
        lk.load_adapter(make("gpt2"), path)


def test_unknown_adapter_name(tmp_path):
    model, _ = saved_llama(tmp_path)
    with pytest.raises(lk.AdapterNotFoundError, match="no adapter 'other'.*'default'"):
        lk.save_adapter(model, tmp_path / "x", name="other")
    with pytest.raises(lk.AdapterNotFoundError):
        lk.merge(model, "other")


def test_non_finite_delta_refused_and_weights_untouched():
    model = make("llama")
    lk.inject(model, lk.LoraConfig(r=4, targets=["q_proj", "v_proj"]))
    randomize(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.adapters["default"].lora_B[0, 0] = float("nan")
    with pytest.raises(lk.MergeError, match=r"layers\.1\.self_attn\.v_proj.*non-finite"):
        lk.merge(model)
    for k, v in model.state_dict().items():
        if "adapters" not in k:
            assert torch.equal(v, before[k]), k


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch " + os.environ["LORAKIT_PWNED"],))


def test_pickle_payload_never_runs(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("LORAKIT_PWNED", str(marker))
    evil = tmp_path / "evil.bin"
    with open(evil, "wb") as f:
        pickle.dump({"x.lora_A": _Payload()}, f)
    torch.save({"a": _Payload()}, tmp_path / "evil.pt")
    for file in (evil, tmp_path / "evil.pt"):
        with pytest.raises(lk.AdapterFileError, match="never runs pickled code"):
            lk.load_adapter(make("llama"), file, alpha=16)
    # the same through a PEFT-style directory holding adapter_model.bin
    _, path = saved_llama(tmp_path)
    (path / "adapter_model.safetensors").unlink()
    os.replace(evil, path / "adapter_model.bin")
    with pytest.raises(lk.AdapterFileError):
        lk.load_adapter(make("llama"), path)
    assert not marker.exists()


@pytest.mark.parametrize("other_files", [False, True], ids=["adapter-only", "in-place"])
def test_interrupted_save_keeps_the_old_adapter(tmp_path, monkeypatch, other_files):
    model, path = saved_llama(tmp_path)
    if other_files:
        (path / "README.md").write_text("mine")
    old = {p.name: p.read_bytes() for p in path.iterdir()}
    import errno

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(lk.AdapterFileError, match="Could not write the adapter to .*No space left on device"):
        lk.save_adapter(model, path)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == old
    assert [p.name for p in tmp_path.iterdir()] == ["ad"]


LORALIB = SHARED / "loralib-checkpoint" / "roberta_base_lora_mnli.bin"


@pytest.mark.skipif(not LORALIB.exists(), reason="../shared/data not present")
def test_real_loralib_checkpoint_into_roberta_base(tmp_path):
    from transformers import RobertaConfig, RobertaForSequenceClassification
    torch.manual_seed(0)
    cfg = RobertaConfig(vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                        intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1, num_labels=3,
                        pad_token_id=1)
    model = RobertaForSequenceClassification(cfg).eval()
    x = torch.randint(3, 1000, (2, 12))
    base_out = model(input_ids=x).logits
    with pytest.raises(lk.ConfigError, match="alpha"):
        lk.load_adapter(model, LORALIB)
    lk.load_adapter(model, LORALIB, alpha=16)
    layers = dict(lk.lora_layers(model))
    assert len(layers) == 24
    ckpt = torch.load(LORALIB, map_location="cpu", weights_only=True)
    q = layers["roberta.encoder.layer.3.attention.self.query"]
    a = q.adapters["default"]
    assert a.r == 8 and a.scale == 2.0
    assert torch.equal(a.lora_A, ckpt["roberta.encoder.layer.3.attention.self.query.lora_A"])
    assert torch.equal(model.classifier.out_proj.weight, ckpt["classifier.out_proj.weight"])
    out = model(input_ids=x).logits
    assert not torch.allclose(out, base_out)
    # the update is exactly 2 * B @ A on the query weight
    h = torch.randn(3, 768)
    expected = torch.nn.functional.linear(h, q.weight, q.bias) + 2.0 * h @ a.lora_A.t() @ a.lora_B.t()
    torch.testing.assert_close(q(h), expected)
    # convert to PEFT's format and back
    lk.save_adapter(model, tmp_path / "conv")
    fresh = RobertaForSequenceClassification(cfg).eval()
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if ".adapters." not in k}, strict=False)
    with torch.no_grad():  # the base weights, not the trained head: the head comes with the adapter
        torch.manual_seed(9)
        fresh.classifier.out_proj.weight.normal_()
    lk.load_adapter(fresh, tmp_path / "conv")
    torch.testing.assert_close(fresh(input_ids=x).logits, out)


def test_routing_input_must_have_batch_first():
    model = make("mlp")
    lk.inject(model, lk.LoraConfig(r=2, targets=["fc1"]), name="a")
    x = example_input("mlp", batch=3)
    with lk.route(model, ["a", None, "a"]):
        assert run(model, "mlp", x).shape == (3, 5)
        with pytest.raises(lk.StateError, match=r"3 adapter names but this batch has 1 rows.*\(1, 3, 12\)"):
            run(model, "mlp", x.unsqueeze(0))  # (seq, batch, features): the batch is not first
        with pytest.raises(lk.StateError, match="3 adapter names but this batch has 2 rows"):
            run(model, "mlp", x[:2])
