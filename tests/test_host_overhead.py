"""An adapted linear reads its state afresh on every call: whatever changes an adapter, its
tensors or the layer (names, merges, routes, replaced parameters, `.to()`), the very next call
computes with it. The fast path keeps one cache per layer outside routes, the decode launch plan
(one adapter, no autograd, CUDA), and reads the modules' dicts directly instead of through
nn.Module.__getattr__; these tests pin that it serves nothing stale.

Each case warms the layer up with a few calls, changes one thing, and compares the next call
bit for bit with the same computation spelled out from the layer's public attributes.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit as lk
from lorakit import functional as LF
from lorakit.fast import enabled_for, state_of
from lorakit.fast.ops import lora_linear, lora_linear_multi
from models import make, randomize


@pytest.fixture(autouse=True)
def restore_mode():
    yield
    lk.set_fast_path("auto")


class One(nn.Module):
    """One adaptable linear, `proj` (8 -> 6): no siblings, so every call is the layer's own."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.proj = base

    def forward(self, x):
        return self.proj(x)


# layer kind -> (the base module, LoraConfig kwargs)
KINDS = {
    "linear": (lambda: nn.Linear(8, 6), {}),
    "linear-no-bias": (lambda: nn.Linear(8, 6, bias=False), {}),
    "conv1d-sliced": (lambda: Conv1D(6, 8), {"slices": {"proj": [True, False, True]}}),
}


CUDA = torch.cuda.is_available()
# On a GPU, one row per call: the fast path's eager decode, which repeats a launch worked out once
# (`SmallPlan`); the cases check that it serves nothing stale either.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU"))]


def build(kind: str, device: str = "cpu"):
    torch.manual_seed(0)
    make_base, kwargs = KINDS[kind]
    model = One(make_base()).eval()
    lk.inject(model, lk.LoraConfig(r=2, alpha=4, targets=["proj"], **kwargs))
    lk.inject(model, lk.LoraConfig(r=3, alpha=3, targets=["proj"], **kwargs), name="b")
    lk.set_adapter(model, "default")
    randomize(model, std=0.5)
    return model.to(device), model.proj


def expected(layer, x):
    """The layer's output, spelled out from its public attributes (read through __getattr__ now)."""
    W = layer.weight
    if layer.fan_in_fan_out:
        base = x @ W + layer.bias if layer.bias is not None else x @ W
    else:
        base = F.linear(x, W, layer.bias)
    active = [layer.adapters[n] for n in layer.active if n in layer.adapters and n not in layer.merged]
    if layer.disabled or not active:
        return base
    W_out_in = W.t() if layer.fan_in_fan_out else W
    if enabled_for(x):
        if len(active) == 1:
            a = active[0]
            return lora_linear(x, W_out_in, layer.bias, a.lora_A, a.full_B(), a.scale, a.dropout_p,
                                       layer.training)
        return lora_linear_multi(x, W_out_in, layer.bias, [a.lora_A for a in active],
                                         [a.full_B() for a in active], [a.scale for a in active],
                                         [a.dropout_p for a in active], layer.training)
    y = base
    for a in active:
        y = y + LF.lora_delta_out(a.dropout(x), a.lora_A, a.full_B(), a.scale)
    return y


def check(model, layer, grad: bool, changed_from: torch.Tensor | None = None) -> torch.Tensor:
    """The layer's next output equals `expected` bit for bit (same dropout seed for both)."""
    rows = 1 if layer.weight.is_cuda else 3
    x = torch.randn(rows, 8, generator=torch.Generator().manual_seed(7)).to(layer.weight.device, layer.weight.dtype)
    with torch.set_grad_enabled(grad):
        torch.manual_seed(11)
        y = model(x)
        torch.manual_seed(11)
        want = expected(layer, x)
    assert torch.equal(y, want)
    if changed_from is not None:  # the change under test does change the output
        assert y.shape != changed_from.shape or y.dtype != changed_from.dtype or not torch.equal(y, changed_from)
    return y.detach()


def add_adapter(model, layer):
    slices = {"slices": {"proj": [True, False, True]}} if layer.fan_in_fan_out else {}
    lk.inject(model, lk.LoraConfig(r=2, alpha=4, targets=["proj"], **slices), name="c")  # and activate it
    randomize(model, seed=5)


def replace_adapter(model, layer):
    layer.adapters["default"] = copy.deepcopy(layer.adapters["b"])
    with torch.no_grad():
        layer.adapters["default"].lora_B.mul_(-2)


