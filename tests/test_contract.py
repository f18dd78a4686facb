"""Contract tests over a table of tiny models x configs (see STYLE.md, principle 8), each run three ways: the
reference path ("off"), the fast path's fused Functions ("on", which run on CPU too), and the fast path after
`lk.fuse` ("fused": sibling groups and rebuilt inputs)."""

from __future__ import annotations

import pytest
import torch

import lorakit as lk
from models import clone, example_input, make, randomize, run

# (model kind, LoraConfig kwargs)
CASES = [
    ("mlp", dict(targets=["fc1", "fc2"])),
    ("mlp", dict(targets="all-linear", init="gaussian", rslora=True)),
    ("conv", dict(targets=["conv1", "conv2", "conv1d", "fc"])),
    ("gpt2", dict(targets=["c_attn"])),
    ("gpt2", dict(targets="all-linear", bias="lora_only")),
    ("gpt2", dict(targets=["c_attn"], slices={"c_attn": [True, False, True]})),
    ("gpt2", dict(targets=["wte", "c_fc"])),
    ("llama", dict(targets=["q_proj", "v_proj"])),
    ("llama", dict(targets="all-linear", rank_pattern={"down_proj": 2}, alpha_pattern={"o_proj": 3.0})),
    ("llama", dict(targets=r".*\.(gate|up)_proj", exclude=["layers.0.mlp.up_proj"])),
    ("bert", dict(targets=["query", "value"], modules_to_save=["classifier"])),
]
IDS = [f"{k}-{i}" for i, (k, _) in enumerate(CASES)]


@pytest.fixture(autouse=True, params=["off", "on", "fused"])
def fast_path(request):
    lk.set_fast_path("off" if request.param == "off" else "on")
    yield request.param
    lk.set_fast_path("auto")


def adapted(kind, kwargs, seed=0, fast_path="off"):
    model = make(kind, seed)
    base = clone(model)
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, **kwargs))
    if fast_path == "fused":
        lk.fuse(model)
    return model, base


@pytest.mark.parametrize("kind,kwargs", CASES, ids=IDS)
def test_fresh_adapter_gives_base_output(kind, kwargs, fast_path):
    model, base = adapted(kind, kwargs, fast_path=fast_path)
    x = example_input(kind)
    torch.testing.assert_close(run(model, kind, x), run(base, kind, x), rtol=0, atol=0)


