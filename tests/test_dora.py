"""DoRA (`LoraConfig(dora=True)`): the math against float64, PEFT's outputs and gradients both ways, exact
merge/unmerge, per-example routes, the fast path and its cached weight norm, and clear refusals."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

import lorakit as lk
import lorakit.functional as LF
from lorakit.errors import AdapterFileError, ConfigError, ShapeMismatchError
from models import example_input, make, run

peft = pytest.importorskip("peft")


@pytest.fixture(autouse=True)
def _reference_path():
    yield
    lk.set_fast_path("auto", triton=True)


def _perturb(model: nn.Module, std: float = 0.3, seed: int = 5, magnitude: bool = True) -> None:
    """Random A, B and (by default) magnitudes m * (1 + noise), so that every DoRA term matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lk.lora_layers(model):
            for a in layer.adapters.values():
                for p in (a.lora_A, a.lora_B):
                    p.copy_(torch.randn(p.shape, generator=g) * std)
                if magnitude and a.dora:
                    a.lora_magnitude_vector.mul_(1 + 0.3 * torch.randn(a.lora_magnitude_vector.shape, generator=g))


def _peft_dora(kind: str, seed: int = 5, **kwargs) -> nn.Module:
    """A PEFT DoRA model over `make(kind)` with random A, B and magnitudes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(make(kind), peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, **kwargs))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=g))
    return theirs


# -- the math ---------------------------------------------------------------------------------------
def _dora_float64(x, W, b, A, B, s, m):
    """m * (W + s*B@A) / ||W + s*B@A|| row-wise, applied to x, in float64: DoRA's definition."""
    V = W.double() + s * B.double() @ A.double()
    return x.double() @ (m.double()[:, None] * V / V.norm(dim=1, keepdim=True)).T + b.double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_equals_the_definition_in_float64(dtype):
    g = torch.Generator().manual_seed(0)
    x, W, b = torch.randn(5, 7, 12, generator=g), torch.randn(9, 12, generator=g), torch.randn(9, generator=g)
    A, B, m = torch.randn(3, 12, generator=g), torch.randn(9, 3, generator=g), torch.rand(9, generator=g) + 0.5
    got = LF.dora_linear(*(t.to(dtype) for t in (x, W, b, A, B)), 1.5, m.to(dtype))
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got.double(), _dora_float64(x, W, b, A, B, 1.5, m), rtol=tol, atol=tol)


@pytest.mark.parametrize("kind,targets", [("mlp", ["fc1", "fc2"]), ("gpt2", ["c_attn", "c_fc"])])
def test_layer_equals_the_definition_and_starts_at_the_base(kind, targets):
    """Zero-init B gives the base output (m starts at ||W|| row-wise); with random A, B, m each adapted layer
    computes the definition, also for GPT-2's Conv1D (weight stored (in, out))."""
    model = make(kind).double()
    x = example_input(kind)
    x = x.double() if x.is_floating_point() else x
    before = run(model, kind, x)
    lk.inject(model, lk.LoraConfig(r=3, alpha=6, targets=targets, dora=True))
    torch.testing.assert_close(run(model, kind, x), before, rtol=1e-12, atol=1e-12)
    _perturb(model)
    for _, layer in lk.lora_layers(model):
        a = layer.adapters["default"]
        h = torch.randn(4, layer.in_features, dtype=torch.float64)
        W = layer.weight_out_in()
        b = layer.bias if layer.bias is not None else torch.zeros(W.shape[0], dtype=torch.float64)
        torch.testing.assert_close(layer(h), _dora_float64(h, W, b, a.lora_A, a.full_B(), a.scale,
                                                           a.lora_magnitude_vector), rtol=1e-12, atol=1e-12)
    assert all(any(p is a.lora_magnitude_vector for p in lk.trainable_parameters(model))
               for _, layer in lk.lora_layers(model) for a in layer.adapters.values())


# -- PEFT, both ways ----------------------------------------------------------------------------------
CASES = [("llama", dict(target_modules=["q_proj", "v_proj", "down_proj"])),
         ("gpt2", dict(target_modules=["c_attn", "c_proj", "wte"], fan_in_fan_out=True)),
         ("llama", dict(target_modules="all-linear", use_rslora=True, lora_dropout=0.1)),
         ("conv", dict(target_modules=["conv1", "conv2", "conv1d", "fc"]))]