def replace_param(module_of, name):
    def change(model, layer):
        module = module_of(layer)
        old = getattr(module, name)
        setattr(module, name, nn.Parameter(torch.randn_like(old), requires_grad=old.requires_grad))
    return change


def edit_in_place(module_of, name):
    def change(model, layer):
        with torch.no_grad():
            getattr(module_of(layer), name).mul_(3).add_(0.25)
    return change


def load_other_state(model, layer):
    state = {k: v + 0.5 if ".adapters." in k else v for k, v in model.state_dict().items()}
    model.load_state_dict(state)


def to_double(flag):
    """model.double() (`flag`: how `_apply` converts, see torch.__future__), then an in-place edit of
    every parameter: float32 -> float64 is exact, so the edit is what shows a stale tensor."""
    def change(model, layer):
        setter = getattr(torch.__future__, f"set_{flag}_module_params_on_conversion") if flag else None
        if setter is not None:
            setter(True)
        try:
            model.double()
        finally:
            if setter is not None:
                setter(False)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.125)
    return change


def with_dropout(model, layer):
    layer.adapters["default"].dropout = nn.Dropout(0.5)
    model.train()


def default_adapter(layer):
    return layer.adapters["default"]


# change name -> how to make it; each changes the layer's output
CHANGES = {
    "set_adapter": lambda model, layer: lk.set_adapter(model, "b"),
    "active assigned": lambda model, layer: setattr(layer, "active", ["b"]),
    "active edited in place": lambda model, layer: layer.active.__setitem__(0, "b"),
    "active appended": lambda model, layer: layer.active.append("b"),
    "active cleared": lambda model, layer: layer.active.clear(),
    "adapter deleted": lambda model, layer: lk.delete_adapter(model, "default"),
    "adapter replaced": replace_adapter,
    "adapter added": add_adapter,
    "merged": lambda model, layer: lk.merge(model, "default"),
    "lora_A replaced": replace_param(default_adapter, "lora_A"),
    "lora_B replaced": replace_param(default_adapter, "lora_B"),
    "weight replaced": replace_param(lambda layer: layer, "weight"),
    "lora_A edited in place": edit_in_place(default_adapter, "lora_A"),
    "lora_B edited in place": edit_in_place(default_adapter, "lora_B"),
    "weight edited in place": edit_in_place(lambda layer: layer, "weight"),
    "bias set": lambda model, layer: setattr(layer, "bias",
                                             nn.Parameter(torch.full((6,), 0.3, device=layer.weight.device))),
    "state loaded": load_other_state,
    "to(float64)": to_double(None),
    "to(float64), new parameters": to_double("overwrite"),
    "to(float64), swapped tensors": to_double("swap"),
    "scale changed": lambda model, layer: setattr(layer.adapters["default"], "scale", 7.0),
    "dropout, train mode": with_dropout,
}


