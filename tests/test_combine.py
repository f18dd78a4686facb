"""`lk.combine` and `lorakit combine`: PEFT's add_weighted_adapter, with PEFT's outputs.

Every deterministic method is checked against PEFT itself: the same PEFT adapters, combined by PEFT and
by lorakit after `lk.load_adapter`, give the same logits. DARE draws its own random mask, so it is
checked for reproducibility and for its statistics (the kept fraction and the rescaling).
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.inject import configs
from models import ConvNet, cli_fails_cleanly, example_input, llama, make, randomize, run

peft = pytest.importorskip("peft")

WEIGHTS = {"t1": 0.7, "t2": -0.3}
# (source adapter: r, lora_alpha) of the PEFT models; t6 has another rank
RANKS = {"t1": (4, 8), "t2": (4, 16), "t3": (4, 4), "t6": (6, 12)}
TARGETS = {"llama": ["q_proj", "v_proj", "up_proj", "embed_tokens"], "conv": ["conv1", "conv2", "conv1d", "fc"]}


@pytest.fixture(scope="module", params=["llama", "conv"])
def pair(request, tmp_path_factory):
    """(kind, PEFT model with adapters RANKS, lorakit model with the same adapters loaded from PEFT's files)."""
    kind = request.param
    torch.manual_seed(0)
    base = (llama() if kind == "llama" else ConvNet()).eval()
    theirs = None
    for name, (r, alpha) in RANKS.items():
        cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS[kind])
        if theirs is None:
            theirs = peft.get_peft_model(copy.deepcopy(base), cfg, adapter_name=name)
        else:
            theirs.add_adapter(name, cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for pname, p in theirs.named_parameters():
            if "lora_" in pname:  # every factor non-zero, so every adapter changes the output
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    out = tmp_path_factory.mktemp(f"peft-{kind}")
    theirs.save_pretrained(str(out), save_embedding_layers=False)  # the LoRA tensors only
    ours = copy.deepcopy(base)
    for name in RANKS:
        lk.load_adapter(ours, out / name, name=name)
    return kind, theirs.eval(), ours.eval()


def outputs(kind, theirs, ours, name):
    x = example_input(kind, batch=2)
    theirs.set_adapter(name)
    with torch.no_grad():
        return run(theirs, kind, x), run(ours, kind, x)


CASES = [
    ("linear", {}), ("cat", {}), ("svd", {}), ("svd", {"svd_rank": 2, "svd_clamp": 0.9, "svd_full_matrices": False}),
    ("ties", {"density": 0.5}), ("ties", {"density": 0.3, "majority_sign_method": "frequency"}),
    ("ties_svd", {"density": 0.5}), ("magnitude_prune", {"density": 0.4}), ("magnitude_prune_svd", {"density": 0.6}),
    # DARE keeps everything at density 1: the rest of its pipeline (rescale, sign election) against PEFT's
    ("dare_linear", {"density": 1.0}), ("dare_ties", {"density": 1.0}),
    ("dare_ties_svd", {"density": 1.0, "majority_sign_method": "frequency"}),
]
THREE = {"t1": 0.7, "t2": -0.3, "t3": 1.2}  # a sign election with a majority to find
CASES = [(m, kw, WEIGHTS) for m, kw in CASES] + [(m, kw, THREE) for m, kw in CASES if "ties" in m]


@pytest.mark.parametrize("method,kwargs,weights", CASES,
                         ids=[f"{m}-{i}-{len(w)}" for i, (m, _, w) in enumerate(CASES)])
def test_deterministic_methods_give_peft_outputs(pair, method, kwargs, weights):
    kind, theirs, ours = pair
    name = f"m{len(lk.adapter_names(ours))}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that density 1 prunes nothing
        theirs.add_weighted_adapter(list(weights), list(weights.values()), name, combination_type=method, **kwargs)
    lk.combine(ours, weights, name=name, method=method, **kwargs)
    ref, got = outputs(kind, theirs, ours, name)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    with lk.disabled(ours), torch.no_grad():
        assert not torch.allclose(run(ours, kind, example_input(kind, batch=2)), ref, atol=1e-3)  # it does act


@pytest.mark.parametrize("method", ["cat", "svd", "ties_svd"])
def test_methods_that_take_adapters_of_different_ranks_give_peft_outputs(pair, method):
    kind, theirs, ours = pair
    name = f"m{len(lk.adapter_names(ours))}"
    weights = {"t1": 0.5, "t6": -0.8}
    kwargs = {} if method in ("cat", "svd") else {"density": 0.5}
    if kind == "conv" and method != "cat":  # PEFT's svd breaks on a rank above min(out, in) (fc: 6 -> 4)
        kwargs["svd_rank"] = 3
    theirs.add_weighted_adapter(list(weights), list(weights.values()), name, combination_type=method, **kwargs)
    lk.combine(ours, weights, name=name, method=method, **kwargs)
    ref, got = outputs(kind, theirs, ours, name)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_one_adapter_is_weighted_linearly_whatever_the_method(pair):
    kind, theirs, ours = pair
    name = f"m{len(lk.adapter_names(ours))}"
    theirs.add_weighted_adapter(["t6"], [-0.5], name, combination_type="ties", density=0.2)
    lk.combine(ours, {"t6": -0.5}, name=name, method="ties", density=0.2)
    ref, got = outputs(kind, theirs, ours, name)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for _, layer in lk.lora_layers(ours):  # exactly -0.5 * dW, at scale 1 and the source's rank
        assert layer.adapters[name].scale == 1.0 and layer.adapters[name].r == 6
        torch.testing.assert_close(layer.delta_weight(name), -0.5 * layer.delta_weight("t6"))


# -- lorakit's own contracts, on models made here -------------------------------------------------------------
def carrying(*specs):
    """A tiny llama with adapters `specs` = (name, r, targets) and random non-zero factors."""
    model = make("llama")
    for name, r, targets in specs:
        lk.inject(model, lk.LoraConfig(r=r, alpha=2 * r, targets=targets), name=name)
    randomize(model, std=0.3)
    return model


QV = ["q_proj", "v_proj"]


def test_cat_is_the_weighted_sum_of_the_updates_and_the_rest_of_the_model_stays():
    model = carrying(("t1", 4, QV), ("t2", 2, QV))
    lk.set_adapter(model, ["t1", "t2"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    for n, p in model.named_parameters():  # a setting of the user's that combine must leave alone
        if n.endswith("t2.lora_A"):
            p.requires_grad_(False)
            grads[n] = False
    lk.combine(model, {"t1": 2.0, "t2": -0.5}, name="mix", method="cat")
    assert lk.active_adapters(model) == ["mix"] and lk.adapter_names(model) == ["t1", "t2", "mix"]
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert all(p.requires_grad == grads[n] for n, p in model.named_parameters() if n in grads)
    layers = list(lk.lora_layers(model))
    assert len(layers) == 4
    for path, layer in layers:
        assert layer.adapters["mix"].r == 6 and layer.adapters["mix"].scale == 1.0
        torch.testing.assert_close(layer.delta_weight("mix"),
                                   2.0 * layer.delta_weight("t1") - 0.5 * layer.delta_weight("t2"))


def test_svd_at_full_rank_is_the_weighted_sum_and_saves_as_a_peft_adapter(tmp_path):
    model = carrying(("t1", 4, QV), ("t2", 2, QV))
    lk.combine(model, {"t1": 1.0, "t2": -1.0}, name="mix", method="svd", svd_rank=6)
    for _, layer in lk.lora_layers(model):
        torch.testing.assert_close(layer.delta_weight("mix"), layer.delta_weight("t1") - layer.delta_weight("t2"),
                                   rtol=1e-4, atol=1e-5)
    lk.save_adapter(model, tmp_path / "mix", name="mix")
    data = json.loads((tmp_path / "mix" / "adapter_config.json").read_text())
    assert data["r"] == data["lora_alpha"] == 6 and data["use_rslora"] is False
    x = example_input("llama")
    with torch.no_grad():
        want = model(input_ids=x).logits
        theirs = peft.PeftModel.from_pretrained(make("llama"), str(tmp_path / "mix")).eval()
        torch.testing.assert_close(theirs(input_ids=x).logits, want, rtol=1e-5, atol=1e-5)


def test_sliced_fused_projections_combine_and_the_fast_path_computes_the_same():
    model = make("gpt2")  # c_attn: Conv1D (stored (in, out)) fusing q, k, v; adapters on q and v only
    for name, r in (("t1", 4), ("t2", 2)):
        lk.inject(model, lk.LoraConfig(r=r, alpha=2 * r, targets=["c_attn", "c_fc"],
                                       slices={"c_attn": [True, False, True]}), name=name)
    randomize(model, std=0.3)
    lk.combine(model, WEIGHTS, name="mix", method="cat")
    lk.combine(model, WEIGHTS, name="mix_svd", method="svd", svd_rank=12)  # 2*4 + 2*2: the whole sum
    for path, layer in lk.lora_layers(model):
        want = 0.7 * layer.delta_weight("t1") - 0.3 * layer.delta_weight("t2")
        torch.testing.assert_close(layer.delta_weight("mix"), want)
        torch.testing.assert_close(layer.delta_weight("mix_svd"), want, rtol=1e-4, atol=1e-5)
    x = example_input("gpt2")
    outs = {}
    try:
        for mode in ("off", "on"):
            lk.set_fast_path(mode)
            with lk.route(model, ["mix", None, "t1", "mix_svd"]), torch.no_grad():
                outs[mode] = run(model, "gpt2", x)
    finally:
        lk.set_fast_path("auto")
    torch.testing.assert_close(outs["on"], outs["off"], rtol=1e-5, atol=1e-5)


def mixed_factors(model, name):
    return {path: (layer.adapters[name].lora_A.detach().clone(), layer.adapters[name].lora_B.detach().clone())
            for path, layer in lk.lora_layers(model)}


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"])
def test_dare_is_reproducible_by_seed(method):
    model = carrying(("t1", 4, QV), ("t2", 4, QV))
    for name, seed in (("s0", 0), ("s0_again", 0), ("s1", 1)):
        lk.combine(model, WEIGHTS, name=name, method=method, density=0.5, seed=seed)
    first, again, other = (mixed_factors(model, n) for n in ("s0", "s0_again", "s1"))
    assert all(torch.equal(first[p][i], again[p][i]) for p in first for i in (0, 1))
    assert any(not torch.equal(first[p][i], other[p][i]) for p in first for i in (0, 1))


class Wide(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(128, 96)

    def forward(self, x):
        return self.proj(x)


@pytest.mark.parametrize("density", [0.3, 0.8])
def test_dare_keeps_a_density_fraction_of_entries_rescaled_by_one_over_density(density):
    torch.manual_seed(0)
    model = Wide()
    for name in ("t1", "t2"):
        lk.inject(model, lk.LoraConfig(r=16, alpha=8, targets=["proj"]), name=name)
    randomize(model)
    layer = model.proj
    s = layer.adapters["t1"].scale
    # t2 weighs 0, so what is left is t1 through DARE's mask: each entry 0 or (its weighted value) / density
    lk.combine(model, {"t1": 1.0, "t2": 0.0}, name="dare", method="dare_linear", density=density, seed=3)
    lk.combine(model, {"t1": 1.0, "t2": 0.0}, name="dare_svd", method="dare_linear_svd", density=density,
               seed=3, svd_rank=96)
    a = layer.adapters["dare"]
    mixes = [(a.lora_A, s ** 0.5 * layer.adapters["t1"].lora_A), (a.lora_B, s ** 0.5 * layer.adapters["t1"].lora_B),
             (layer.delta_weight("dare_svd"), layer.delta_weight("t1"))]
    for got, full in mixes:
        got, rescaled = got.detach(), full.detach() / density
        kept = (got - rescaled).abs() < got.abs()  # nearer to the rescaled entry than to 0
        tol = 1e-4 * rescaled.abs().max()  # the svd's reconstruction is exact up to rounding
        assert (got[kept] - rescaled[kept]).abs().max() < tol and got[~kept].abs().max() < tol
        n = got.numel()
        sigma = (density * (1 - density) / n) ** 0.5
        assert abs(kept.float().mean().item() - density) < 5 * sigma + 2e-3, (kept.float().mean(), density)


# -- errors: the model stays as it was ---------------------------------------------------------------------------
def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, lk.adapter_names(model), lk.active_adapters(model),
            [p.requires_grad for p in model.parameters()], [layer.active for _, layer in lk.lora_layers(model)])


def same(a, b):
    return a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0]) and a[1:] == b[1:]


ERRORS = [
    (dict(method="average"), lk.ConfigError, ["'average'", "linear", "dare_ties_svd"]),
    (dict(weights={"t1": 1.0, "nope": 1.0}), lk.AdapterNotFoundError, ["'nope'", "t1"]),
    (dict(name="t2"), lk.ConfigError, ["already has an adapter named 't2'", "delete_adapter"]),
    (dict(name="a b"), lk.ConfigError, ["'a b'"]),
    (dict(method="ties", density=0.0), lk.ConfigError, ["density", "(0, 1]", "0.0"]),
    (dict(method="dare_ties", density=1.5), lk.ConfigError, ["density", "(0, 1]", "1.5"]),
    (dict(method="magnitude_prune", density=-0.1), lk.ConfigError, ["density", "-0.1"]),
    (dict(method="ties"), lk.ConfigError, ["'ties'", "needs density="]),
    (dict(method="linear", density=0.5), lk.ConfigError, ["does not prune", "density"]),
    (dict(method="ties", density=0.5, majority_sign_method="mean"), lk.ConfigError, ["'mean'", "frequency"]),
    (dict(method="svd", svd_rank=0), lk.ConfigError, ["svd_rank", "0"]),
    (dict(method="svd", svd_clamp=2), lk.ConfigError, ["svd_clamp", "2"]),
    (dict(method="svd", svd_driver="gesdd"), lk.ConfigError, ["svd_driver", "'gesdd'", "gesvdj"]),
    (dict(weights={}), lk.ConfigError, ["{}", "{'a': 0.7"]),
    (dict(weights={"t1": float("nan"), "t2": 1.0}), lk.ConfigError, ["'t1'", "nan", "finite"]),
    (dict(weights={"t1": 1.0, "q_only": 1.0}), lk.ShapeMismatchError, ["v_proj", "['q_only']", "same target"]),
    (dict(weights={"t1": 1.0, "r2": 1.0}, method="ties", density=0.5), lk.ShapeMismatchError,
     ["'ties'", "{'t1': 4, 'r2': 2}", "'cat'"]),
    (dict(weights={"t1": 1.0, "r2": 1.0}, method="linear"), lk.ShapeMismatchError, ["'linear'", "ranks"]),
]


@pytest.mark.parametrize("kwargs,error,words", ERRORS, ids=[f"e{i}" for i in range(len(ERRORS))])
def test_errors_name_the_problem_and_leave_the_model_as_it_was(kwargs, error, words):
    model = carrying(("t1", 4, QV), ("t2", 4, QV), ("r2", 2, QV), ("q_only", 4, ["q_proj"]))
    lk.set_adapter(model, ["t1", "t2"])
    before = snapshot(model)
    call = {"weights": {"t1": 0.7, "t2": -0.3}, "name": "mix", **kwargs}
    with pytest.raises(error) as info:
        lk.combine(model, call.pop("weights"), **call)
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    assert same(snapshot(model), before)


def test_adapters_that_are_more_than_lora_factors_are_refused(monkeypatch):
    model = carrying(("t1", 4, QV), ("t2", 4, QV), ("t3", 4, QV))
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, targets=QV, bias="lora_only"), name="biased")
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, targets=QV, init="pissa"), name="pissa")
    before = snapshot(model)
    with pytest.raises(lk.ConfigError, match=r"'pissa' was initialized by PiSSA.*Save it"):
        lk.combine(model, {"t1": 1.0, "pissa": 1.0}, name="mix")
    with pytest.raises(lk.ConfigError, match=r"'biased' trains biases too \(bias='lora_only'\)"):
        lk.combine(model, {"biased": 1.0, "t1": 1.0}, name="mix", method="cat")
    monkeypatch.setattr(configs(model)["t2"], "dora", True, raising=False)
    with pytest.raises(lk.ConfigError, match=r"'t2' is DoRA"):
        lk.combine(model, {"t1": 1.0, "t2": 1.0}, name="mix", method="svd")
    monkeypatch.setattr(configs(model)["t3"], "target_parameters", ["mlp.experts.gate_up_proj"], raising=False)
    with pytest.raises(lk.ConfigError, match=r"'t3' adapts parameters"):
        lk.combine(model, {"t1": 1.0, "t3": 1.0}, name="mix")
    assert same(snapshot(model), before)