@pytest.mark.parametrize("kind,kwargs", CASES, ids=[f"{k}-{i}" for i, (k, _) in enumerate(CASES)])
def test_we_load_peft_and_peft_loads_ours(kind, kwargs, tmp_path):
    theirs = _peft_dora(kind, **kwargs).eval()
    x = example_input(kind)
    expected = run(theirs, kind, x)
    theirs.save_pretrained(str(tmp_path / "peft"))
    ours = make(kind)
    lk.load_adapter(ours, tmp_path / "peft")
    torch.testing.assert_close(run(ours, kind, x), expected, rtol=1e-5, atol=1e-5)
    lk.save_adapter(ours, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["use_dora"] is True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(make(kind), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(run(back, kind, x), expected, rtol=1e-5, atol=1e-5)
    # and a round trip through lorakit alone keeps every tensor
    again = make(kind)
    lk.load_adapter(again, tmp_path / "ours")
    for (_, a), (_, b) in zip(lk.lora_layers(ours), lk.lora_layers(again)):
        for name in ("lora_A", "lora_B", "lora_magnitude_vector"):
            assert torch.equal(getattr(a.adapters["default"], name), getattr(b.adapters["default"], name))


@pytest.mark.parametrize("mode", ["off", "on"])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_gradients_equal_peft(mode, dropout):
    """Training mode: outputs and the gradients of A, B and the magnitude equal PEFT's (its dropout too: the
    base term on x, the DoRA terms on dropout(x), one mask drawn in the same order from the same seed)."""
    kwargs = dict(target_modules=["q_proj", "v_proj", "gate_proj"], lora_dropout=dropout)
    theirs = _peft_dora("llama", **kwargs).train()
    ours = make("llama")
    lk.inject(ours, lk.LoraConfig(r=4, alpha=8, targets=kwargs["target_modules"], dora=True, dropout=dropout))
    params = dict(theirs.named_parameters())
    with torch.no_grad():
        for path, layer in lk.lora_layers(ours):
            a = layer.adapters["default"]
            for mine, key in ((a.lora_A, "lora_A.default.weight"), (a.lora_B, "lora_B.default.weight"),
                              (a.lora_magnitude_vector, "lora_magnitude_vector.default.weight")):
                mine.copy_(params[f"base_model.model.{path}.{key}"])
    ours.train()
    lk.set_fast_path(mode, triton=False)
    x = example_input("llama")
    torch.manual_seed(11)
    expected = run(theirs, "llama", x)
    expected.square().mean().backward()
    torch.manual_seed(11)
    got = run(ours, "llama", x)
    got.square().mean().backward()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for path, layer in lk.lora_layers(ours):
        a = layer.adapters["default"]
        for mine, key in ((a.lora_A, "lora_A.default.weight"), (a.lora_B, "lora_B.default.weight"),
                          (a.lora_magnitude_vector, "lora_magnitude_vector.default.weight")):
            torch.testing.assert_close(mine.grad, params[f"base_model.model.{path}.{key}"].grad, rtol=1e-4,
                                       atol=1e-6, msg=f"{path} {key}")


# -- merge and unmerge --------------------------------------------------------------------------------
CYCLES = [("llama", ["q_proj", "v_proj", "embed_tokens"], ["q_proj", "o_proj", "embed_tokens"]),
          ("conv", ["conv1", "conv1d"], ["conv1", "fc"])]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind,dora_targets,lora_targets", CYCLES, ids=[c[0] for c in CYCLES])
def test_fifty_merge_unmerge_cycles_restore_the_base_bit_for_bit(dtype, kind, dora_targets, lora_targets):
    """Linear, embedding and convolution weights, a DoRA and a LoRA adapter merged in either order, and now and
    then the first one unmerged alone (so the second is undone and made again)."""
    model = make(kind).to(dtype)
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, targets=dora_targets, dora=True), "d")
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, targets=lora_targets), "l")
    _perturb(model, std=0.2)
    weights = {path: layer.weight.detach().clone() for path, layer in lk.lora_layers(model)}
    for i in range(50):
        lk.merge(model, ["l", "d"] if i % 2 else ["d", "l"])
        if i % 5 == 0:  # take out the first merged one alone: the second is undone and made again
            for _, layer in lk.lora_layers(model):
                layer.unmerge([next(iter(layer.merged))])
        lk.unmerge(model)
    for path, layer in lk.lora_layers(model):
        assert layer.weight.dtype == dtype
        assert torch.equal(layer.weight.view(torch.int16), weights[path].view(torch.int16)), path