@pytest.mark.parametrize("change", list(CHANGES))
@pytest.mark.parametrize("kind", ["linear", "linear-no-bias"])
def test_next_call_sees_the_change(change, kind):
    # the fast path's decode call: the one that keeps a plan (on a GPU) and reads the modules' dicts
    lk.set_fast_path("on")
    model, layer = build(kind, "cuda" if CUDA else "cpu")
    for _ in range(3):
        before = check(model, layer, grad=False)
    CHANGES[change](model, layer)
    check(model, layer, grad=False, changed_from=before)
    check(model, layer, grad=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("mode", ["on", "off"])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_state_round_trips_show_on_every_call(kind, mode, grad, device):
    lk.set_fast_path(mode)
    model, layer = build(kind, device)
    adapted = check(model, layer, grad)
    with lk.disabled(model):
        base = check(model, layer, grad, changed_from=adapted)
    assert torch.equal(check(model, layer, grad), adapted)
    lk.merge(model)
    lk.unmerge(model)
    assert torch.equal(check(model, layer, grad), adapted)
    lk.set_adapter(model, "b")
    check(model, layer, grad, changed_from=adapted)
    lk.set_adapter(model, "default")
    assert torch.equal(check(model, layer, grad), adapted)
    lk.set_fast_path("off" if mode == "on" else "on")
    check(model, layer, grad)
    lk.set_fast_path(mode)
    assert not torch.equal(adapted, base)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("mode", ["on", "off"])
def test_routes_and_what_follows_them(kind, mode):
    lk.set_fast_path(mode)
    model, layer = build(kind)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        adapted = check(model, layer, grad=False)
        with lk.disabled(model):
            base = model(x)
        lk.set_adapter(model, "b")
        only_b = model(x)
        lk.set_adapter(model, "default")
        with lk.route(model, ["b", None, "default"]):
            routed = model(x)
            with torch.no_grad():
                layer.adapters["b"].lora_B.mul_(2)
            routed_after_edit = model(x)
        assert torch.equal(check(model, layer, grad=False), adapted)
    torch.testing.assert_close(routed[0], only_b[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(routed[1], base[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(routed[2], adapted[2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(routed_after_edit[0] - base[0], 2 * (only_b[0] - base[0]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", list(KINDS))
def test_operands_are_the_adapters_own(kind):
    model, layer = build(kind)
    a = layer.adapters["default"]
    A, B, scale, p = a.operands()
    assert A is a.lora_A and scale == a.scale and p == a.dropout_p == 0.0
    assert B is a.lora_B if a.slices is None else torch.equal(B, a.full_B())
    a.dropout = nn.Dropout(0.25)
    assert a.operands()[3] == a.dropout_p == 0.25


@pytest.mark.parametrize("train", [False, True])
def test_apply_dropout_is_the_dropout_module(train):
    model, layer = build("linear")
    a = layer.adapters["default"]
    x = torch.randn(4, 8)
    assert a.apply_dropout(x) is x  # nn.Identity: no dropout configured
    a.dropout = nn.Dropout(0.5)
    model.train(train)
    torch.manual_seed(0)
    got = a.apply_dropout(x)
    torch.manual_seed(0)
    assert torch.equal(got, a.dropout(x))
    assert (got is x) == (not train)


@pytest.mark.parametrize("mode", ["on", "off"])
def test_inference_under_torch_compile_has_no_graph_break(mode):
    # The dict reads of the decode path trace like attribute reads.
    import torch._dynamo

    lk.set_fast_path(mode)
    model = make("llama")
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, targets="all-linear"))
    randomize(model)
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        eager = model(input_ids=ids).logits
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        compiled = torch.compile(model, backend="aot_eager")(input_ids=ids).logits
    assert not torch._dynamo.utils.counters["graph_break"]
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype, adapters", [(torch.float32, None), (torch.bfloat16, None),
                                             (torch.bfloat16, torch.float32)])
def test_eager_decode_repeats_its_launch_and_takes_the_general_path_when_it_does_not_fit(dtype, adapters):
    """After the first token, an adapted linear's decode call is the plan's one launch (no `lora_linear`), with
    the same bits; another input shape, autocast or a copied model take the general path, also exact. Float32
    adapters on a bfloat16 model (as `lorakit train` leaves them) get a plan too, with the bits of casting them."""
    torch.manual_seed(0)
    model = One(nn.Linear(256, 320)).eval()
    lk.inject(model, lk.LoraConfig(r=8, alpha=16, targets=["proj"]))
    randomize(model, std=0.1)
    model.to("cuda", dtype)
    layer = model.proj
    a = layer.adapters["default"]
    if adapters is not None:
        a.to(adapters)
        with torch.no_grad():
            x = torch.randn(1, 1, 256, device="cuda", dtype=dtype)
            cast = lora_linear(x, layer.weight, layer.bias, a.lora_A.to(dtype), a.lora_B.to(dtype), a.scale)
            assert torch.equal(model(x), cast)

    def want(x):
        return lora_linear(x, layer.weight, layer.bias, a.lora_A, a.lora_B, a.scale)

    x1 = torch.randn(1, 1, 256, device="cuda", dtype=dtype)
    with torch.no_grad():
        assert torch.equal(model(x1), want(x1))
        plans = state_of(layer).plans
        plan = plans.get(layer)
        assert plan is not None
        for _ in range(3):  # served by the plan: a call it does not serve makes a new one
            x = torch.randn(1, 1, 256, device="cuda", dtype=dtype)
            assert torch.equal(model(x), want(x))
        assert plans[layer] is plan
        a.lora_B.mul_(-3)  # in place: the same plan, the new values
        assert torch.equal(model(x1), want(x1)) and plans[layer] is plan
        if dtype == torch.bfloat16:  # more rows (float32 takes cuBLAS there); then one row again
            x4 = torch.randn(2, 2, 256, device="cuda", dtype=dtype)
            assert torch.equal(model(x4), want(x4))
            assert plans[layer] is not plan
        xt = torch.randn(256, 1, device="cuda", dtype=dtype).t().unsqueeze(0)  # (1, 1, 256), other strides
        assert torch.equal(model(xt), want(xt))
        with torch.autocast("cuda", dtype=torch.float16):
            got = model(x1)
            assert torch.equal(got, want(x1))
        copied = copy.deepcopy(model)
        assert copied.proj not in state_of(copied.proj).plans
        assert torch.equal(copied(x1), model(x1))
