"""LoRA on bases quantized by bitsandbytes (QLoRA), as transformers' BitsAndBytesConfig loads them, on the CPU.

Every quantized path is checked against the reference computed on the dequantized weight.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")

import lorakit as lk  # noqa: E402
from lorakit import functional as LF  # noqa: E402
from lorakit.quant import dequantize  # noqa: E402

QUANTS = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "nf4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "fp4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True),
    "int8": dict(load_in_8bit=True),
}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama")
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def load(base_dir, quant: str):
    q = transformers.BitsAndBytesConfig(**QUANTS[quant])
    return transformers.LlamaForCausalLM.from_pretrained(base_dir, quantization_config=q, device_map="cpu").eval()


def adapted(base_dir, quant: str, name: str = "default", seed: int = 1, model=None):
    model = model if model is not None else load(base_dir, quant)
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, targets="all-linear"), name=name)
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, layer in lk.lora_layers(model):
            layer.adapters[name].lora_B.normal_(std=0.1)  # B = 0 would hide the adapter term
    return model


def packed(model) -> dict[str, torch.Tensor]:
    """Every quantized weight's storage, copied."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.is_floating_point()}


TOKENS = torch.tensor([[1, 5, 9, 13, 2], [7, 3, 3, 60, 0]])


@pytest.mark.parametrize("quant", list(QUANTS))
def test_forward_is_quantized_base_plus_reference_adapter_term(base_dir, quant):
    model = adapted(base_dir, quant)
    path, layer = next(iter(lk.lora_layers(model)))
    assert type(layer._base).__name__ == ("Linear8bitLt" if quant == "int8" else "Linear4bit")
    a = layer.adapters["default"]
    assert a.lora_A.dtype == torch.float32 and a.lora_A.requires_grad
    x = torch.randn(2, 3, layer.in_features)
    y = layer(x)
    term = LF.lora_delta_out(x.double(), a.lora_A.double(), a.lora_B.double(), a.scale)
    if quant == "int8":  # its forward quantizes the input too: the base term is that forward's
        base = layer._base(x).double()
    else:  # 4-bit on the CPU: the matmul of the dequantized weight
        base = F.linear(x.double(), dequantize(layer._base).double())
    torch.testing.assert_close(y.double(), base + term, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quant", ["nf4-dq", "int8"])
def test_only_adapters_train_and_quantized_weights_never_change(base_dir, quant):
    model = adapted(base_dir, quant)
    before = packed(model)
    assert before, "the loaded model holds quantized weights"
    opt = torch.optim.SGD(lk.trainable_parameters(model), lr=0.1)
    model(TOKENS, labels=TOKENS).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(n.split(".")[-1] in ("lora_A", "lora_B") for n in with_grad)
    opt.step()
    after = packed(model)
    assert all(torch.equal(before[n], after[n]) for n in before)


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_disabled_gives_exactly_the_quantized_base(base_dir, quant):
    want = load(base_dir, quant)(TOKENS).logits
    model = adapted(base_dir, quant)
    with lk.disabled(model):
        got = model(TOKENS).logits
    assert torch.equal(got, want)
    assert not torch.allclose(model(TOKENS).logits, want)


def test_save_load_round_trip_and_state_dict_keys(base_dir, tmp_path):
    model = adapted(base_dir, "nf4")
    want = model(TOKENS).logits
    keys = set(load(base_dir, "nf4").state_dict())
    assert {k for k in model.state_dict() if "lora_" not in k} == keys  # absmax, quant_map ... kept
    lk.save_adapter(model, tmp_path / "a")
    other = lk.load_adapter(load(base_dir, "nf4"), tmp_path / "a")
    torch.testing.assert_close(other(TOKENS).logits, want, rtol=0, atol=0)


def test_several_adapters_and_route(base_dir):
    model = adapted(base_dir, "nf4", "one", seed=1)
    adapted(base_dir, "nf4", "two", seed=2, model=model)
    outs = {}
    for n in ("one", "two"):
        lk.set_adapter(model, n)
        outs[n] = model(TOKENS).logits
    with lk.disabled(model):
        outs[None] = model(TOKENS).logits
    with lk.route(model, ["two", None]):
        routed = model(TOKENS).logits
    torch.testing.assert_close(routed[0], outs["two"][0])
    torch.testing.assert_close(routed[1], outs[None][1])


def test_merge_refused_and_nothing_changes(base_dir):
    model = adapted(base_dir, "nf4")
    before, want = packed(model), model(TOKENS).logits
    with pytest.raises(lk.MergeError, match=r"quantized.*eject\(model, merge=True\)"):
        lk.merge(model)
    assert all(torch.equal(p, packed(model)[n]) for n, p in before.items())
    assert not any(layer.merged for _, layer in lk.lora_layers(model))
    assert torch.equal(model(TOKENS).logits, want)


@pytest.mark.parametrize("quant", ["nf4", "fp4-dq", "int8"])
def test_eject_merge_writes_dequantized_plus_update_rounded_once(base_dir, quant):
    model = adapted(base_dir, quant)
    want = {}
    for path, layer in lk.lora_layers(model):
        a = layer.adapters["default"]
        w = dequantize(layer._base)
        want[path] = (w.float() + a.scale * (a.lora_B.detach() @ a.lora_A.detach())).to(w.dtype)
    adapted_out = model(TOKENS).logits
    lk.eject(model, merge=True)
    for path, w in want.items():
        module = model.get_submodule(path)
        assert type(module) is nn.Linear and module.weight.dtype == w.dtype
        assert torch.equal(module.weight, w)
    if quant != "int8":  # 4-bit forward is the dequantized matmul: the merged model is the trained one
        torch.testing.assert_close(model(TOKENS).logits, adapted_out, rtol=1e-4, atol=1e-4)


def test_eject_without_merge_gives_the_quantized_layers_back(base_dir):
    want = load(base_dir, "nf4")(TOKENS).logits
    model = lk.eject(adapted(base_dir, "nf4"), merge=False)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert torch.equal(model(TOKENS).logits, want)


def test_explain_names_the_fused_path_and_why_the_reference_runs_elsewhere(base_dir):
    model = adapted(base_dir, "nf4")
    lk.inject(model, lk.LoraConfig(r=2, targets="all-linear"), name="other")
    _, layer = next(iter(lk.lora_layers(model)))
    x = torch.randn(2, 3, layer.in_features)
    lk.set_fast_path("on")
    try:
        assert lk.explain(layer, x).startswith("quantized: the 4-bit base dequantized")
        with lk.route(model, ["default", "other"]):
            assert lk.explain(layer, x).startswith("reference") and "unrouted" in lk.explain(layer, x)
        lk.set_adapter(model, ["default", "other"])
        assert lk.explain(layer, x).startswith("reference") and "one unmerged" in lk.explain(layer, x)
    finally:
        lk.set_fast_path("auto")
    int8 = adapted(base_dir, "int8")
    _, layer = next(iter(lk.lora_layers(int8)))
    lk.set_fast_path("on")
    try:
        assert "4-bit bases" in lk.explain(layer, x)
    finally:
        lk.set_fast_path("auto")


class IntLinear(nn.Module):
    """A stand-in for another library's quantized linear: an int8 weight and its own forward."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randint(-8, 8, (4, 4), dtype=torch.int8), requires_grad=False)

    def forward(self, x):
        return x @ self.weight.float().t()


@pytest.mark.parametrize("targets", [["q", "proj"], "all-linear"])
def test_unsupported_quantized_layer_is_a_clear_error_and_nothing_changes(targets):
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(4, 4))
    model.add_module("q", IntLinear())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lk.TargetError, match=r"IntLinear.*quantized.*supported quantized layers: bitsandbytes"):
        lk.inject(model, lk.LoraConfig(r=2, targets=targets))
    assert type(model.proj) is nn.Linear and type(model.q) is IntLinear and not lk.adapter_names(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_pissa_on_a_quantized_layer_is_refused(base_dir):
    model = load(base_dir, "nf4")
    with pytest.raises(lk.StateError, match="pissa"):
        lk.inject(model, lk.LoraConfig(r=2, targets=["q_proj"], init="pissa"))
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"


def test_peft_loads_an_adapter_made_on_a_4bit_base_with_the_same_outputs(base_dir, tmp_path):
    peft = pytest.importorskip("peft")
    model = adapted(base_dir, "nf4")
    want = model(TOKENS).logits
    lk.save_adapter(model, tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(load(base_dir, "nf4"), tmp_path / "a").eval()
    torch.testing.assert_close(theirs(TOKENS).logits, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quant", ["nf4-dq", "int8"])
def test_a_peft_qlora_adapter_loads_with_peft_outputs(base_dir, tmp_path, quant):
    peft = pytest.importorskip("peft")
    theirs = peft.get_peft_model(load(base_dir, quant), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    theirs.eval()
    want = theirs(TOKENS).logits
    theirs.save_pretrained(tmp_path / "peft")
    ours = load(base_dir, quant)
    lk.load_adapter(ours, tmp_path / "peft")
    assert sum(1 for _ in lk.lora_layers(ours)) == 7
    torch.testing.assert_close(ours(TOKENS).logits, want, rtol=1e-5, atol=1e-5)


def test_fuse_leaves_quantized_siblings_ungrouped(base_dir):
    model = adapted(base_dir, "nf4")
    want = model(TOKENS).logits
    lk.set_fast_path("on")
    try:
        handle = lk.fuse(model)
        assert not handle.groups and any("quantized" in why for _, why in handle.skipped)
        assert torch.equal(model(TOKENS).logits, want)
    finally:
        lk.unfuse(model)
        lk.set_fast_path("auto")


@pytest.fixture(scope="module")
def model_dir(base_dir):
    """base_dir with a word-level tokenizer of the model's 64 tokens, as `load_model` needs one."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": 0, "[UNK]": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 64)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                         eos_token="</s>").save_pretrained(base_dir)
    return base_dir


@pytest.mark.parametrize("kind,cls", [("nf4", "Linear4bit"), ("int8", "Linear8bitLt")])
def test_load_model_quantizes_at_load(model_dir, kind, cls):
    from lorakit.models import load_model

    model, _ = load_model(model_dir, quantize=kind)
    assert type(model.model.layers[0].mlp.up_proj).__name__ == cls
    lk.inject(model, lk.LoraConfig(r=2, targets="all-linear"))
    assert model(TOKENS).logits.shape == (2, 5, 64)


def test_load_model_refuses_unknown_or_double_quantization(model_dir, tmp_path):
    from lorakit.models import load_model

    with pytest.raises(lk.ConfigError, match="nf4, fp4, int8"):
        load_model(model_dir, quantize="int4")
    load(model_dir, "nf4").save_pretrained(tmp_path)
    with pytest.raises(lk.ConfigError, match="quantized already"):
        load_model(tmp_path, quantize="nf4")


def test_cli_merge_quantize_writes_dequantized_plus_update(model_dir, tmp_path):
    from lorakit import cli, quant
    from lorakit.models import load_model

    assert cli.QUANTIZE == quant.QUANTIZE
    model, _ = load_model(model_dir, quantize="nf4")
    adapted(model_dir, "nf4", model=model)
    want = {}
    for path, layer in lk.lora_layers(model):
        a = layer.adapters["default"]
        w = dequantize(layer._base)
        want[path] = (w.float() + a.scale * (a.lora_B.detach() @ a.lora_A.detach())).to(w.dtype)
    lk.save_adapter(model, tmp_path / "a")
    assert cli.main(["merge", "--model", str(model_dir), "--adapter", str(tmp_path / "a"),
                     "--output", str(tmp_path / "out"), "--quantize", "nf4"]) == 0
    merged = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out")
    assert getattr(merged.config, "quantization_config", None) is None
    for path, w in want.items():
        assert torch.equal(merged.get_submodule(path).weight, w)
    torch.testing.assert_close(merged(TOKENS).logits, model(TOKENS).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("installed", [None, "0.42.0"])
def test_bitsandbytes_missing_or_too_old_is_a_clear_error(monkeypatch, installed):
    import importlib.metadata

    from lorakit import quant

    def version(name):
        if installed is None:
            raise importlib.metadata.PackageNotFoundError(name)
        return installed

    monkeypatch.setattr(importlib.metadata, "version", version)
    with pytest.raises(lk.ConfigError, match=r"needs bitsandbytes >= 0\.45 .*pip install"):
        quant.bnb_config("nf4")


def test_cli_merge_requantize_writes_the_quantized_merge_and_reports_its_loss(model_dir, tmp_path, capsys):
    import re

    from lorakit import cli
    from lorakit.models import load_model

    model, _ = load_model(model_dir, quantize="nf4")
    adapted(model_dir, "nf4", model=model)
    lk.save_adapter(model, tmp_path / "a")
    paths = [p for p, _ in lk.lora_layers(model)]
    common = ["merge", "--model", str(model_dir), "--adapter", str(tmp_path / "a"), "--quantize", "nf4"]
    assert cli.main(common + ["--output", str(tmp_path / "m16")]) == 0
    capsys.readouterr()
    assert cli.main(common + ["--output", str(tmp_path / "mq"), "--requantize", "nf4"]) == 0
    printed = capsys.readouterr().out
    # what was written: the 16-bit merge quantized as transformers quantizes it
    written, _ = load_model(tmp_path / "mq")
    want, _ = load_model(tmp_path / "m16", quantize="nf4")
    merged16 = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "m16")
    err, dot, norm = 0.0, 0.0, 0.0
    for path in paths:
        wr = dequantize(written.get_submodule(path)).float()
        assert torch.equal(wr, dequantize(want.get_submodule(path)).float())
        layer = dict(lk.lora_layers(model))[path]
        a = layer.adapters["default"]
        u = a.scale * (a.lora_B.detach() @ a.lora_A.detach())
        err = max(err, (wr - merged16.get_submodule(path).weight.float()).abs().max().item())
        dot += ((wr - dequantize(layer._base).float()) * u).sum().item()
        norm += (u * u).sum().item()
    found = re.search(r"requantized (\d+) adapted layers: .* max (\S+), mean (\S+); share of the adapter's update "
                      r"kept (\S+) \(16-bit merge: (\S+)\)", printed)
    assert found, printed
    assert int(found[1]) == len(paths)
    assert float(found[2]) == pytest.approx(err, rel=1e-3)
    assert float(found[4]) == pytest.approx(dot / norm, abs=1e-3)
    assert float(found[4]) < float(found[5]) <= 1.001  # requantizing loses more of the update than 16 bits do


def test_cli_requantize_needs_quantize(model_dir, tmp_path, capsys):
    from models import cli_fails_cleanly

    lk.save_adapter(adapted(model_dir, "nf4"), tmp_path / "a")
    cli_fails_cleanly(capsys, ["merge", "--model", str(model_dir), "--adapter", str(tmp_path / "a"), "--output",
                               str(tmp_path / "out"), "--requantize", "nf4"], "--requantize needs --quantize")
    assert not (tmp_path / "out").exists()


# -- the fused path (lk.set_fast_path("on") here; on CUDA it is the default) ------------------------------

@pytest.fixture
def fast_on():
    lk.set_fast_path("on")
    yield
    lk.set_fast_path("auto")


def reference64(layer, x, seed, p):
    """base(x) + scale * (dropout(x) @ A.T) @ B.T in float64 on the dequantized weight, with the mask of `seed`."""
    a = layer.adapters["default"]
    w = dequantize(layer._base).double()
    x64 = x.double()
    xd = LF.seeded_dropout(x64, seed, p) if seed is not None else x64
    return F.linear(x64, w) + a.scale * (xd @ a.lora_A.double().t()) @ a.lora_B.double().t()


@pytest.mark.parametrize("quant", ["nf4", "fp4-dq"])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_fused_training_path_equals_the_float64_reference(base_dir, fast_on, quant, p):
    model = load(base_dir, quant)
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, dropout=p, targets=["down_proj"]))
    layer = model.model.layers[0].mlp.down_proj
    torch.manual_seed(4)
    with torch.no_grad():
        layer.adapters["default"].lora_B.normal_(std=0.1)
    layer.train()
    x = torch.randn(2, 3, layer.in_features, requires_grad=True)
    torch.manual_seed(11)
    y = layer(x)
    torch.manual_seed(11)  # the same draw as the layer's: its dropout seed
    seed = LF.dropout_seed("cpu") if p > 0 else None
    x64 = x.detach().double().requires_grad_(True)
    a = layer.adapters["default"]
    A64, B64 = a.lora_A.detach().double().requires_grad_(True), a.lora_B.detach().double().requires_grad_(True)
    w = dequantize(layer._base).double()
    xd = LF.seeded_dropout(x64, seed, p) if seed is not None else x64
    want = F.linear(x64, w) + a.scale * (xd @ A64.t()) @ B64.t()
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    gx, gA, gB = torch.autograd.grad(y, (x, a.lora_A, a.lora_B), g)
    wx, wA, wB = torch.autograd.grad(want, (x64, A64, B64), g.double())
    for got, ref in ((gx, wx), (gA, wA), (gB, wB)):
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


