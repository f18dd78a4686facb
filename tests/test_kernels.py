"""The fast path computes the reference's function: outputs and gradients, every dtype and shape.

Each fused Function / kernel is compared with `lorakit.kernels.reference` evaluated in float64
on the same random inputs (and, with dropout, the same mask: the fast path's mask is a
function of an explicit seed, `keep_mask(seed, ...)`). CPU runs the autograd Functions with
the PyTorch backend; the Triton kernels run on CUDA, or on CPU under TRITON_INTERPRET=1 in a
subprocess (the interpreter is chosen when Triton compiles, so it needs a fresh process).
"""

from __future__ import annotations

import itertools
import textwrap

import pytest
import torch

from lorakit.kernels import (keep_mask, lora_linear, lora_linear_group, lora_linear_multi, lora_linear_routed,
                             mark_recomputable, new_seed, recipe_of, reference_lora_linear,
                             reference_lora_linear_multi, reference_lora_linear_routed)
from lorakit.kernels import _triton
from models import run_under_interpreter

CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])
# ||out - ref|| / ||ref|| bounds: float32 arithmetic (tf32 is off for float32 in the kernels), half precisions.
TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def dtypes_for(device: str) -> list[torch.dtype]:
    return [torch.float32, torch.bfloat16, torch.float64] + ([torch.float16] if device == "cuda" else [])


def make(shape_x, out_f, r, dtype, device, bias, gen):
    in_f = shape_x[-1]
    x = torch.randn(*shape_x, generator=gen).to(device, dtype)
    W = (torch.randn(out_f, in_f, generator=gen) / in_f ** 0.5).to(device, dtype)
    b = torch.randn(out_f, generator=gen).to(device, dtype) if bias else None
    A = (torch.randn(r, in_f, generator=gen) / in_f ** 0.5).to(device, dtype)
    B = torch.randn(out_f, r, generator=gen).to(device, dtype)  # nonzero B: the LoRA term matters
    return x, W, b, A, B


def rows_of(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1]


# -- the dropout mask -----------------------------------------------------------------------------

@pytest.mark.skipif(_triton._DESCRIPTOR is None, reason="this Triton has no host-side tensor descriptors")
def test_descriptors_built_without_checks_equal_from_tensor():
    # `expand_gemm` builds its copy-engine descriptors field by field (its own checks ran before):
    # every field must be what Triton's `from_tensor` would have set
    base = torch.zeros(40, 64, dtype=torch.bfloat16)
    for t, block in [(base, [16, 32]), (base[:, 16:48], [8, 16]), (base[8:], [32, 64])]:
        mine, theirs = _triton._descriptor(t, block), _triton._DESCRIPTOR.from_tensor(t, block)
        assert type(mine) is type(theirs) and vars(mine).keys() == vars(theirs).keys()
        for k, v in vars(theirs).items():
            assert getattr(mine, k) is v if k == "base" else getattr(mine, k) == v, k
        assert _triton._specs((mine,)) == _triton._specs((theirs,))


@pytest.mark.skipif(_triton.triton is None, reason="Triton is not installed")
def test_direct_launch_key_separates_what_triton_specializes_on():
    # `_launch` reuses a compiled kernel only for arguments with the same key: it must tell apart
    # everything Triton compiles differently for (dtype, 16-byte alignment, ints 0 / 1 / %16 / 64-bit).
    t = torch.zeros(64)
    key = _triton._specs
    for a, b in [((t, 32, 2.0), (torch.ones(64), 48, 3.5)), ((2 ** 31,), (2 ** 35 + 48,))]:
        assert key(a) == key(b)
    for a, b in [(t, t.half()), (t, t[1:]), (1, 2), (0, 16), (16, 17), (2 ** 31, 32), (True, 1)]:
        assert key((a,)) != key((b,)), (a, b)
    desc = _triton._DESCRIPTOR
    if desc is not None:  # copy-engine descriptors: compiled for their dtype and tile, not for their sizes
        m = torch.zeros(64, 32)
        assert key((desc.from_tensor(m, [16, 16]),)) == key((desc.from_tensor(torch.zeros(128, 48), [16, 16]),))
        for other in (desc.from_tensor(m, [16, 32]), desc.from_tensor(m.half(), [16, 16])):
            assert key((desc.from_tensor(m, [16, 16]),)) != key((other,))


def test_mask_is_a_function_of_the_seed_with_the_right_rate():
    seed = torch.tensor([12345, 678], dtype=torch.int64)
    m1 = keep_mask(seed, 256, 513, 0.1)
    assert m1.shape == (256, 513) and m1.dtype == torch.bool
    assert torch.equal(m1, keep_mask(seed.clone(), 256, 513, 0.1))
    assert abs(m1.float().mean().item() - 0.9) < 0.005
    other = keep_mask(torch.tensor([12346, 678]), 256, 513, 0.1)
    assert (m1 != other).float().mean() > 0.1  # another seed: another mask (independent: 2 * 0.9 * 0.1)
    assert keep_mask(seed, 4, 4, 0.0).all()
    # rows and columns are not correlated: neighbouring elements agree about as often as chance
    agree = (m1[:, 1:] == m1[:, :-1]).float().mean().item()
    assert abs(agree - (0.9 ** 2 + 0.1 ** 2)) < 0.01


# -- lora_linear against the float64 reference ------------------------------------------------------

# Every pair of (x shape, bias, rank, dropout) values appears in some case (all pairs, not all products).
CASES = [((11, 24), False, 1, 0.0), ((2, 5, 24), True, 1, 0.25), ((11, 24), True, 8, 0.25),
         ((2, 5, 24), False, 8, 0.0), ((11, 24), False, 16, 0.25), ((2, 5, 24), True, 16, 0.0)]


@pytest.mark.parametrize("device", DEVICES)
def test_lora_linear_matches_reference(device):
    gen = torch.Generator().manual_seed(0)
    for dtype in dtypes_for(device):
        for shape_x, bias, r, p in CASES:
            x, W, b, A, B = make(shape_x, 20, r, dtype, device, bias, gen)
            if b is not None:
                b.requires_grad_(True)
            x.requires_grad_(True)
            A.requires_grad_(True)
            B.requires_grad_(True)
            seed = new_seed(device)
            y = lora_linear(x, W, b, A, B, 1.7, p, training=True, seed=seed)
            keep = keep_mask(seed, rows_of(x), x.shape[-1], p).view(x.shape)
            leaves = [t.detach().double().requires_grad_(True) for t in (x, A, B)]
            b64 = b.detach().double().requires_grad_(True) if b is not None else None
            ref = reference_lora_linear(leaves[0], W.double(), b64, leaves[1], leaves[2], 1.7, p, True, keep)
            what = f"{device} {dtype} x{shape_x} bias={bias} r={r} p={p}"
            assert y.shape == ref.shape and y.dtype == dtype, what
            assert rel_err(y, ref) < TOL[dtype], what
            gy = torch.randn(y.shape, generator=gen).to(device, dtype)
            got = torch.autograd.grad(y, [x, A, B] + ([b] if b is not None else []), gy)
            want = torch.autograd.grad(ref, leaves + ([b64] if b64 is not None else []), gy.double())
            for name, g, w in zip(["x", "A", "B", "bias"], got, want):
                assert g.dtype == dtype, (what, name)
                assert rel_err(g, w) < TOL[dtype], (what, name, rel_err(g, w))


def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(1)
    for shape_x, p in [((3, 6), 0.0), ((2, 3, 6), 0.3)]:
        x, W, b, A, B = make(shape_x, 5, 2, torch.float64, "cpu", True, gen)
        seed = torch.tensor([7, 9])
        args = [t.requires_grad_(True) for t in (x, W, b, A, B)]  # frozen-or-not: W and b too
        assert torch.autograd.gradcheck(
            lambda x, W, b, A, B: lora_linear(x, W, b, A, B, 0.5, p, True, seed=seed), args)


