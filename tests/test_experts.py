"""LoRA on parameters (`target_parameters`): the 3-D expert weights of every tiny MoE family in moe_models.

Contracts as for modules (zero B is the base, disabled is the base, merged == unmerged, unmerge restores
bit for bit, only adapters train, eject gives the model back), PEFT's files both ways, per-example routing,
the grouped path against the reference, and the errors.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

import lorakit as lk
from lorakit import experts

moe_models = pytest.importorskip("moe_models")
pytest.importorskip("transformers")

FAMILIES = moe_models.FAMILIES


def _randomize_B(model, name="default", std=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lk.lora_layers(model):
            if name in layer.adapters:
                B = layer.adapters[name].lora_B
                B.copy_(torch.randn(B.shape, generator=g) * std)


def _cfg(family, **kw):
    return lk.LoraConfig(r=2, alpha=4, target_parameters=moe_models.EXPERT_PARAMETERS[family], **kw)


@pytest.fixture(scope="module")
def bases():
    return {f: moe_models.build(f) for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_contract(bases, family, tmp_path):
    base = bases[family]
    model, x = copy.deepcopy(base), moe_models.tokens()
    with torch.no_grad():
        y0 = model(x).logits
    keys, weights = set(model.state_dict()), {k: v.clone() for k, v in model.state_dict().items()}
    lk.inject(model, _cfg(family))
    layers = dict(lk.lora_layers(model))
    assert {experts.parameter_path(p) for p in layers} == {
        f"model.layers.{i}.{p}" for i in range(2) for p in moe_models.EXPERT_PARAMETERS[family]}
    assert keys <= set(model.state_dict())  # base keys unchanged
    with torch.no_grad():
        assert torch.equal(model(x).logits, y0)  # B = 0: the base output
    _randomize_B(model)
    out = model(x).logits
    assert (out - y0).abs().max() > 1e-3
    out.sum().backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained and all(".adapters.default.lora_" in n for n in trained)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trained
    with torch.no_grad(), lk.disabled(model):
        assert torch.equal(model(x).logits, y0)
    lk.merge(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, out.detach(), atol=1e-5, rtol=1e-5)
    lk.unmerge(model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    lk.save_adapter(model, tmp_path / "a")
    again = copy.deepcopy(base)
    lk.load_adapter(again, tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(again(x).logits, out.detach())
    lk.eject(model, merge=False)
    assert set(model.state_dict()) == keys and all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    assert type(model.model.layers[0].mlp.experts) is type(base.model.layers[0].mlp.experts)


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_files_both_ways(bases, family, tmp_path):
    peft = pytest.importorskip("peft")
    base, x = bases[family], moe_models.tokens()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=2, lora_alpha=5, target_modules=["q_proj"], target_parameters=moe_models.EXPERT_PARAMETERS[family],
        init_lora_weights=False)).eval()
    with torch.no_grad():
        y_peft = theirs(x).logits
        assert (y_peft - base(x).logits).abs().max() > 1e-3
    theirs.save_pretrained(tmp_path / "peft")
    ours = lk.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, y_peft, atol=1e-5, rtol=1e-5)

    mine = lk.inject(copy.deepcopy(base), _cfg(family, targets=["q_proj"], rank_pattern={"down_proj": 3}))
    _randomize_B(mine, seed=1)
    lk.save_adapter(mine, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, mine(x).logits, atol=1e-5, rtol=1e-5)


def test_peft_reads_a_parameter_only_adapter(bases, tmp_path):
    peft = pytest.importorskip("peft")
    base, x = bases["qwen3_moe"], moe_models.tokens()
    mine = lk.inject(copy.deepcopy(base), lk.LoraConfig(r=2, alpha=4, target_parameters=["mlp.experts.down_proj"]))
    _randomize_B(mine)
    lk.save_adapter(mine, tmp_path)
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, mine(x).logits, atol=1e-5, rtol=1e-5)


def test_saved_keys_are_peft_nesting(bases, tmp_path):
    from safetensors.torch import load_file

    model = lk.inject(copy.deepcopy(bases["qwen3_moe"]), _cfg("qwen3_moe"))
    lk.save_adapter(model, tmp_path)
    shapes = {k: tuple(v.shape) for k, v in load_file(tmp_path / "adapter_model.safetensors").items()}
    prefix = "base_model.model.model.layers.0.mlp.experts"
    # gate_up_proj (4 experts, 2*4 out, 16 in) is wrapped first by PEFT, so it is the inner one
    assert shapes[f"{prefix}.base_layer.lora_A.weight"] == (2 * 4, 16)
    assert shapes[f"{prefix}.base_layer.lora_B.weight"] == (8, 2 * 4)
    assert shapes[f"{prefix}.lora_A.weight"] == (2 * 4, 4)
    assert shapes[f"{prefix}.lora_B.weight"] == (16, 2 * 4)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_parameters"] == [f"model.layers.{i}.mlp.experts.{p}" for i in range(2)
                                           for p in ("gate_up_proj", "down_proj")]


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_delta_layout_matches_peft(bases, family):
    peft = pytest.importorskip("peft")
    theirs = peft.get_peft_model(copy.deepcopy(bases[family]), peft.LoraConfig(
        r=3, lora_alpha=5, target_parameters=["mlp.experts.down_proj"], init_lora_weights=False))
    wrapper = theirs.base_model.model.model.layers[0].mlp.experts
    A, B = wrapper.lora_A["default"].weight, wrapper.lora_B["default"].weight
    layer = experts.LoraParam(experts.LoraExperts(copy.deepcopy(bases[family].model.layers[0].mlp.experts)),
                              "down_proj", family == "gpt_oss")
    ours = layer._to_weight_layout(experts.expert_delta(A, B, 5 / 3, layer.num_experts))
    torch.testing.assert_close(ours, wrapper.get_delta_weight("default").float())


def test_several_adapters_merge_unmerge_any_order(bases):
    model, x = copy.deepcopy(bases["gpt_oss"]), moe_models.tokens()
    w0 = model.model.layers[0].mlp.experts.gate_up_proj.detach().clone()
    for i, n in enumerate(["a", "b"]):
        lk.inject(model, _cfg("gpt_oss"), name=n)
        _randomize_B(model, n, seed=i)
    lk.set_adapter(model, ["a", "b"])
    with torch.no_grad():
        both = model(x).logits
    lk.merge(model, ["a", "b"])
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, both, atol=1e-5, rtol=1e-5)
    lk.unmerge(model, "a")
    lk.unmerge(model, "b")
    assert torch.equal(model.model.layers[0].mlp.experts.gate_up_proj, w0)
    lk.delete_adapter(model, "b")
    lk.set_adapter(model, "a")
    with torch.no_grad():
        only_a = model(x).logits
    lk.eject(model, merge=True)  # a plain model again, with a's update in its expert weights
    assert type(model.model.layers[0].mlp.experts).__name__ == "GptOssExperts"
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, only_a, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_route_per_example(bases, family):
    model, x = copy.deepcopy(bases[family]), moe_models.tokens(batch=3)
    for i, n in enumerate(["a", "b"]):
        lk.inject(model, _cfg(family, targets=["q_proj"]), name=n)
        _randomize_B(model, n, seed=i)
    expected = []
    with torch.no_grad():
        for row, n in enumerate(["b", None, "a"]):
            lk.set_adapter(model, n)
            expected.append(model(x[row:row + 1]).logits)
    with lk.route(model, ["b", None, "a"]):
        out = model(x).logits
    torch.testing.assert_close(out, torch.cat(expected), atol=1e-5, rtol=1e-5)
    out[2].sum().backward()  # row 2 is routed to "a": only a's factors get gradients
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all(".adapters.a." in n for n in grads)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "mixtral"])
def test_grouped_path_matches_reference(bases, family):
    torch.manual_seed(0)
    model = lk.inject(copy.deepcopy(bases[family]).double(), lk.LoraConfig(
        r=2, alpha=4, target_parameters=moe_models.EXPERT_PARAMETERS[family]))
    _randomize_B(model)
    lk.inject(model, _cfg(family), name="second")
    _randomize_B(model, "second", seed=3)
    lk.set_adapter(model, ["default", "second"])
    block = model.model.layers[0].mlp.experts
    block.config._experts_implementation = "eager"  # transformers' grouped_mm kernel takes no float64
    hidden = torch.randn(7, 16, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([[0, 1], [1, 3], [3, 0], [2, 1], [0, 2], [3, 2], [1, 0]])
    weights = torch.rand(7, 2, dtype=torch.float64)
    results = {}
    for mode in ("off", "on"):
        lk.set_fast_path(mode)
        try:
            assert block.explain(hidden, idx, weights).startswith("grouped" if mode == "on" else "reference")
            assert lk.explain(block, hidden).startswith("grouped" if mode == "on" else "reference")
            out = block(hidden, idx, weights)
        finally:
            lk.set_fast_path("auto")
        params = [p for p in block.parameters() if p.requires_grad]
        grads = torch.autograd.grad((out * torch.linspace(-1, 1, 16, dtype=out.dtype)).sum(), [hidden, *params])
        results[mode] = (out, grads)
    torch.testing.assert_close(results["on"][0], results["off"][0], atol=1e-12, rtol=1e-10)
    for g_on, g_off in zip(results["on"][1], results["off"][1]):
        torch.testing.assert_close(g_on, g_off, atol=1e-12, rtol=1e-10)


# -- errors -------------------------------------------------------------------------------------------------
def _unchanged(model, base):
    return (set(model.state_dict()) == set(base.state_dict()) and lk.adapter_names(model) == []
            and type(model.model.layers[0].mlp.experts) is type(base.model.layers[0].mlp.experts))


def test_no_match_lists_candidates(bases):
    model = copy.deepcopy(bases["qwen3_moe"])
    with pytest.raises(lk.TargetError, match=r"matched no parameter.*experts\.gate_up_proj"):
        lk.inject(model, lk.LoraConfig(target_parameters=["mlp.experts.w1"]))
    assert _unchanged(model, bases["qwen3_moe"])


def test_not_a_weight(bases):
    model = copy.deepcopy(bases["qwen3_moe"])
    with pytest.raises(lk.TargetError, match=r"model\.norm\.weight.*1-D.*2-D \(out, in\) or 3-D"):
        lk.inject(model, lk.LoraConfig(target_parameters=["mlp.experts.down_proj", "model.norm.weight"]))
    assert _unchanged(model, bases["qwen3_moe"])


def test_dropout_refused():
    with pytest.raises(lk.ConfigError, match="dropout=0.1 cannot apply to target_parameters"):
        lk.LoraConfig(dropout=0.1, target_parameters=["mlp.experts.down_proj"])


def test_targets_default_to_none_with_parameters():
    assert lk.LoraConfig(target_parameters=["x"]).targets == []
    assert lk.LoraConfig().targets is None  # the model family's defaults, resolved by inject


def test_rank_pattern_that_does_not_fit(bases, tmp_path):
    model = lk.inject(copy.deepcopy(bases["qwen3_moe"]), _cfg("qwen3_moe"))
    lk.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["rank_pattern"] = {"down_proj": 3}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    fresh = copy.deepcopy(bases["qwen3_moe"])
    with pytest.raises(lk.AdapterFileError, match=r"down_proj.*rank 2 per expert.*r=3.*rank pattern does not fit"):
        lk.load_adapter(fresh, tmp_path, check_base=False)
    assert _unchanged(fresh, bases["qwen3_moe"])


def test_other_architecture_names_the_parameters(bases, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import Qwen3Config, Qwen3ForCausalLM

    theirs = peft.get_peft_model(copy.deepcopy(bases["qwen3_moe"]), peft.LoraConfig(
        r=2, target_parameters=moe_models.EXPERT_PARAMETERS["qwen3_moe"]))
    theirs.save_pretrained(tmp_path)
    torch.manual_seed(0)
    dense = Qwen3ForCausalLM(Qwen3Config(vocab_size=64, hidden_size=16, intermediate_size=8, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=8))
    keys = set(dense.state_dict())
    with pytest.raises(lk.ShapeMismatchError, match=r"'model\.layers\.0\.mlp\.experts(\.base_layer)?' for "
                                                     r"target_parameters=.*another architecture"):
        lk.load_adapter(dense, tmp_path)
    assert set(dense.state_dict()) == keys and lk.adapter_names(dense) == []
