"""Fusion across modules (lorakit.fusion): sibling linears in one call and LoRA inputs rebuilt in backward
give the plain per-module result, keep less for backward, and step aside when the pattern breaks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.fusion import install_producers, remove_producers
from lorakit.kernels import mark_recomputable, recipe_of
from models import llama


@pytest.fixture(autouse=True)
def restore_mode():
    yield
    lk.set_fast_path("auto")


def adapted_llama(dropout=0.0, seed=0):
    torch.manual_seed(seed)
    model = llama().double()
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, targets="all-linear", dropout=dropout))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.3)
    return model


def loss_and_grads(model, ids, mode):
    lk.set_fast_path(mode)
    model.zero_grad(set_to_none=True)
    loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def groups(model):
    seen = []
    for m in model.modules():
        g = getattr(m, "siblings", None)
        if g is not None and all(g is not s for s in seen):
            seen.append(g)
    return seen


def saved_bytes(fn):
    """Bytes of the distinct storages autograd keeps for backward while fn() builds its graph."""
    storages = {}

    def pack(t):
        if not isinstance(t, nn.Parameter):
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(storages.values()), out


def test_fused_model_matches_reference_and_learns_the_groups():
    model = adapted_llama()
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    ref_loss, ref_grads = loss_and_grads(model, ids, "off")
    for _ in range(3):  # the first forward learns which siblings read one tensor, later ones use it
        loss, grads = loss_and_grads(model, ids, "on")
        torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
        assert grads.keys() == ref_grads.keys()
        for n in grads:
            torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-10, atol=1e-12)
    attn = model.model.layers[0].self_attn
    g = attn.q_proj.siblings
    assert g is attn.k_proj.siblings is attn.v_proj.siblings
    names = [n for n, m in attn.named_children() if m in [g.members[i] for i in g.learned]]
    assert names == ["q_proj", "k_proj", "v_proj"]  # o_proj has the same input size but reads another tensor
    mlp = model.model.layers[0].mlp
    assert mlp.gate_proj.siblings.learned is not None and mlp.down_proj.siblings is None
    assert all(g.hits > 0 and g.misses == 0 for g in groups(model))


def test_grouped_call_runs_one_fused_function_per_group(monkeypatch):
    from lorakit import fusion

    model = adapted_llama()
    ids = torch.randint(0, 96, (2, 8))
    lk.set_fast_path("on")
    model(ids)  # learn
    calls = []
    real = fusion.SiblingGroup._run
    monkeypatch.setattr(fusion.SiblingGroup, "_run", lambda self, x: calls.append(self) or real(self, x))
    model(ids)
    assert len(calls) == 2 * len(model.model.layers)  # q/k/v and gate/up in every layer


def test_a_broken_pattern_computes_alone():
    model = adapted_llama()
    lk.set_fast_path("on")
    attn = model.model.layers[0].self_attn
    ids = torch.randint(0, 96, (2, 5))
    model(ids), model(ids)  # learn q/k/v, then use it
    g = attn.q_proj.siblings
    assert g.learned is not None and g.hits > 0
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    other = torch.randn_like(x)

    def ref(layer, t):
        lk.set_fast_path("off")
        try:
            return layer(t)
        finally:
            lk.set_fast_path("on")

    q = attn.q_proj(x)
    k = attn.k_proj(other)  # another tensor: k of `other`, not the pending k of x
    torch.testing.assert_close(k, ref(attn.k_proj, other))
    q = attn.q_proj(x)
    x.mul_(2)  # changed in place after q: v must see the new values
    torch.testing.assert_close(attn.v_proj(x), ref(attn.v_proj, x))
    torch.testing.assert_close(q, ref(attn.q_proj, x / 2))
    assert g.misses == 2
    lk.set_adapter(model, None)
    assert torch.equal(attn.q_proj(x), nn.functional.linear(x, attn.q_proj.weight))


def test_rebuilt_inputs_keep_less_and_give_the_same_gradients():
    model = adapted_llama()
    ids = torch.randint(0, 96, (2, 16))
    lk.set_fast_path("on")
    model(ids)  # first calls: RMSNorms check themselves, siblings learn
    kept_with, loss = saved_bytes(lambda: model(ids, labels=ids).loss)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    remove_producers(model)
    kept_without, loss2 = saved_bytes(lambda: model(ids, labels=ids).loss)
    loss2.backward()
    # Each layer no longer keeps its two norm outputs (32 wide) and its MLP product (48), 2 x 16
    # float64 tokens each, except the first norm: its input (the frozen embedding) needs no gradient.
    assert kept_without - kept_with == 2 * 16 * 8 * (2 * (32 + 32 + 48) - 32)
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-10, atol=1e-12)


def test_producers_fall_back_when_the_norm_is_not_the_llama_formula():
    class OffsetRMSNorm(nn.Module):  # Gemma-style (1 + weight): looks like an RMSNorm, computes another thing
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(8))
            self.variance_epsilon = 1e-6

        def forward(self, h):
            h32 = h.float()
            return (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
                    * (1.0 + self.weight.float())).to(h.dtype)

    norm = OffsetRMSNorm()
    assert install_producers(norm) == 1
    x = torch.randn(3, 8, requires_grad=True)
    expected = OffsetRMSNorm.forward(norm, x)
    assert torch.equal(norm(x), expected)
    assert "forward" in norm.__dict__ and norm.forward.__func__ is OffsetRMSNorm.forward  # checked once, for good
    assert recipe_of(norm(x)) is None


def test_producers_mark_llama_norm_and_mlp_outputs_bit_exactly():
    model = llama()
    install_producers(model)
    layer = model.model.layers[0]
    h = torch.randn(2, 3, 32, requires_grad=True)
    out = layer.input_layernorm(h)
    fn, tensors = recipe_of(layer.input_layernorm(h))
    assert torch.equal(fn(*tensors), out)
    assert torch.equal(out, type(layer.input_layernorm).forward(layer.input_layernorm, h))
    with torch.no_grad():
        assert recipe_of(layer.input_layernorm(h)) is None  # nothing to rebuild without a graph


def test_recipe_is_dropped_once_the_tensor_changes_in_place():
    a = torch.randn(4, requires_grad=True)
    x = mark_recomputable(a * 2, torch.mul, a, torch.tensor(2.0))
    assert recipe_of(x) is not None
    with torch.no_grad():
        x.add_(1)
    assert recipe_of(x) is None


def test_eject_removes_producers_and_groups():
    model = adapted_llama()
    assert any("forward" in m.__dict__ for m in model.modules())
    lk.eject(model, merge=False)
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert not any(getattr(m, "siblings", None) for m in model.modules())


def test_gradient_checkpointing_and_dropout_run_through_the_groups():
    model = adapted_llama(dropout=0.1)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.model.gradient_checkpointing
    model.train()
    ids = torch.randint(0, 96, (2, 12))
    lk.set_fast_path("on")
    for _ in range(3):
        torch.manual_seed(5)
        loss, grads = loss_and_grads(model, ids, "on")
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())
    assert all(g.hits > 0 for g in groups(model))
    # Checkpointing recomputes the same masks: its gradients equal the plain run's with the same seed.
    model.gradient_checkpointing_disable()
    torch.manual_seed(5)
    loss2, grads2 = loss_and_grads(model, ids, "on")
    torch.testing.assert_close(loss2, loss, rtol=1e-12, atol=1e-12)
    for n in grads:
        torch.testing.assert_close(grads2[n], grads[n], rtol=1e-10, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the fast path's default device)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_model_on_cuda_matches_reference(dtype):
    torch.manual_seed(0)
    model = llama().to("cuda", dtype)
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, targets="all-linear"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.3)
    ids = torch.randint(0, 96, (2, 64), device="cuda")
    ref_loss, ref_grads = loss_and_grads(model, ids, "off")
    for _ in range(3):
        loss, grads = loss_and_grads(model, ids, "auto")
    assert all(g.hits > 0 for g in groups(model))
    if dtype == torch.float32:
        tol = dict(rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(loss, ref_loss, **tol)
        for n in ref_grads:
            scale = ref_grads[n].abs().max().clamp_min(1e-6)
            torch.testing.assert_close(grads[n] / scale, ref_grads[n] / scale, **tol)
        return
    # bfloat16: two bf16 computations of this small deep model differ by several percent of a gradient's
    # largest entry, whichever way each rounds; so both are measured against the float64 truth instead,
    # and the fast path may not be worse than the reference path (tests/test_kernels.py checks each
    # Function against float64 on its own).
    true_loss, true_grads = loss_and_grads(model.double(), ids, "off")

    def errors(g):
        return torch.tensor([((g[n].double() - true_grads[n]).abs().max() / true_grads[n].abs().max()).item()
                             for n in true_grads])

    fast, ref = errors(grads), errors(ref_grads)
    assert abs(loss.double() - true_loss) <= 1.5 * abs(ref_loss.double() - true_loss) + 1e-2
    assert fast.max() <= 1.5 * ref.max() and fast.median() <= 1.5 * ref.median(), (fast, ref)


def test_torch_compile_of_an_adapted_model_matches_eager():
    # The fused Functions trace into one graph (no graph break); dropout masks come from the same
    # seeds, so compiled and eager runs give the same loss and gradients.
    import torch._dynamo

    model = adapted_llama(dropout=0.1)
    model.train()
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(2))
    lk.set_fast_path("on")
    torch.manual_seed(7)
    ref_loss, ref_grads = loss_and_grads(model, ids, "on")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(model, backend="aot_eager")
    torch.manual_seed(7)
    loss, grads = loss_and_grads(compiled, ids, "on")
    assert not torch._dynamo.utils.counters["graph_break"]
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    grads = {n.removeprefix("_orig_mod."): g for n, g in grads.items()}
    assert grads.keys() == ref_grads.keys()
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-10, atol=1e-12)


def _autocast_run(model, ids, mode):  # backward outside autocast, as training loops run it
    lk.set_fast_path(mode)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _check_against_float64(model, ids):
    """The fast path under bf16 autocast is as close to the float64 result as the reference path under it."""
    exact = adapted_llama()  # the same weights, in float64
    want_loss, want = loss_and_grads(exact, ids, "off")
    ref_loss, ref = _autocast_run(model, ids, "off")

    def err(grads, n):
        return ((grads[n].double() - want[n]).norm() / want[n].norm()).item()

    for _ in range(2):  # the second call runs the learned groups
        loss, got = _autocast_run(model, ids, "on")
        assert got.keys() == want.keys() and len(got) == 2 * 7 * len(model.model.layers)
        assert abs(loss.double() - want_loss) <= 2 * abs(ref_loss.double() - want_loss) + 1e-3
        for n in got:
            assert got[n].dtype == torch.float32
            assert err(got, n) <= 2 * err(ref, n) + 5e-3, (n, err(got, n), err(ref, n))


def test_autocast_over_float32_weights_matches_reference():
    """bfloat16 autocast over a float32 model: the fused calls cast x after the RMSNorm that made it,
    and backward rebuilds x and casts it the same way."""
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    _check_against_float64(adapted_llama().float(), ids)


def test_bf16_base_with_float32_adapters_under_autocast_runs_the_same_dtype_path(monkeypatch):
    """The mixed precision `lorakit train` uses on a GPU: frozen weights in bfloat16, adapters in float32
    (they train), autocast. The calls take the same-dtype Functions, which cast the adapters inside (no
    autograd node for the casts); the adapters' gradients come back in float32."""
    from lorakit.kernels import linear

    model = adapted_llama().to(torch.bfloat16)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    general = []
    real = linear.LoraLinearFunction.apply
    monkeypatch.setattr(linear.LoraLinearFunction, "apply", lambda *a: general.append(1) or real(*a))
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    _check_against_float64(model, ids)
    assert not general  # every call took the same-dtype Functions
    # the adapters are cast inside those Functions: no cast node of autograd's between them and their gradients
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, labels=ids).loss
    adapters = {id(p) for n, p in model.named_parameters() if "lora_" in n}
    parents, seen, todo = set(), set(), [loss.grad_fn]
    while todo:
        node = todo.pop()
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            if id(getattr(nxt, "variable", None)) in adapters:
                parents.add(type(node).__name__)
            elif nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    assert parents == {"LoraLinearSharedBackward", "LoraLinearSingleBackward"}, parents