def test_a_failure_while_installing_puts_the_model_back(monkeypatch):
    model = carrying(("t1", 4, QV), ("t2", 4, QV))
    lk.set_adapter(model, ["t1", "t2"])
    before = snapshot(model)
    import importlib

    inject = importlib.import_module("lorakit.inject")  # the module; lorakit.inject is also the function

    def one_row_short(layer, *args, **kwargs):  # the combined factors then do not fit the new adapter
        adapter = new_adapter(layer, *args, **kwargs)
        adapter.lora_A = nn.Parameter(adapter.lora_A[1:].clone())
        return adapter

    new_adapter = inject.new_adapter
    monkeypatch.setattr(inject, "new_adapter", one_row_short)
    with pytest.raises(RuntimeError):
        lk.combine(model, WEIGHTS, name="mix")
    assert same(snapshot(model), before)


# -- the command line ----------------------------------------------------------------------------------------------
def test_cli_writes_the_combined_adapter_in_peft_format(tiny_model, tmp_path, capsys):
    from lorakit.cli import main
    from lorakit.models import load_model

    dirs = {}
    for seed, name in enumerate(("sst", "rte")):
        model, _ = load_model(str(tiny_model))
        lk.inject(model, lk.LoraConfig(r=4, alpha=8, targets=QV), name=name)
        randomize(model, seed=seed)
        dirs[name] = lk.save_adapter(model, tmp_path / name, name=name)
    out = tmp_path / "mix"
    argv = ["combine", "--model", str(tiny_model), "--adapter", f"sst={dirs['sst']}", "--adapter",
            f"rte={dirs['rte']}", "--weights", "sst=0.7,rte=-0.3", "--method", "ties", "--density", "0.5",
            "--output-dir", str(out)]
    assert main(argv) == 0
    assert str(out) in capsys.readouterr().out
    model, _ = load_model(str(tiny_model))
    for name, directory in dirs.items():
        lk.load_adapter(model, directory, name=name)
    lk.combine(model, {"sst": 0.7, "rte": -0.3}, name="mix", method="ties", density=0.5)
    x = torch.randint(0, 1000, (2, 6))
    with torch.no_grad():
        want = model(input_ids=x).logits
        base, _ = load_model(str(tiny_model))
        theirs = peft.PeftModel.from_pretrained(base, str(out)).eval()
        torch.testing.assert_close(theirs(input_ids=x).logits, want, rtol=1e-5, atol=1e-5)
    # errors: one paragraph naming the problem, nothing written
    cli_fails_cleanly(capsys, argv[:-6] + ["--weights", "sst=0.7", "--output-dir", str(tmp_path / "o1")],
                      "--weights", "'rte'")
    cli_fails_cleanly(capsys, argv[:-4] + ["--output-dir", str(tmp_path / "o2")], "'ties'", "density")
    cli_fails_cleanly(capsys, argv[:-1] + [str(out)], "not empty", "--output-dir")
    cli_fails_cleanly(capsys, ["combine", "--model", str(tiny_model), "--adapter", str(dirs["sst"]), "--weights",
                               "sst=1", "--output-dir", str(tmp_path / "o3")], "NAME=DIR")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()


def test_cli_methods_are_the_library_methods():
    from lorakit import combine_cli
    from lorakit.combine import METHODS

    assert combine_cli.METHODS == METHODS