def test_merged_equals_unmerged_and_peft_merge(tmp_path):
    theirs = _peft_dora("llama", target_modules=["q_proj", "v_proj", "up_proj"]).eval()
    theirs.save_pretrained(str(tmp_path))
    x = example_input("llama")
    ours = make("llama")
    lk.load_adapter(ours, tmp_path)
    with torch.no_grad():
        expected = run(theirs, "llama", x)
        torch.testing.assert_close(run(ours, "llama", x), expected, rtol=1e-5, atol=1e-5)
        merged_peft = theirs.merge_and_unload()
        lk.merge(ours)
        torch.testing.assert_close(run(ours, "llama", x), expected, rtol=1e-5, atol=1e-5)
    for path, layer in lk.lora_layers(ours):
        torch.testing.assert_close(layer.weight, merged_peft.get_submodule(path).weight, rtol=1e-6, atol=1e-6)
    plain = lk.eject(ours, merge=True)
    assert not list(lk.lora_layers(plain)) and "lora_magnitude_vector" not in str(list(plain.state_dict()))
    with torch.no_grad():
        torch.testing.assert_close(run(plain, "llama", x), expected, rtol=1e-5, atol=1e-5)


def test_merge_takes_the_norm_without_other_merged_adapters():
    """PEFT's rule: a DoRA adapter merged after another is scaled by its norm on the unmerged weight."""
    model = make("mlp").double()
    lk.inject(model, lk.LoraConfig(r=2, alpha=4, targets=["fc1"]), "l")
    lk.inject(model, lk.LoraConfig(r=2, alpha=4, targets=["fc1"], dora=True), "d")
    _perturb(model)
    layer = model.fc1
    W0 = layer.weight.detach().clone()
    dl, d = layer.delta_weight("l"), layer.delta_weight("d").double()
    a = layer.adapters["d"]
    f = a.lora_magnitude_vector / (W0 + d).norm(dim=1)
    lk.merge(model, ["l", "d"])
    torch.testing.assert_close(layer.weight, f[:, None] * (W0 + dl.double() + d), rtol=1e-6, atol=1e-6)  # float32 merge


# -- several adapters, per example --------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["off", "on"])
def test_route_with_two_dora_adapters_equals_each_alone(mode):
    model = make("llama")
    for name in ("a", "b"):
        lk.inject(model, lk.LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj", "up_proj"], dora=True), name)
    _perturb(model, seed=7)
    lk.set_fast_path(mode, triton=False)
    x = example_input("llama", batch=4)
    names = ["a", "b", None, "a"]
    with torch.no_grad():
        with lk.route(model, names):
            got = run(model, "llama", x)
        alone = {}
        for name in ("a", "b"):
            lk.set_adapter(model, name)
            alone[name] = run(model, "llama", x)
        with lk.disabled(model):
            alone[None] = run(model, "llama", x)
    for row, name in enumerate(names):
        torch.testing.assert_close(got[row], alone[name][row], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(alone["a"], alone["b"])


# -- the fast path ---------------------------------------------------------------------------------
def test_fast_path_equals_reference_and_explain_names_the_path():
    """Training steps on the reference path, the fast path per linear, and fused (q/k/v and gate/up in one call,
    DoRA members scaled after it) give the same outputs and gradients; explain names each path."""
    model = make("llama")
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, targets="all-linear", dora=True))
    _perturb(model)
    x = example_input("llama")
    q = model.model.layers[0].self_attn.q_proj
    h = torch.randn(2, 3, 32)
    outs, grads = [], []
    for mode, fused in (("off", False), ("on", False), ("on", True)):
        lk.set_fast_path(mode, triton=False)
        handle = lk.fuse(model) if fused else None
        model.zero_grad()
        y = run(model.train(), "llama", x)
        y.square().mean().backward()
        outs.append(y)
        grads.append([p.grad.clone() for p in lk.trainable_parameters(model)])
        assert lk.explain(q, h).split(":")[0] == {"off": "reference", "on": "group" if fused else "dora"}[mode]
        if handle is not None:
            handle.undo()
    for y, gs in zip(outs[1:], grads[1:]):
        torch.testing.assert_close(y, outs[0], rtol=1e-5, atol=1e-5)
        for g1, g0 in zip(gs, grads[0]):
            torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-6)
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, targets=["q_proj"], dora=True), "other")
    lk.set_adapter(model, ["default", "other"])
    assert lk.explain(q, h).startswith("reference:") and "DoRA" in lk.explain(q, h)