@pytest.mark.parametrize("kind,kwargs", CASES, ids=IDS)
def test_merged_equals_unmerged_and_unmerge_restores(kind, kwargs, fast_path):
    model, base = adapted(kind, kwargs, fast_path=fast_path)
    randomize(model, std=0.2)
    x = example_input(kind)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    unmerged = run(model, kind, x)
    assert not torch.allclose(unmerged, run(base, kind, x), atol=1e-4)  # the adapter does something
    lk.merge(model)
    lk.merge(model)  # merging twice merges once
    torch.testing.assert_close(run(model, kind, x), unmerged, rtol=1e-4, atol=1e-4)
    lk.unmerge(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    torch.testing.assert_close(run(model, kind, x), unmerged, rtol=0, atol=0)


@pytest.mark.parametrize("kind,kwargs", CASES, ids=IDS)
def test_disabled_is_base_and_only_adapters_get_gradients(kind, kwargs, fast_path):
    model, base = adapted(kind, kwargs, fast_path=fast_path)
    randomize(model, std=0.2)
    x = example_input(kind)
    with lk.disabled(model):
        torch.testing.assert_close(run(model, kind, x), run(base, kind, x), rtol=0, atol=0)
    model.train()
    run(model, kind, x).float().pow(2).mean().backward()
    cfg = lk.LoraConfig(r=4, alpha=8, **kwargs)
    for name, p in model.named_parameters():
        is_lora = ".adapters." in name
        wrapped = dict(lk.lora_layers(model))
        is_bias = cfg.bias == "lora_only" and name.endswith(".bias") and name.rsplit(".", 1)[0] in wrapped
        is_saved = bool(cfg.modules_to_save) and any(f".{m}." in f".{name}" for m in cfg.modules_to_save)
        should_train = is_lora or is_bias or is_saved
        assert p.requires_grad == should_train, name
        if not should_train:
            assert p.grad is None, name
    grads = [p.grad for n, p in model.named_parameters() if ".adapters." in n]
    assert grads and all(g is not None for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    assert {id(p) for p in lk.trainable_parameters(model)} == {id(p) for p in model.parameters() if p.requires_grad}


@pytest.mark.parametrize("kind,kwargs", CASES, ids=IDS)
def test_save_load_round_trip(kind, kwargs, tmp_path, fast_path):
    model, base = adapted(kind, kwargs, fast_path=fast_path)
    randomize(model, std=0.2)
    if kwargs.get("modules_to_save") or kwargs.get("bias"):  # trained extras travel with the adapter
        with torch.no_grad():
            for p in lk.trainable_parameters(model):
                if p.dim() < 2 or p.shape[0] < 4:
                    p.add_(0.1)
    x = example_input(kind)
    expected = run(model, kind, x)
    lk.save_adapter(model, tmp_path / "ad")
    assert sorted(f.name for f in (tmp_path / "ad").iterdir()) == ["README.md", "adapter_config.json",
                                                                 "adapter_model.safetensors"]
    fresh = make(kind, 0)
    lk.load_adapter(fresh, tmp_path / "ad")
    torch.testing.assert_close(run(fresh, kind, x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("kind,kwargs", CASES, ids=IDS)
def test_eject_merge_gives_plain_model(kind, kwargs, fast_path):
    model, _ = adapted(kind, kwargs, fast_path=fast_path)
    randomize(model, std=0.2)
    x = example_input(kind)
    expected = run(model, kind, x)
    plain = lk.eject(model, merge=True)
    assert not list(lk.lora_layers(plain))
    reference_types = {type(m).__name__ for m in make(kind).modules()}
    assert {type(m).__name__ for m in plain.modules()} == reference_types
    assert not any("forward" in m.__dict__ for m in plain.modules())  # nothing left patched (`lk.fuse`)
    torch.testing.assert_close(run(plain, kind, x), expected, rtol=1e-4, atol=1e-4)
    assert set(plain.state_dict()) == set(make(kind).state_dict())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_unmerge_bit_exact_after_many_cycles(dtype):
    model = make("llama").to(dtype)
    lk.inject(model, lk.LoraConfig(r=8, alpha=16, targets="all-linear"))
    randomize(model, std=0.05)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(50):
        lk.merge(model)
        lk.unmerge(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v.view(torch.int16) if v.dtype in (torch.bfloat16, torch.float16) else v,
                           before[k].view(torch.int16) if v.dtype in (torch.bfloat16, torch.float16) else before[k]), k


def test_merge_rounds_once_from_float32():
    model = make("llama").to(torch.bfloat16)
    lk.inject(model, lk.LoraConfig(r=8, alpha=16, targets=["q_proj"]))
    randomize(model, std=0.05)
    layer = model.model.layers[0].self_attn.q_proj
    w0 = layer.weight.detach().clone()
    delta = layer.delta_weight("default")
    lk.merge(model)
    assert torch.equal(layer.weight, (w0.float() + delta).to(torch.bfloat16))


def test_pissa_keeps_output_and_rslora_scales():
    model = make("llama")
    base = clone(model)
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"], init="pissa"))
    x = example_input("llama")
    torch.testing.assert_close(run(model, "llama", x), run(base, "llama", x), rtol=1e-4, atol=1e-4)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.adapters["default"].lora_B.abs().sum() > 0  # not the zero init
    rs = make("llama")
    lk.inject(rs, lk.LoraConfig(r=16, alpha=8, targets=["q_proj"], rslora=True))
    assert rs.model.layers[0].self_attn.q_proj.adapters["default"].scale == pytest.approx(8 / 4)


def test_sliced_adapter_only_touches_enabled_slices():
    model = make("gpt2")
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, targets=["c_attn"], slices={"c_attn": [True, False, True]}))
    randomize(model)
    layer = model.transformer.h[0].attn.c_attn
    delta = layer.delta_weight("default")  # (in, out): the Conv1D weight layout
    assert delta.shape == layer.weight.shape
    n = delta.shape[1] // 3
    assert delta[:, n:2 * n].abs().max() == 0  # k slice untouched
    assert delta[:, :n].abs().max() > 0 and delta[:, 2 * n:].abs().max() > 0
    assert layer.adapters["default"].lora_A.shape == (8, 32)
    assert layer.adapters["default"].lora_B.shape == (64, 4)


def test_merge_refuses_tied_embedding():
    from transformers import GPT2Config, GPT2LMHeadModel
    model = GPT2LMHeadModel(GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=1, n_head=4))
    lk.inject(model, lk.LoraConfig(r=2, targets=["wte"]))
    with pytest.raises(lk.StateError, match="lm_head.weight"):
        lk.merge(model)