def test_fused_training_keeps_no_16bit_weight_for_backward(base_dir, fast_on):
    model = adapted(base_dir, "nf4")
    model.train()
    shapes = []
    params = {q.untyped_storage().data_ptr() for q in model.parameters()}

    def pack(t):  # saved tensors other than the model's own parameters (lm_head keeps its weight)
        if t.untyped_storage().data_ptr() not in params:
            shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(TOKENS, labels=TOKENS).loss
    weights = {tuple(layer.weight_out_in().shape) for _, layer in lk.lora_layers(model)}
    assert shapes and not weights & set(shapes)
    before = packed(model)
    loss.backward()
    opt = torch.optim.SGD(lk.trainable_parameters(model), lr=0.1)
    opt.step()
    assert all(torch.equal(before[n], t) for n, t in packed(model).items())


def test_fused_paths_equal_the_reference_path(base_dir, fast_on):
    model = adapted(base_dir, "nf4")
    with torch.no_grad():  # inference: bitsandbytes' own base kernel, then the adapter term; 1 and 5 tokens
        fused = [model(TOKENS).logits, model(TOKENS[:1, :1]).logits]
    lk.set_fast_path("off")
    with torch.no_grad():
        ref = [model(TOKENS).logits, model(TOKENS[:1, :1]).logits]
    for got, want in zip(fused, ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # training, dropout 0: the same loss and gradients as the reference path
    lk.set_fast_path("on")
    model.train()
    grads = []
    for mode in ("on", "off"):
        lk.set_fast_path(mode)
        model.zero_grad()
        model(TOKENS, labels=TOKENS).loss.backward()
        grads.append([p.grad.clone() for p in lk.trainable_parameters(model)])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_fused_training_under_gradient_checkpointing(base_dir, fast_on):
    from torch.utils.checkpoint import checkpoint

    model = load(base_dir, "nf4")
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, dropout=0.3, targets=["up_proj"]))
    layer = model.model.layers[0].mlp.up_proj
    with torch.no_grad():
        layer.adapters["default"].lora_B.normal_(std=0.1)
    layer.train()
    x = torch.randn(4, layer.in_features)
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(5)
        y = checkpoint(layer, x, use_reentrant=False) if ckpt else layer(x)
        grads.append(torch.autograd.grad(y.square().sum(), layer.adapters["default"].lora_A)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)  # the recomputed forward draws the same mask