def test_frozen_weight_gets_no_gradient_and_x_may_not_need_one():
    gen = torch.Generator().manual_seed(2)
    x, W, b, A, B = make((4, 8), 6, 2, torch.float32, "cpu", True, gen)
    A.requires_grad_(True)
    B.requires_grad_(True)
    lora_linear(x, W, b, A, B, 1.0, 0.1, True).sum().backward()
    assert W.grad is None and b.grad is None and x.grad is None
    assert A.grad is not None and B.grad is not None


def test_inference_path_equals_training_path():
    gen = torch.Generator().manual_seed(3)
    x, W, b, A, B = make((2, 3, 16), 8, 4, torch.float32, "cpu", True, gen)
    with torch.no_grad():
        y0 = lora_linear(x, W, b, A, B, 2.0, 0.5, training=False)
    y1 = lora_linear(x, W, b, A.requires_grad_(True), B, 2.0, 0.5, training=False)
    assert torch.equal(y0, y1.detach())
    assert torch.allclose(y0, reference_lora_linear(x, W, b, A.detach(), B, 2.0), atol=1e-5)


class _OpLog(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the aten ops a call runs, with their output shapes."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append((func.overloadpacket.__name__, tuple(out.shape) if isinstance(out, torch.Tensor) else None))
        return out


@pytest.mark.parametrize("device", DEVICES)
def test_inference_on_many_rows_goes_through_a_scratch_merged_weight(device):
    # Prefill-sized inference forms W + s * B @ A once per call (the adapter stays unmerged: W is
    # untouched) instead of the (rows, r) shrink and a (rows, out) LoRA output read back by the GEMM.
    from lorakit.kernels.linear import _merge_pays

    gen = torch.Generator().manual_seed(31)
    assert _merge_pays(256, 48, 32) and not _merge_pays(6, 48, 32)
    for dtype in dtypes_for(device):
        for bias, transposed in [(True, False), (False, True)]:
            x, W, b, A, B = make((4, 64, 32), 48, 8, dtype, device, bias, gen)
            if transposed:  # GPT-2's Conv1D keeps (in, out) and hands over a transposed view
                W = W.t().contiguous().t()
            W0 = W.clone()
            with torch.no_grad(), _OpLog() as log:
                y = lora_linear(x, W, b, A, B, 0.75)
            assert torch.equal(W, W0), "the base weight must stay as it was"
            assert (256, 8) not in [shape for _, shape in log.ops], log.ops  # no shrink x @ A.T
            assert rel_err(y, reference_lora_linear(*(t.double() if t is not None else None
                                                      for t in (x, W, b, A, B)), 0.75)) < TOL[dtype]
            # the same function as a merged layer, whose weight is rounded once (as `lk.merge` does)
            merged = (W.double() + 0.75 * B.double() @ A.double()).to(dtype)
            y_merged = torch.nn.functional.linear(x, merged, b)
            assert rel_err(y, y_merged) < {torch.float64: 1e-12, torch.float32: 1e-6}.get(dtype, 4e-3)
            if device == "cpu":  # few rows keep the LoRA terms beside the base GEMM (CUDA: one fused kernel)
                with torch.no_grad(), _OpLog() as log:
                    lora_linear(x[:1, :4], W, b, A, B, 0.75)
                assert (4, 8) in [shape for _, shape in log.ops], log.ops


@pytest.mark.parametrize("device", DEVICES)
def test_training_without_dropout_on_many_rows_matches_the_reference(device):
    # rows > 1.5 * in: the forward runs on a scratch merged weight, alone and as a group; gradients as ever
    from lorakit.kernels.linear import _merge_pays_training

    assert _merge_pays_training(128, 32) and not _merge_pays_training(40, 32)
    gen = torch.Generator().manual_seed(32)
    for dtype in dtypes_for(device):
        x, W, b, A, B = make((2, 64, 32), 24, 4, dtype, device, True, gen)
        _, W2, _, A2, B2 = make((2, 64, 32), 40, 8, dtype, device, False, gen)
        gys = [torch.randn(2, 64, n, generator=gen).to(device, dtype) for n in (24, 40)]
        W0 = W.clone()
        for group in (False, True):
            leaves = [t.detach().clone().requires_grad_(True) for t in (x, A, B, A2, B2)]
            xl, Al, Bl, A2l, B2l = leaves
            with _OpLog() as log:
                ys = lora_linear_group(xl, [W, W2], [b, None], [Al, A2l], [Bl, B2l], [0.5, 2.0], 0.0, True) \
                    if group else (lora_linear(xl, W, b, Al, Bl, 0.5, 0.0, True),)
            assert ("addmm", (24, 32)) in log.ops, log.ops  # the scratch merged weight
            torch.autograd.backward(ys, gys[:len(ys)])
            refs = [t.detach().double().requires_grad_(True) for t in leaves]
            xr, Ar, Br, A2r, B2r = refs
            rys = [reference_lora_linear(xr, W.double(), b.double(), Ar, Br, 0.5),
                   reference_lora_linear(xr, W2.double(), None, A2r, B2r, 2.0)][:len(ys)]
            torch.autograd.backward(rys, [g.double() for g in gys[:len(ys)]])
            for y, r in zip(ys, rys):
                assert rel_err(y, r) < TOL[dtype]
            for t, r in zip(leaves[:1 + 2 * len(ys)], refs):
                assert rel_err(t.grad, r.grad) < TOL[dtype]
        assert torch.equal(W, W0)


def test_bad_shapes_and_dropout_are_refused():
    x, W, b, A, B = make((4, 8), 6, 2, torch.float32, "cpu", False, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="shapes do not fit"):
        lora_linear(x, W, b, A, B.t().contiguous(), 1.0)
    with pytest.raises(ValueError, match="dropout"):
        lora_linear(x, W, b, A, B, 1.0, 1.0, True)


# -- several adapters, groups of linears ---------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_multi_matches_reference(device):
    gen = torch.Generator().manual_seed(4)
    for dtype in dtypes_for(device):
        x, W, b, A1, B1 = make((3, 4, 32), 16, 8, dtype, device, True, gen)
        _, _, _, A2, B2 = make((3, 4, 32), 16, 1, dtype, device, True, gen)
        _, _, _, A3, B3 = make((3, 4, 32), 16, 16, dtype, device, True, gen)
        As, Bs, scales, ps = [A1, A2, A3], [B1, B2, B3], [2.0, 0.5, 1.0], [0.2, 0.0, 0.4]
        seeds = [new_seed(device), new_seed(device)]  # one per adapter with dropout
        leaves = [t.requires_grad_(True) for t in [x, *As, *Bs]]
        y = lora_linear_multi(x, W, b, As, Bs, scales, ps, True, seeds=seeds)
        keeps = [keep_mask(seeds[0], 12, 32, 0.2).view(x.shape), None, keep_mask(seeds[1], 12, 32, 0.4).view(x.shape)]
        ref_leaves = [t.detach().double().requires_grad_(True) for t in leaves]
        ref = reference_lora_linear_multi(ref_leaves[0], W.double(), b.double(), ref_leaves[1:4], ref_leaves[4:],
                                          scales, ps, True, keeps)
        assert rel_err(y, ref) < TOL[dtype], dtype
        gy = torch.randn(y.shape, generator=gen).to(device, dtype)
        for g, w in zip(torch.autograd.grad(y, leaves, gy), torch.autograd.grad(ref, ref_leaves, gy.double())):
            assert rel_err(g, w) < TOL[dtype], dtype


@pytest.mark.parametrize("device", DEVICES)
def test_group_matches_separate_references_with_one_shared_mask(device):
    gen = torch.Generator().manual_seed(5)
    for dtype in dtypes_for(device):
        x = torch.randn(2, 7, 32, generator=gen).to(device, dtype)
        outs, ranks = [32, 8, 8], [16, 16, 4]  # q, k, v of a GQA layer
        Ws = [(torch.randn(o, 32, generator=gen) / 6).to(device, dtype) for o in outs]
        bs = [None, torch.randn(8, generator=gen).to(device, dtype), None]
        As = [(torch.randn(r, 32, generator=gen) / 6).to(device, dtype).requires_grad_(True) for r in ranks]
        Bs = [torch.randn(o, r, generator=gen).to(device, dtype).requires_grad_(True) for o, r in zip(outs, ranks)]
        x.requires_grad_(True)
        seed = new_seed(device)
        ys = lora_linear_group(x, Ws, bs, As, Bs, [2.0, 1.0, 0.5], 0.1, True, seed=seed)
        keep = keep_mask(seed, 14, 32, 0.1).view(x.shape)
        x64 = x.detach().double().requires_grad_(True)
        A64 = [a.detach().double().requires_grad_(True) for a in As]
        B64 = [t.detach().double().requires_grad_(True) for t in Bs]
        refs = [reference_lora_linear(x64, W.double(), None if bb is None else bb.double(), a, bm, s, 0.1, True, keep)
                for W, bb, a, bm, s in zip(Ws, bs, A64, B64, [2.0, 1.0, 0.5])]
        gys = [torch.randn(y.shape, generator=gen).to(device, dtype) for y in ys]
        for y, ref in zip(ys, refs):
            assert rel_err(y, ref) < TOL[dtype], dtype
        got = torch.autograd.grad(ys, [x, *As, *Bs], gys)
        want = torch.autograd.grad(refs, [x64, *A64, *B64], [g.double() for g in gys])
        for g, w in zip(got, want):
            assert rel_err(g, w) < TOL[dtype], dtype


# -- routed: one adapter per batch row -----------------------------------------------------------------

def routed_case(shape_x, dtype, device, gen, ranks=(8, 1, 16), out_f=24):
    in_f = shape_x[-1]
    x = torch.randn(*shape_x, generator=gen).to(device, dtype)
    W = (torch.randn(out_f, in_f, generator=gen) / in_f ** 0.5).to(device, dtype)
    b = torch.randn(out_f, generator=gen).to(device, dtype)
    As = [(torch.randn(r, in_f, generator=gen) / in_f ** 0.5).to(device, dtype) for r in ranks]
    Bs = [torch.randn(out_f, r, generator=gen).to(device, dtype) for r in ranks]
    rows = torch.tensor([2, -1, 0, 2, 1, 0][:shape_x[0]], device=device)
    return x, W, b, As, Bs, rows


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape_x", [(6, 40), (5, 7, 40), (6, 2, 3, 40)])
def test_routed_matches_reference(device, shape_x):
    gen = torch.Generator().manual_seed(6)
    backends = ["torch"] + (["triton"] if _triton.available_for(torch.empty(0, device=device)) else [])
    for dtype, backend in itertools.product(dtypes_for(device), backends):
        if backend == "triton" and dtype == torch.float64:
            continue
        x, W, b, As, Bs, rows = routed_case(shape_x, dtype, device, gen)
        scales = [2.0, 0.5, 1.0]
        leaves = [t.requires_grad_(True) for t in [x, *As, *Bs]]
        y = lora_linear_routed(x, W, b, As, Bs, scales, rows, backend=backend)
        ref_leaves = [t.detach().double().requires_grad_(True) for t in leaves]
        ref = reference_lora_linear_routed(ref_leaves[0], W.double(), b.double(), ref_leaves[1:4], ref_leaves[4:],
                                           scales, rows)
        what = f"{device} {dtype} {backend} {shape_x}"
        assert rel_err(y, ref) < TOL[dtype], what
        gy = torch.randn(y.shape, generator=gen).to(device, dtype)
        for g, w in zip(torch.autograd.grad(y, leaves, gy), torch.autograd.grad(ref, ref_leaves, gy.double())):
            assert rel_err(g, w) < TOL[dtype], what


def test_routed_gradcheck_and_unused_adapter():
    gen = torch.Generator().manual_seed(7)
    x, W, b, As, Bs, rows = routed_case((4, 3, 6), torch.float64, "cpu", gen, ranks=(2, 1, 3), out_f=5)
    rows = torch.tensor([2, -1, 0, 2])  # adapter 1 is unused: its gradients are zero
    args = [t.requires_grad_(True) for t in [x, *As, *Bs]]
    assert torch.autograd.gradcheck(
        lambda x, a0, a1, a2, b0, b1, b2: lora_linear_routed(x, W, b, [a0, a1, a2], [b0, b1, b2], [1.0, 2.0, 0.5],
                                                             rows, backend="torch"), args)
    lora_linear_routed(x, W, b, As, Bs, [1.0, 2.0, 0.5], rows).sum().backward()
    assert As[1].grad.abs().sum() == 0 and Bs[1].grad.abs().sum() == 0


@pytest.mark.parametrize("shape_x", [(6, 40), (6, 5, 40)])
def test_routed_dropout_is_the_seeds_mask_in_forward_and_backward(shape_x):
    gen = torch.Generator().manual_seed(9)
    x, W, b, As, Bs, rows = routed_case(shape_x, torch.float64, "cpu", gen)
    leaves = [t.requires_grad_(True) for t in [x, *As, *Bs]]
    seed = new_seed("cpu")
    y = lora_linear_routed(x, W, b, As, Bs, [2.0, 0.5, 1.0], rows, dropout=0.3, training=True, seed=seed)
    keep = keep_mask(seed, x.numel() // 40, 40, 0.3).view(x.shape)
    assert 0 < int(keep.sum()) < keep.numel()
    ref_leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    ref = reference_lora_linear_routed(ref_leaves[0], W, b, ref_leaves[1:4], ref_leaves[4:], [2.0, 0.5, 1.0], rows,
                                       0.3, keep)
    torch.testing.assert_close(y, ref)
    gy = torch.randn(y.shape, generator=gen, dtype=y.dtype)
    for g, w in zip(torch.autograd.grad(y, leaves, gy), torch.autograd.grad(ref, ref_leaves, gy)):
        torch.testing.assert_close(g, w)
    without = reference_lora_linear_routed(x.detach(), W, b, [a.detach() for a in As], [b_.detach() for b_ in Bs],
                                           [2.0, 0.5, 1.0], rows)
    assert not torch.allclose(y, without)  # the mask mattered
    evaluated = lora_linear_routed(x, W, b, As, Bs, [2.0, 0.5, 1.0], rows, dropout=0.3, training=False)
    torch.testing.assert_close(evaluated, without)  # no dropout outside training
    with pytest.raises(ValueError, match="dropout"):
        lora_linear_routed(x, W, b, As, Bs, [2.0, 0.5, 1.0], rows, dropout=1.0, training=True)


def test_routed_refuses_bad_rows():
    x, W, b, As, Bs, _ = routed_case((3, 40), torch.float32, "cpu", torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="one adapter index"):
        lora_linear_routed(x, W, b, As, Bs, [1.0] * 3, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="must lie in"):
        lora_linear_routed(x, W, b, As, Bs, [1.0] * 3, torch.tensor([0, 3, -1]))


# -- rebuilding x in backward instead of keeping it --------------------------------------------------

def saved_storages(fn) -> set[int]:
    ptrs = set()

    def pack(t):
        ptrs.add(t.untyped_storage().data_ptr())
        return t.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, ptrs


def test_recompute_gives_the_same_gradients_without_keeping_x():
    gen = torch.Generator().manual_seed(10)
    u = torch.randn(2, 5, 16, generator=gen, requires_grad=True)
    s = torch.randn(2, 5, 16, generator=gen, requires_grad=True)
    W = torch.randn(12, 16, generator=gen)
    A = torch.randn(4, 16, generator=gen, requires_grad=True)
    B = torch.randn(12, 4, generator=gen, requires_grad=True)
    Ws = [W, W[:6].clone()]
    As = [A, A[:2].detach().clone().requires_grad_(True)]
    Bs = [B, B[:6, :2].detach().clone().requires_grad_(True)]
    seed = torch.tensor([5, 6])
    for group in (False, True):
        grads = []
        for rc in (False, True):
            x = mark_recomputable(s * u, torch.mul, s, u)  # x = s * u; s and u are kept by the mul anyway
            recipe = recipe_of(x) if rc else None
            if group:
                fn = lambda: lora_linear_group(x, Ws, [None, None], As, Bs, [2.0, 0.5], 0.2, True, seed=seed,  # noqa
                                               recompute=recipe)
            else:
                fn = lambda: (lora_linear(x, W, None, A, B, 2.0, 0.2, True, seed=seed, recompute=recipe),)  # noqa
            ys, ptrs = saved_storages(fn)
            assert (x.untyped_storage().data_ptr() in ptrs) != rc  # x itself is kept only without the recipe
            wrt = [u, s, *As, *Bs] if group else [u, s, A, B]
            grads.append(torch.autograd.grad([y.square().sum() for y in ys], wrt))
        for g0, g1 in zip(*grads):
            assert torch.equal(g0, g1)


# -- training machinery: checkpointing, torch.compile -------------------------------------------------

def test_gradient_checkpointing_recomputes_the_same_mask():
    from torch.utils.checkpoint import checkpoint

    gen = torch.Generator().manual_seed(8)
    x, W, b, A, B = make((3, 5, 16), 16, 4, torch.float32, "cpu", False, gen)
    A2, B2 = A.clone(), B.clone()

    def block(x, A, B, A2, B2):  # two adapted linears, fresh seeds drawn inside
        h = lora_linear(x, W, None, A, B, 2.0, 0.3, True)
        return lora_linear(torch.tanh(h), W, None, A2, B2, 2.0, 0.3, True)

    grads = []
    for use_ckpt in (False, True):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, A, B, A2, B2)]
        torch.manual_seed(123)
        y = checkpoint(block, *leaves, use_reentrant=False) if use_ckpt else block(*leaves)
        y.square().sum().backward()
        grads.append([t.grad for t in leaves])
    for g0, g1 in zip(*grads):
        assert torch.allclose(g0, g1, rtol=1e-5, atol=1e-6)