def test_weight_norm_is_computed_once_until_a_tensor_changes(monkeypatch):
    """Repeated eval forwards reuse each layer's norm; an optimizer step (A, B change), a merge (W changes)
    and a load make the next forward compute it again."""
    model = make("llama")
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"], dora=True))
    _perturb(model)
    n_layers = len(list(lk.lora_layers(model)))
    calls = []
    real = LF.dora_weight_norm
    monkeypatch.setattr(LF, "dora_weight_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = example_input("llama")
    for mode in ("off", "on"):
        lk.set_fast_path(mode, triton=False)
        calls.clear()
        with torch.no_grad():
            first = run(model, "llama", x)
            for _ in range(3):
                torch.testing.assert_close(run(model, "llama", x), first, rtol=0, atol=0)
        assert len(calls) == (n_layers if mode == "off" else 0)  # "on" reuses the norms "off" made
    calls.clear()
    model.train()
    opt = torch.optim.SGD(lk.trainable_parameters(model), lr=0.1)
    run(model, "llama", x).square().mean().backward()
    assert len(calls) == 0  # the training step's forward still sees the same A and B
    opt.step()
    model.eval()
    with torch.no_grad():
        changed = run(model, "llama", x)
        run(model, "llama", x)
    assert len(calls) == n_layers and not torch.allclose(changed, first)
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, targets=["q_proj"]), "plain")
    _perturb(model, magnitude=False, seed=9)
    calls.clear()
    lk.set_adapter(model, ["plain", "default"])
    lk.merge(model, "plain")
    with torch.no_grad():
        run(model, "llama", x)
    assert len(calls) == n_layers  # every A and B was rewritten; q_proj's weight changed by the merge too


# -- refusals ------------------------------------------------------------------------------------------
def test_dora_on_a_quantized_layer_is_refused_and_the_model_kept(tmp_path):
    pytest.importorskip("bitsandbytes")
    import transformers

    make("llama").save_pretrained(tmp_path)
    q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=q, device_map="cpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=r"model\.layers\.0\.self_attn\.q_proj \(Linear4bit\).*quantized"):
        lk.inject(model, lk.LoraConfig(targets=["q_proj", "v_proj"], dora=True))
    assert not list(lk.lora_layers(model)) and lk.adapter_names(model) == []
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ConfigError, match="dora must be True or False"):
        lk.LoraConfig(dora="yes")


def test_files_that_disagree_with_their_config_are_refused(tmp_path):
    theirs = _peft_dora("llama", target_modules=["q_proj"])
    theirs.save_pretrained(str(tmp_path))
    cfg_path = tmp_path / "adapter_config.json"
    data = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps(dict(data, use_dora=False)))
    model = make("llama")
    with pytest.raises(AdapterFileError, match="use_dora=false"):
        lk.load_adapter(model, tmp_path)
    assert not list(lk.lora_layers(model))
    cfg_path.write_text(json.dumps(data))
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    key = next(k for k in tensors if "lora_magnitude_vector" in k)
    save_file(dict(tensors, **{key: tensors[key][:5]}), str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ShapeMismatchError, match="lora_magnitude_vector"):
        lk.load_adapter(model, tmp_path)
    save_file({k: v for k, v in tensors.items() if k != key}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(AdapterFileError, match="no lora_magnitude_vector"):
        lk.load_adapter(model, tmp_path)
    assert not list(lk.lora_layers(model))
