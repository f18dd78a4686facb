"""Fusion across modules (`lk.fuse`): only on request, reported and undone; sibling linears in one call and
LoRA inputs rebuilt in backward give the plain per-module result and keep less for backward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.fast import FastState
from lorakit.fast.fusion import families, producers
from models import llama


@pytest.fixture(autouse=True)
def restore_mode():
    yield
    lk.set_fast_path("auto")


def adapted_llama(dropout=0.0, seed=0, fused=True, targets="all-linear"):
    torch.manual_seed(seed)
    model = llama().double()
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, targets=targets, dropout=dropout))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.3)
    if fused:
        lk.fuse(model)
    return model


def loss_and_grads(model, ids, mode):
    lk.set_fast_path(mode)
    model.zero_grad(set_to_none=True)
    loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def instance_forwards(model):
    return [n for n, m in model.named_modules() if "forward" in m.__dict__]


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


def test_inject_changes_only_the_modules_it_targets():
    model = llama()
    before = {n: type(m) for n, m in model.named_modules()}
    lk.inject(model, lk.LoraConfig(r=4, targets=["q_proj"]))
    after = {n: type(m) for n, m in model.named_modules() if ".adapters" not in n and not n.endswith(".dropout")}
    changed = {n for n in after if after[n] is not before.get(n)}
    assert changed == {f"model.layers.{i}.self_attn.q_proj" for i in range(len(model.model.layers))}
    assert instance_forwards(model) == []
    assert not model._forward_pre_hooks and not model._forward_hooks


def test_fuse_reports_what_it_changed_and_undo_restores_every_forward():
    model = adapted_llama(fused=False, targets=["q_proj", "v_proj", "gate_proj"])
    handle = lk.fuse(model)
    report = str(handle)
    n_layers = len(model.model.layers)
    assert len(handle.groups) == n_layers  # q and v of each layer; gate_proj alone is no group
    assert "group    model.layers.0.self_attn: q_proj, v_proj\n" in report
    assert len(handle.skipped) == n_layers and "only ['gate_proj'] adapted" in report
    producers_set = {n for n in instance_forwards(model)}
    assert producers_set == {n for n, m in model.named_modules() if type(m).__name__ in ("LlamaRMSNorm", "LlamaMLP")}
    assert all(n in report for n in producers_set)
    assert lk.fuse(model) is handle  # fusing twice fuses once
    handle.undo()
    assert instance_forwards(model) == [] and "undone" in str(handle)
    handle.undo()
    lk.unfuse(model)  # idempotent
    assert lk.fuse(model) is not handle and instance_forwards(model)
    lk.unfuse(model)
    assert instance_forwards(model) == []


def test_fuse_before_inject_is_refused_and_changes_nothing():
    model = llama()
    with pytest.raises(lk.StateError, match="lk.inject"):
        lk.fuse(model)
    assert instance_forwards(model) == []


def test_fused_model_matches_reference_and_takes_the_group_path():
    model = adapted_llama()
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    ref_loss, ref_grads = loss_and_grads(model, ids, "off")
    loss, grads = loss_and_grads(model, ids, "on")
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    assert grads.keys() == ref_grads.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-10, atol=1e-12)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    x = torch.randn(2, 3, 32, dtype=torch.float64)
    assert lk.explain(attn.q_proj, x).startswith("group:") and lk.explain(mlp.up_proj, x).startswith("group:")
    assert lk.explain(attn.o_proj, x).startswith("linear:") and lk.explain(mlp.down_proj, x).startswith("linear:")
    with torch.no_grad():
        assert lk.explain(attn.q_proj, x).startswith("infer:")
    lk.set_fast_path("off")
    assert lk.explain(attn.q_proj, x).startswith("reference:")


def test_a_call_off_the_pattern_computes_alone():
    model = adapted_llama()
    lk.set_fast_path("on")
    attn = model.model.layers[0].self_attn
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
    k = attn.k_proj(x)  # called first this time: it computes the group, q picks its output up
    torch.testing.assert_close(attn.q_proj(x), ref(attn.q_proj, x))
    torch.testing.assert_close(k, ref(attn.k_proj, x))
    lk.set_adapter(model, None)
    assert torch.equal(attn.q_proj(x), nn.functional.linear(x, attn.q_proj.weight))


def test_rebuilt_inputs_keep_less_and_give_the_same_gradients():
    model = adapted_llama()
    ids = torch.randint(0, 96, (2, 16))
    lk.set_fast_path("on")
    kept_with, loss = saved_bytes(lambda: model(ids, labels=ids).loss)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    lk.unfuse(model)
    kept_without, loss2 = saved_bytes(lambda: model(ids, labels=ids).loss)
    loss2.backward()
    # Each layer no longer keeps its two norm outputs (32 wide) and its MLP product (48), 2 x 16
    # float64 tokens each, except the first norm: its input (the frozen embedding) needs no gradient.
    # The groups keep their concatenated A's instead ((3 + 2) x r=4 rows of 32 per layer).
    assert kept_without - kept_with == 2 * 16 * 8 * (2 * (32 + 32 + 48) - 32) - 2 * 5 * 4 * 32 * 8
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-10, atol=1e-12)


def test_every_registered_producer_computes_its_class_forward_bit_exactly():
    import sys

    from transformers import PretrainedConfig

    def config_of(cls):  # the family's own config class, from the module that defines cls
        kinds = [v for v in vars(sys.modules[cls.__module__]).values()
                 if isinstance(v, type) and issubclass(v, PretrainedConfig) and v is not PretrainedConfig]
        return kinds[0](hidden_size=32, intermediate_size=48)

    table = producers()
    assert {f.name for f in families()} >= {"llama", "mistral", "qwen2"}
    for cls, fn in table.items():
        torch.manual_seed(0)
        module = cls(32, eps=1e-6) if cls.__name__.endswith("RMSNorm") else cls(config_of(cls))
        with torch.no_grad():
            for p in module.parameters():
                p.normal_()
        for dtype in (torch.float32, torch.bfloat16):
            module.to(dtype)
            h = torch.randn(2, 3, 32, dtype=dtype, requires_grad=True)
            state = FastState()
            out = fn(module, state, h)
            assert torch.equal(out, cls.forward(module, h)), cls
            if cls.__name__.endswith("RMSNorm"):
                rebuild, tensors = state.recipe(out)
                assert torch.equal(rebuild(*tensors), out), cls
            with torch.no_grad():
                assert state.recipe(fn(module, FastState(), h)) is None  # nothing to rebuild without a graph


def test_recipe_is_dropped_once_the_tensor_changes_in_place():
    a = torch.randn(4, requires_grad=True)
    state = FastState()
    x = a * 2
    state.mark(x, torch.mul, a, torch.tensor(2.0))
    assert state.recipe(x) is not None and not hasattr(x, "_lorakit_recipe")
    with torch.no_grad():
        x.add_(1)
    assert state.recipe(x) is None


def test_eject_undoes_the_fusion():
    model = adapted_llama()
    assert instance_forwards(model)
    lk.eject(model, merge=False)
    assert instance_forwards(model) == []
    assert all(type(m).__name__ != "LoraLinear" for m in model.modules())


def test_gradient_checkpointing_and_dropout_run_through_the_groups():
    model = adapted_llama(dropout=0.1)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.model.gradient_checkpointing
    model.train()
    ids = torch.randint(0, 96, (2, 12))
    torch.manual_seed(5)
    loss, grads = loss_and_grads(model, ids, "on")
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())
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
    lk.fuse(model)
    loss, grads = loss_and_grads(model, ids, "auto")
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
    # seeds, so compiled and eager runs give the same loss and gradients. (Sibling groups, which share
    # one mask, step aside under torch.compile: the eager run here is unfused too.)
    import torch._dynamo

    model = adapted_llama(dropout=0.1, fused=False)
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
    assert not torch._dynamo.utils.counters["graph_break"], list(torch._dynamo.utils.counters["graph_break"])
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


def test_bf16_base_with_float32_adapters_under_autocast_runs_the_same_dtype_path():
    """The mixed precision `lorakit train` uses on a GPU: frozen weights in bfloat16, adapters in float32
    (they train), autocast. The calls take the same-dtype Functions, which cast the adapters inside (no
    autograd node for the casts); the adapters' gradients come back in float32."""
    model = adapted_llama().to(torch.bfloat16)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    _check_against_float64(model, ids)
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
    assert parents == {"LoraLinearGroupBackward"}, parents