def test_torch_compile_runs_and_matches():
    gen = torch.Generator().manual_seed(9)
    x, W, b, A, B = make((2, 4, 16), 8, 4, torch.float32, "cpu", True, gen)
    seed = torch.tensor([3, 4])
    fn = torch.compile(lambda x, A, B: lora_linear(x, W, b, A, B, 2.0, 0.2, True, seed=seed), backend="aot_eager")
    A.requires_grad_(True)
    y = fn(x, A, B)
    ref = lora_linear(x, W, b, A, B, 2.0, 0.2, True, seed=seed)
    assert torch.allclose(y, ref, atol=1e-5)
    (gA,) = torch.autograd.grad(y.sum(), A)
    (rA,) = torch.autograd.grad(ref.sum(), A)
    assert torch.allclose(gA, rA, atol=1e-4)
    # one graph, no breaks (CPU path; a fresh seed is drawn inside the graph)
    explain = torch._dynamo.explain(lambda x, A: lora_linear(x, W, b, A, B, 2.0, 0.2, True))(x, A)
    assert explain.graph_break_count == 0, explain.break_reasons


# -- Triton kernels ---------------------------------------------------------------------------------

TRITON_SCRIPT = textwrap.dedent("""
    import itertools
    import torch
    from lorakit.kernels import (_triton, keep_mask, lora_linear, lora_linear_group, lora_linear_routed,
                                 new_seed, reference_lora_linear, reference_lora_linear_routed, rms_norm_apply)
    from lorakit.kernels.dropout import apply_dropout
    dev = DEVICE
    torch.manual_seed(0)

    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm()).item()

    cases = [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)] + ([(torch.float16, 4e-3)] if dev == "cuda" else [])
    for dtype, tol in cases:
        seed = new_seed(dev)
        for rows, cols in [(5, 7), (37, 130), (3, 1)]:
            assert torch.equal(_triton.keep_mask(seed, rows, cols, 0.3, torch.device(dev)),
                               keep_mask(seed, rows, cols, 0.3, dev)), (rows, cols)
            xx = torch.randn(rows, cols, device=dev, dtype=dtype)
            got, want = _triton.dropout_apply(xx, seed, 0.3), apply_dropout(xx, seed, 0.3)
            assert torch.equal(got != 0, want != 0), (rows, cols)  # the same mask
            assert torch.allclose(got.float(), want.float(), rtol=2 ** -7, atol=0), (rows, cols)  # one rounding
        big = [((4100, 192), 16, 0.1)] if dev == "cuda" else []  # large enough for the autotuned launchers
        for shape, r, p in [((70, 150), 1, 0.2), ((2, 33, 64), 40, 0.1), ((3, 40), 16, 0.0)] + big:
            x = torch.randn(*shape, device=dev, dtype=dtype, requires_grad=True)
            W = (torch.randn(48, shape[-1], device=dev) / 8).to(dtype)
            A = (torch.randn(r, shape[-1], device=dev) / 8).to(dtype).requires_grad_(True)
            B = torch.randn(48, r, device=dev, dtype=dtype, requires_grad=True)
            seed = new_seed(dev)
            keep = keep_mask(seed, x.numel() // shape[-1], shape[-1], p, dev).view(shape)
            L = [t.detach().double().requires_grad_(True) for t in (x, A, B)]
            ref = reference_lora_linear(L[0], W.double(), None, L[1], L[2], 1.5, p, True, keep)
            gy = torch.randn_like(ref, dtype=dtype)
            want = torch.autograd.grad(ref, L, gy.double())
            # backend="triton": the general Function; "auto": the one-adapter Function (LoraLinearSingle)
            for backend in ("triton", "auto"):
                y = lora_linear(x, W, None, A, B, 1.5, p, True, seed=seed, backend=backend)
                assert rel(y, ref) < tol, (backend, dtype, shape, r, p, rel(y, ref))
                for g, w in zip(torch.autograd.grad(y, [x, A, B], gy), want):
                    assert rel(g, w) < tol, (backend, dtype, shape, r, p, rel(g, w))
            # float32 adapters on a lower-precision x (they train in float32): cast inside the Function,
            # gradients in float32
            if dtype != torch.float32:
                A32, B32 = A.detach().float().requires_grad_(True), B.detach().float().requires_grad_(True)
                y = lora_linear(x, W, None, A32, B32, 1.5, p, True, seed=seed)
                assert y.dtype == dtype and rel(y, ref) < tol, (dtype, shape, r, p, rel(y, ref))
                for g, w in zip(torch.autograd.grad(y, [x, A32, B32], gy), want):
                    assert rel(g, w) < tol, (dtype, shape, r, p, rel(g, w))
        # dropout backward that writes gx (gx_init) equals the accumulating one minus gx's old contents
        x = torch.randn(300, 96, device=dev, dtype=dtype)
        g = torch.randn(300, 8, device=dev, dtype=dtype)
        A = (torch.randn(8, 96, device=dev) / 8).to(dtype)
        gx0 = torch.randn(300, 96, device=dev, dtype=dtype)
        seed = new_seed(dev)
        acc = gx0.clone()
        dA1 = _triton.dropout_backward(x, g, A, acc, seed, 0.1)
        init = torch.full_like(gx0, float("nan"))
        dA2 = _triton.dropout_backward(x, g, A, init, seed, 0.1, gx_init=True)
        assert torch.equal(dA1, dA2)
        assert rel(init + gx0, acc) < tol, rel(init + gx0, acc)
        # both products of g in one pass: gxa = s * g @ B (into a column slice) and dB = s * g.T @ xa
        for M, N, R in [(70, 300, 5), (130, 40, 16), (9, 600, 24)]:
            g = torch.randn(M, N, device=dev, dtype=dtype)
            Bm = torch.randn(N, R, device=dev, dtype=dtype)
            xa_wide = torch.randn(M, R + 3, device=dev, dtype=dtype)
            out = torch.full((M, R + 7), float("nan"), device=dev, dtype=dtype)
            dB = _triton.lora_grads(g, Bm, xa_wide[:, 3:], 0.5, out[:, 2:2 + R])
            assert rel(out[:, 2:2 + R], 0.5 * g.double() @ Bm.double()) < tol, (M, N, R)
            assert rel(dB, 0.5 * g.double().t() @ xa_wide[:, 3:].double()) < tol, (M, N, R)
            assert out[:, :2].isnan().all() and out[:, 2 + R:].isnan().all()  # nothing outside the slice
            # the same term as columns 3.. of the group's wider xa and columns 2.. of its wider gxa
            out2 = torch.full((M, R + 7), float("nan"), device=dev, dtype=dtype)
            dB2 = _triton.lora_grads(g, Bm, xa_wide, 0.5, out2, col=3)
            wide = torch.full((M, R + 5), float("nan"), device=dev, dtype=dtype)
            dB3 = _triton.lora_grads(g, Bm, xa_wide[:, 1:], 0.5, wide, col=2)
            assert torch.equal(dB2, dB) and torch.equal(dB3, dB), (M, N, R)
            assert torch.equal(out2[:, 3:3 + R], out[:, 2:2 + R]) and torch.equal(wide[:, 2:2 + R], out[:, 2:2 + R])
            assert out2[:, :3].isnan().all() and out2[:, 3 + R:].isnan().all()
        # a group's terms in one launch: linears of different widths, term j from column col + j * R
        # (rank 1 and a one-column linear: sizes Triton may pass as constants)
        for M, Ns, R, col in [(70, (300, 40), 8, 0), (130, (64, 600, 24), 16, 2), (9, (512,), 24, 1),
                              (33, (1, 48, 16), 1, 0)]:
            gs = [torch.randn(M, n, device=dev, dtype=dtype) for n in Ns]
            Bms = [torch.randn(n, R, device=dev, dtype=dtype) for n in Ns]
            xa_g = torch.randn(M, col + R * len(Ns) + 2, device=dev, dtype=dtype)
            out = torch.full((M, col + R * len(Ns) + 3), float("nan"), device=dev, dtype=dtype)
            scales = [0.5, -1.5, 2.0][:len(Ns)]
            dBs = _triton.lora_grads_group(gs, Bms, xa_g, scales, out, col=col)
            for j, (gj, Bj, sj) in enumerate(zip(gs, Bms, scales)):
                cols = slice(col + j * R, col + (j + 1) * R)
                assert rel(out[:, cols], sj * gj.double() @ Bj.double()) < tol, (M, Ns, j)
                assert dBs[j].shape == Bj.shape
                assert rel(dBs[j], sj * gj.double().t() @ xa_g[:, cols].double()) < tol, (M, Ns, j)
            assert out[:, :col].isnan().all() and out[:, col + R * len(Ns):].isnan().all()
            # float32 gradients for float32 adapters: the float32 sums, not rounded to x's dtype first
            dB32 = _triton.lora_grads_group(gs, Bms, xa_g, scales, out, col=col, db_dtype=torch.float32)
            for j, (gj, Bj, sj) in enumerate(zip(gs, Bms, scales)):
                want = sj * gj.double().t() @ xa_g[:, col + j * R:col + (j + 1) * R].double()
                assert dB32[j].dtype == torch.float32 and rel(dB32[j], want) <= rel(dBs[j], want) + 1e-6, (M, Ns, j)
        # the fused RMSNorm apply (recomputation in backward) is bit-identical to PyTorch's three ops
        for shape in [(4, 130), (2, 3, 64), (1, 2048)]:
            h32 = torch.randn(*shape, device=dev) * 3
            rstd = torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + 1e-6)
            w = (torch.randn(shape[-1], device=dev) * 2).to(dtype)
            got, want = _triton.norm_apply(h32, rstd, w), w * (h32 * rstd).to(dtype)
            if dev == "cpu" and dtype == torch.bfloat16:  # the interpreter truncates float32 -> bfloat16
                assert ((got.float() - want.float()).abs() <= want.float().abs() * 2 ** -6).all(), shape  # two roundings
            else:
                assert torch.equal(got, want), (dtype, shape)
        # x rebuilt inside the dropout-backward kernel (RMSNorm output, product; with and without dropout)
        # instead of kept: the same gradients as with x kept (the interpreter rounds to bfloat16 differently)
        exact = dev == "cuda" or dtype == torch.float32
        h32 = torch.randn(3, 11, 96, device=dev) * 2
        rstd = torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + 1e-6)
        nw = (torch.randn(96, device=dev) + 1).to(dtype)
        f1, f2 = torch.randn(3, 11, 96, device=dev).to(dtype), torch.randn(3, 11, 96, device=dev).to(dtype)
        W2 = [(torch.randn(o, 96, device=dev) / 8).to(dtype) for o in (40, 24)]
        A2 = [(torch.randn(8, 96, device=dev) / 8).to(dtype).requires_grad_(True) for _ in range(2)]
        B2 = [torch.randn(o, 8, device=dev, dtype=dtype, requires_grad=True) for o in (40, 24)]
        seed = new_seed(dev)
        for (fn, parts), p, group in itertools.product(((rms_norm_apply, (h32, rstd, nw)), (torch.mul, (f1, f2))),
                                                       (0.2, 0.0), (False, True)):
            outs = []
            for rc in (False, True):
                x = fn(*parts).requires_grad_(True)
                recipe = (fn, parts) if rc else None
                if group:
                    ys = lora_linear_group(x, W2, [None, None], A2, B2, [2.0, 0.5], p, True, seed=seed,
                                           recompute=recipe)
                else:
                    ys = (lora_linear(x, W2[0], None, A2[0], B2[0], 2.0, p, True, seed=seed, recompute=recipe),)
                wrt = [x, *A2, *B2] if group else [x, A2[0], B2[0]]
                outs.append(torch.autograd.grad([y.float().square().sum() for y in ys], wrt))
            for g0, g1 in zip(*outs):  # without dropout, x kept takes cuBLAS: the same up to summation order
                assert torch.equal(g0, g1) if exact and p > 0 else rel(g1, g0) < tol, (fn, p, group, dtype, rel(g1, g0))
        # a q/k/v group through the fused kernels
        x = torch.randn(2, 9, 64, device=dev, dtype=dtype, requires_grad=True)
        Ws = [(torch.randn(o, 64, device=dev) / 8).to(dtype) for o in (64, 16, 16)]
        As = [(torch.randn(8, 64, device=dev) / 8).to(dtype).requires_grad_(True) for _ in range(3)]
        Bs = [torch.randn(o, 8, device=dev, dtype=dtype, requires_grad=True) for o in (64, 16, 16)]
        seed = new_seed(dev)
        keep = keep_mask(seed, 18, 64, 0.2, dev).view(x.shape)
        x64 = x.detach().double().requires_grad_(True)
        A64 = [a.detach().double().requires_grad_(True) for a in As]
        B64 = [b.detach().double().requires_grad_(True) for b in Bs]
        refs = [reference_lora_linear(x64, W.double(), None, a, b, s, 0.2, True, keep)
                for W, a, b, s in zip(Ws, A64, B64, [2.0, 1.0, 0.5])]
        gys = [torch.randn_like(r, dtype=dtype) for r in refs]
        want = torch.autograd.grad(refs, [x64, *A64, *B64], [g.double() for g in gys])
        # "triton": the general Function; "auto": the group Function (LoraLinearShared)
        for backend in ("triton", "auto"):
            ys = lora_linear_group(x, Ws, [None] * 3, As, Bs, [2.0, 1.0, 0.5], 0.2, True, seed=seed, backend=backend)
            got = torch.autograd.grad(ys, [x, *As, *Bs], gys)
            assert all(rel(y, r) < tol for y, r in zip(ys, refs)), backend
            assert all(rel(g, w) < tol for g, w in zip(got, want)), (backend, [rel(g, w) for g, w in zip(got, want)])
        if dtype != torch.float32:  # float32 adapters: cast inside the group Function, float32 gradients
            A32 = [a.detach().float().requires_grad_(True) for a in As]
            B32 = [b.detach().float().requires_grad_(True) for b in Bs]
            ys = lora_linear_group(x, Ws, [None] * 3, A32, B32, [2.0, 1.0, 0.5], 0.2, True, seed=seed)
            got = torch.autograd.grad(ys, [x, *A32, *B32], gys)
            assert all(y.dtype == dtype and rel(y, r) < tol for y, r in zip(ys, refs))
            assert all(rel(g, w) < tol for g, w in zip(got, want)), [rel(g, w) for g, w in zip(got, want)]
        # the forward GEMM with the LoRA product in its K loop: 1-3 linears of one x, ranks 8 and 16 (B narrower
        # than the tile: its missing columns come in as zeros), outputs and rows not multiples of the tiles
        if dtype == torch.float32:
            x = torch.randn(64, 32, device=dev)
            assert not _triton.expand_gemm_ok(x, [x], [None], x[:, :16], [x[:, :16]])  # half precisions only
        else:
            cfg = None if dev == "cuda" else dict(BM=32, BN=32, BK=32, num_warps=4, num_stages=2)
            # (ranks below the tile width: term j's xa starts at column j * r, not at j * tile)
            for M, outs, r, bias in [(100, [64, 32, 32], 16, (False,) * 3), (300, [48], 8, (True,)),
                                     (77, [40, 24], 16, (True, False)), (90, [32, 16], 8, (False,) * 2),
                                     (70, [16, 32, 24], 24, (True,) * 3)]:
                x = torch.randn(M, 96, device=dev, dtype=dtype)
                Ws = [(torch.randn(o, 96, device=dev) / 10).to(dtype) for o in outs]
                bs = [torch.randn(o, device=dev, dtype=dtype) if b else None for o, b in zip(outs, bias)]
                Bs = [torch.randn(o, r, device=dev, dtype=dtype) for o in outs]
                xa = torch.randn(M, r * len(outs), device=dev, dtype=dtype)
                scales = [2.0, 0.7, 1.5][:len(outs)]  # 0.7: the scaled xa is rounded once more than 2.0's
                assert _triton.expand_gemm_ok(x, Ws, bs, xa, Bs)
                ys = _triton.expand_gemm(x, Ws, bs, xa, Bs, scales, cfg)
                for j, y in enumerate(ys):
                    ref = x.double() @ Ws[j].double().t() + scales[j] * xa[:, j * r:(j + 1) * r].double() \
                        @ Bs[j].double().t() + (0 if bs[j] is None else bs[j].double())
                    # the path it replaces: the LoRA output written, the base GEMM adding onto it
                    two = torch.addmm(bs[j] if bs[j] is not None else torch.zeros((), device=dev, dtype=dtype),
                                      xa[:, j * r:(j + 1) * r], Bs[j].t(), alpha=scales[j]).addmm_(x, Ws[j].t())
                    assert y.shape == ref.shape and y.dtype == dtype
                    # no worse than it (the interpreter rounds to bfloat16 by truncation: only the bound there)
                    close = dev == "cpu" and dtype == torch.bfloat16 or rel(y, ref) <= 1.5 * rel(two, ref)
                    assert rel(y, ref) < tol and close, (dtype, M, outs, j, rel(y, ref), rel(two, ref))
            # ranks that differ, a rank the copy engine cannot read (rows of 4 bfloat16 = 8 bytes), a strided W
            x = torch.randn(64, 96, device=dev, dtype=dtype)
            W = torch.randn(32, 96, device=dev, dtype=dtype)
            B8, B16 = torch.randn(32, 8, device=dev, dtype=dtype), torch.randn(32, 16, device=dev, dtype=dtype)
            assert not _triton.expand_gemm_ok(x, [W, W], [None, None], x[:, :24], [B8, B16])
            assert not _triton.expand_gemm_ok(x, [W], [None], x[:, :4].contiguous(), [B8[:, :4].contiguous()])
            assert not _triton.expand_gemm_ok(x, [W.t().contiguous().t()[:, :96]], [None], x[:, :8].contiguous(), [B8])
            # the training Functions take it from 1024 rows on, with and without dropout, alone and in groups
            calls = []
            expand = _triton.expand_gemm
            _triton.expand_gemm = lambda *a, **k: calls.append(1) or expand(*a, **k)
            x = torch.randn(1030, 64, device=dev, dtype=dtype, requires_grad=True)
            Ws = [(torch.randn(o, 64, device=dev) / 8).to(dtype) for o in (64, 16)]
            As = [(torch.randn(16, 64, device=dev) / 8).to(dtype).requires_grad_(True) for _ in range(2)]
            Bs = [torch.randn(o, 16, device=dev, dtype=dtype, requires_grad=True) for o in (64, 16)]
            for p in (0.1, 0.0):
                seed = new_seed(dev)
                keep = keep_mask(seed, 1030, 64, p, dev)
                L = [t.detach().double().requires_grad_(True) for t in (x, *As, *Bs)]
                refs = [reference_lora_linear(L[0], W.double(), None, a, b, s, p, True, keep)
                        for W, a, b, s in zip(Ws, L[1:3], L[3:], (2.0, 0.5))]
                gys = [torch.randn_like(r, dtype=dtype) for r in refs]
                want = torch.autograd.grad(refs, L, [g.double() for g in gys], retain_graph=True)
                n = len(calls)
                ys = lora_linear_group(x, Ws, [None, None], As, Bs, [2.0, 0.5], p, True, seed=seed)
                got = torch.autograd.grad(ys, [x, *As, *Bs], gys)
                assert calls[n:] == [1], p
                assert all(rel(y, r) < tol for y, r in zip(ys, refs)), (p, [rel(y, r) for y, r in zip(ys, refs)])
                assert all(rel(g, w) < tol for g, w in zip(got, want)), (p, [rel(g, w) for g, w in zip(got, want)])
                y = lora_linear(x, Ws[0], None, As[0], Bs[0], 2.0, p, True, seed=seed)
                got = torch.autograd.grad(y, [x, As[0], Bs[0]], gys[0])
                want1 = torch.autograd.grad(refs[0], [L[0], L[1], L[3]], gys[0].double())
                assert calls[n:] == [1, 1] and rel(y, refs[0]) < tol, (p, rel(y, refs[0]))
                assert all(rel(g, w) < tol for g, w in zip(got, want1)), (p, [rel(g, w) for g, w in zip(got, want1)])
                y = lora_linear(x[:1000], Ws[0], None, As[0], Bs[0], 2.0, p, True, seed=seed)
                torch.autograd.grad(y.sum(), [x])
                assert len(calls) == n + 2  # fewer rows: the LoRA output beside the base GEMM
            _triton.expand_gemm = expand
        # routed, mixed ranks, -1 rows, 2-D and 3-D x
        for shape in [(6, 80), (6, 20, 80)] + ([(6, 700, 80)] if dev == "cuda" else []):
            x = torch.randn(*shape, device=dev, dtype=dtype, requires_grad=True)
            W = (torch.randn(56, 80, device=dev) / 9).to(dtype)
            b = torch.randn(56, device=dev, dtype=dtype)
            As = [(torch.randn(r, 80, device=dev) / 9).to(dtype).requires_grad_(True) for r in (8, 1, 16)]
            Bs = [torch.randn(56, r, device=dev, dtype=dtype, requires_grad=True) for r in (8, 1, 16)]
            rows = torch.tensor([2, -1, 0, 2, 0, 0], device=dev)
            y = lora_linear_routed(x, W, b, As, Bs, [2.0, 0.5, 1.0], rows, backend="triton")
            L = [t.detach().double().requires_grad_(True) for t in (x, *As, *Bs)]
            ref = reference_lora_linear_routed(L[0], W.double(), b.double(), L[1:4], L[4:], [2.0, 0.5, 1.0], rows)
            assert rel(y, ref) < tol, (dtype, shape, rel(y, ref))
            gy = torch.randn_like(y)
            got = torch.autograd.grad(y, [x, *As, *Bs], gy)
            want = torch.autograd.grad(ref, L, gy.double(), allow_unused=True)  # adapter 1 is unused
            errs = [rel(g, w) for g, w in zip(got, want) if w is not None]
            assert all(e < tol for e in errs), (dtype, shape, errs)
            assert got[2].abs().sum() == 0  # adapter 1 is unused
            seed = new_seed(dev)  # with dropout: the seed's mask, in forward and backward
            y = lora_linear_routed(x, W, b, As, Bs, [2.0, 0.5, 1.0], rows, backend="triton", dropout=0.2,
                                   training=True, seed=seed)
            keep = keep_mask(seed, x.numel() // 80, 80, 0.2, dev).view(x.shape)
            L = [t.detach().double().requires_grad_(True) for t in (x, *As, *Bs)]
            ref = reference_lora_linear_routed(L[0], W.double(), b.double(), L[1:4], L[4:], [2.0, 0.5, 1.0], rows,
                                               0.2, keep)
            assert rel(y, ref) < tol, (dtype, shape, rel(y, ref))
            got = torch.autograd.grad(y, [x, *As, *Bs], gy)
            want = torch.autograd.grad(ref, L, gy.double(), allow_unused=True)
            errs = [rel(g, w) for g, w in zip(got, want) if w is not None]
            assert all(e < tol for e in errs), (dtype, shape, "dropout", errs)
        # routed inference with few tokens (decode): `_triton.routed_small` (half precision), else three launches
        calls = []
        routed_small = _triton.routed_small
        _triton.routed_small = lambda *a, **k: calls.append(1) or routed_small(*a, **k)
        for shape, transposed in [((6, 80), False), ((6, 3, 80), True), ((6, 20, 80), False)]:
            x = torch.randn(*shape, device=dev, dtype=dtype)
            W = (torch.randn(56, 80, device=dev) / 9).to(dtype)
            if transposed:
                W = W.t().contiguous().t()
            b = torch.randn(56, device=dev, dtype=dtype)
            As = [(torch.randn(r, 80, device=dev) / 9).to(dtype) for r in (8, 1, 16)]
            Bs = [torch.randn(56, r, device=dev, dtype=dtype) for r in (8, 1, 16)]
            rows = torch.tensor([2, -1, 0, 1, 0, 2], device=dev)
            n = len(calls)
            with torch.no_grad():
                y = lora_linear_routed(x, W, b, As, Bs, [2.0, 0.5, 1.0], rows, backend="triton")
            ref = reference_lora_linear_routed(x.double(), W.double(), b.double(), [a.double() for a in As],
                                               [b_.double() for b_ in Bs], [2.0, 0.5, 1.0], rows)
            assert rel(y, ref) < tol, (dtype, shape, rel(y, ref))
            small = dtype != torch.float32 and x.numel() // 80 <= _triton.SMALL_MAX_ROWS
            assert len(calls) - n == small, (dtype, shape)
        _triton.routed_small = routed_small
        # inference with few rows (decode): one fused kernel (`_triton.lora_small`); more rows: three ops
        calls = []
        small = _triton.lora_small
        _triton.lora_small = lambda *a, **k: calls.append(1) or small(*a, **k)
        for shape, bias, transposed in [((1, 1, 80), True, False), ((7, 80), False, True), ((2, 32, 80), True, True),
                                        ((65, 80), True, False), ((2, 0, 80), True, False)]:
            x = torch.randn(*shape, device=dev, dtype=dtype)
            W = (torch.randn(72, 80, device=dev) / 9).to(dtype)
            if transposed:  # GPT-2 Conv1D keeps (in, out): its (out, in) view is read in place
                W = W.t().contiguous().t()
            b = torch.randn(72, device=dev, dtype=dtype) if bias else None
            A = (torch.randn(16, 80, device=dev) / 9).to(dtype)
            B = torch.randn(72, 16, device=dev, dtype=dtype)
            n = len(calls)
            with torch.no_grad():
                y = lora_linear(x, W, b, A, B, 2.0)
            ref = reference_lora_linear(x.double(), W.double(), None if b is None else b.double(), A.double(),
                                        B.double(), 2.0)
            rows = x.shape[:-1].numel()
            assert len(calls) - n == (1 if rows <= 64 and (dtype != torch.float32 or rows == 1) else 0), shape
            assert y.shape == ref.shape and y.dtype == dtype and (y.numel() == 0 or rel(y, ref) < tol), (dtype, shape)
        _triton.lora_small = small
        # split over K: each program's share lands in a float32 workspace, the last one adds them in a fixed order
        # (one row: the multiply-add kernel; more: tensor-core dots)
        W = (torch.randn(72, 200, device=dev) / 14).to(dtype)
        b = torch.randn(72, device=dev, dtype=dtype)
        A = (torch.randn(16, 200, device=dev) / 14).to(dtype)
        B = torch.randn(72, 16, device=dev, dtype=dtype)
        for rows, gemv in [(1, True), (1, False), (3, True)]:
            x = torch.randn(rows, 200, device=dev, dtype=dtype)
            ref = reference_lora_linear(x.double(), W.double(), b.double(), A.double(), B.double(), 2.0)
            one = _triton.lora_small(x, W, b, A, B, 2.0, dict(SPLIT=1, BK=32, BN=16, GEMV=gemv))
            for split in (2, 4):
                cfg = dict(SPLIT=split, BK=32, BN=16, GEMV=gemv)
                got = [_triton.lora_small(x, W, b, A, B, 2.0, cfg, fresh) for fresh in (False, False, True)]
                got.append(_triton.lora_small(x, W, b, A, B, 2.0, cfg, compiled=True))
                assert all(torch.equal(got[0], g) for g in got[1:]), (rows, gemv, split)
                assert rel(got[0], ref) < tol and rel(got[0], one) < tol, (rows, gemv, split)
            if dtype != torch.float32:  # float32 adapters: rounded to x's dtype as read, the bits of casting first
                # (the interpreter truncates float32 to bfloat16 where a GPU rounds to nearest even: close there)
                same = torch.equal if dev == "cuda" or dtype == torch.float16 else lambda a, b: rel(a, b) < 1e-2
                A32, B32 = torch.randn(16, 200, device=dev) / 14, torch.randn(72, 16, device=dev)
                for cfg in (dict(SPLIT=1, BK=32, BN=16, GEMV=gemv), dict(SPLIT=2, BK=32, BN=16, GEMV=gemv), None):
                    got = _triton.lora_small(x, W, b, A32, B32, 2.0, cfg)
                    assert same(got, _triton.lora_small(x, W, b, A32.to(dtype), B32.to(dtype), 2.0, cfg)), cfg
                with torch.no_grad():
                    got = lora_linear(x, W, b, A32, B32, 2.0)
                assert same(got, _triton.lora_small(x, W, b, A32.to(dtype), B32.to(dtype), 2.0)), rows
                ref32 = reference_lora_linear(x.double(), W.double(), b.double(), A32.double(), B32.double(), 2.0)
                assert rel(got, ref32) < tol, (rows, rel(got, ref32))
        # q/k/v or gate/up in one launch (`lora_small_group`): with the tiles given, each y_j has the bits of its
        # own `lora_small`; with the tiles it picks, y_j matches float64
        for Ns, R, rows, bias, transposed, cfg in [
                ((72, 24, 24), 16, 1, True, False, None), ((40, 56), 8, 3, False, False, dict(SPLIT=3, BK=32, BN=16)),
                ((48, 48, 48), 1, 1, False, True, dict(SPLIT=2, BK=32, BN=16)), ((72, 24), 16, 2, True, True, None),
                ((1, 33, 16), 16, 5, True, False, dict(SPLIT=1, BK=32, BN=16)),
                ((72, 24), 16, 1, True, False, dict(SPLIT=4, BK=32, BN=16, GEMV=False))]:
            if dtype == torch.float32 and rows > 1:
                continue
            Ws = [(torch.randn(n, 200, device=dev) / 14).to(dtype) for n in Ns]
            if transposed:
                Ws = [W.t().contiguous().t() for W in Ws]
            bs = [torch.randn(n, device=dev, dtype=dtype) if bias else None for n in Ns]
            As = [(torch.randn(R, 200, device=dev) / 14).to(dtype) for _ in Ns]
            Bs = [torch.randn(n, R, device=dev, dtype=dtype) for n in Ns]
            scales = [2.0, 0.5, 1.0][:len(Ns)]
            x = torch.randn(rows, 200, device=dev, dtype=dtype)
            ok = _triton.small_group_ok(x, Ws, bs, As, Bs)
            assert ok == (not transposed or len(set(Ns)) == 1), (Ns, transposed)
            if not ok:
                continue
            ys = _triton.lora_small_group(x, Ws, bs, As, Bs, scales, cfg)
            again = _triton.lora_small_group(x, Ws, bs, As, Bs, scales, cfg)
            for j, (W, b_, A, B, s_) in enumerate(zip(Ws, bs, As, Bs, scales)):
                ref = reference_lora_linear(x.double(), W.double(), None if b_ is None else b_.double(), A.double(),
                                            B.double(), s_)
                assert ys[j].shape == ref.shape and ys[j].dtype == dtype and ys[j].is_contiguous(), (Ns, j)
                assert rel(ys[j], ref) < tol and torch.equal(ys[j], again[j]), (dtype, Ns, rows, j, rel(ys[j], ref))
                if cfg is not None:
                    assert torch.equal(ys[j], _triton.lora_small(x, W, b_, A, B, s_, cfg)), (dtype, Ns, rows, j)
        x = torch.randn(1, 200, device=dev, dtype=dtype)
        Ws = [torch.randn(n, 200, device=dev, dtype=dtype) for n in (64, 32)]
        As = [torch.randn(r, 200, device=dev, dtype=dtype) for r in (16, 8)]
        Bs = [torch.randn(n, r, device=dev, dtype=dtype) for n, r in ((64, 16), (32, 8))]
        assert not _triton.small_group_ok(x, Ws, [None, None], As, Bs)  # two ranks
        assert not _triton.small_group_ok(x, Ws, [None, torch.zeros(32, device=dev, dtype=dtype)], As[:1] * 2,
                                          [Bs[0], Bs[0][:32]])  # a bias on one only
        assert not _triton.small_group_ok(x, Ws[:1], [None], As[:1], Bs[:1])  # one linear: `lora_small`
    # under torch.compile the fused inference kernel is one opaque op of the graph (lorakit::lora_small)
    calls = []
    small = _triton.lora_small
    _triton.lora_small = lambda *a, **k: calls.append(1) or small(*a, **k)
    x = torch.randn(1, 1, 80, device=dev)  # float32 takes the fused kernel at one row only
    W, b, A = torch.randn(72, 80, device=dev) / 9, torch.randn(72, device=dev), torch.randn(16, 80, device=dev) / 9
    B = torch.randn(72, 16, device=dev)
    compiled = torch.compile(lambda x: lora_linear(x, W, b, A, B, 2.0), fullgraph=True)
    with torch.no_grad():
        y = compiled(x)
    _triton.lora_small = small
    ref = reference_lora_linear(x.double(), W.double(), b.double(), A.double(), B.double(), 2.0)
    assert calls and rel(y, ref) < 1e-4, (len(calls), rel(y, ref))
    if dev == "cuda":  # direct launches of compiled kernels give what Triton's own launch gives
        x = torch.randn(300, 96, device=dev, dtype=torch.bfloat16)
        A = (torch.randn(8, 96, device=dev) / 8).bfloat16()
        seed = new_seed(dev)
        _triton._DIRECT["on"] = False
        want = _triton.shrink(x, A, seed, 0.1)
        _triton._DIRECT["on"] = True
        got = [_triton.shrink(x, A, seed, 0.1) for _ in range(2)]
        assert _triton._COMPILED and all(torch.equal(g, want) for g in got)
        # and for a kernel that reads its tiles through copy-engine descriptors (Hopper)
        Ws = [(torch.randn(o, 96, device=dev) / 10).bfloat16() for o in (64, 32)]
        Bs = [torch.randn(o, 16, device=dev, dtype=torch.bfloat16) for o in (64, 32)]
        xa = torch.randn(300, 32, device=dev, dtype=torch.bfloat16)
        if _triton.expand_gemm_ok(x, Ws, [None, None], xa, Bs):
            _triton._DIRECT["on"] = False
            want = _triton.expand_gemm(x, Ws, [None, None], xa, Bs, [2.0, 0.5])
            _triton._DIRECT["on"] = True
            got = [_triton.expand_gemm(x, Ws, [None, None], xa, Bs, [2.0, 0.5]) for _ in range(2)]
            assert all(torch.equal(g[j], want[j]) for g in got for j in range(2))
            assert any(k[0] is _triton._expand_gemm_kernel for k in _triton._COMPILED)
    if dev == "cuda":  # lora_small (K split over programs, tile counters) replayed in a CUDA graph equals eager
        W = (torch.randn(2048, 1024, device=dev) / 32).bfloat16()
        A = (torch.randn(16, 1024, device=dev) / 32).bfloat16()
        B = torch.randn(2048, 16, device=dev, dtype=torch.bfloat16)
        b = torch.randn(2048, device=dev, dtype=torch.bfloat16)
        for rows in (1, 8):
            x = torch.randn(rows, 1024, device=dev, dtype=torch.bfloat16)
            assert _triton._small_config(rows, 2048, 1024, x.device)["SPLIT"] > 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                _triton.lora_small(x, W, b, A, B, 2.0)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                y = _triton.lora_small(x, W, b, A, B, 2.0)
            for _ in range(3):
                x.copy_(torch.randn_like(x))
                graph.replay()
                torch.cuda.synchronize()
                assert torch.equal(y, _triton.lora_small(x, W, b, A, B, 2.0)), rows
    if dev == "cuda":  # and under torch.compile's CUDA graphs ("reduce-overhead"), call after call
        W = (torch.randn(2048, 1024, device=dev) / 32).bfloat16()
        A = (torch.randn(16, 1024, device=dev) / 32).bfloat16()
        B = torch.randn(2048, 16, device=dev, dtype=torch.bfloat16)
        step = torch.compile(lambda x: lora_linear(x, W, None, A, B, 2.0), mode="reduce-overhead", fullgraph=True)
        for _ in range(4):
            x = torch.randn(1, 1, 1024, device=dev, dtype=torch.bfloat16)
            with torch.no_grad():
                got = step(x).clone()
            want = reference_lora_linear(x.double(), W.double(), None, A.double(), B.double(), 2.0)
            assert rel(got, want) < 1e-2, rel(got, want)
            with torch.no_grad():  # the kept counters (made by the eager calls above) give eager's bits
                assert torch.equal(got, lora_linear(x, W, None, A, B, 2.0))
        assert _triton.compiled_counters(x.device, 1) is not None
    if dev == "cuda":  # autotuned launch without gx (x needs no grad), x shared by two Functions
        x = torch.randn(4096, 320, device=dev, dtype=torch.bfloat16)
        W = torch.randn(64, 320, device=dev, dtype=torch.bfloat16) / 18
        As = [(torch.randn(16, 320, device=dev) / 18).bfloat16().requires_grad_(True) for _ in range(2)]
        Bs = [torch.randn(64, 16, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(2)]
        ys = [lora_linear(x, W, None, A, B, 2.0, 0.1, True) for A, B in zip(As, Bs)]
        torch.autograd.grad(ys, [*As, *Bs], [torch.randn_like(y) for y in ys])
    print("TRITON-OK")
""")


@pytest.mark.skipif(_triton.triton is None, reason="Triton is not installed")
def test_triton_kernels_under_interpreter():
    run_under_interpreter(TRITON_SCRIPT, "TRITON-OK")


@pytest.mark.skipif(not CUDA or _triton.triton is None, reason="needs a CUDA GPU and Triton")
def test_triton_kernels_on_gpu():
    exec(compile(TRITON_SCRIPT.replace("DEVICE", '"cuda"'), "triton_gpu_check", "exec"), {})
