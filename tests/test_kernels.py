"""The fast path computes the reference's function: outputs and gradients, every dtype and shape.

Each fused Function / kernel is compared with `lorakit.functional` evaluated in float64
on the same random inputs (and, with dropout, the same mask: the fast path's mask is a
function of an explicit seed, `LF.dropout_keep(seed, ...)`). CPU runs the autograd Functions with
the PyTorch backend; the Triton kernels run on CUDA, or on CPU under TRITON_INTERPRET=1 in a
subprocess (the interpreter is chosen when Triton compiles, so it needs a fresh process).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from lorakit import functional as LF
from lorakit.fast import triton as _triton
from lorakit.fast.triton import launch
from lorakit.fast.ops import lora_linear, lora_linear_group, lora_linear_multi
from lorakit.fast.routed import lora_linear_routed
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

@pytest.mark.skipif(launch._DESCRIPTOR is None, reason="this Triton has no host-side tensor descriptors")
def test_descriptors_built_without_checks_equal_from_tensor():
    # `expand_gemm` builds its copy-engine descriptors field by field (its own checks ran before):
    # every field must be what Triton's `from_tensor` would have set
    base = torch.zeros(40, 64, dtype=torch.bfloat16)
    for t, block in [(base, [16, 32]), (base[:, 16:48], [8, 16]), (base[8:], [32, 64])]:
        mine, theirs = launch._descriptor(t, block), launch._DESCRIPTOR.from_tensor(t, block)
        assert type(mine) is type(theirs) and vars(mine).keys() == vars(theirs).keys()
        for k, v in vars(theirs).items():
            assert getattr(mine, k) is v if k == "base" else getattr(mine, k) == v, k
        assert launch._specs((mine,)) == launch._specs((theirs,))


@pytest.mark.skipif(_triton.triton is None, reason="Triton is not installed")
def test_direct_launch_key_separates_what_triton_specializes_on():
    # `_launch` reuses a compiled kernel only for arguments with the same key: it must tell apart
    # everything Triton compiles differently for (dtype, 16-byte alignment, ints 0 / 1 / %16 / 64-bit).
    t = torch.zeros(64)
    key = launch._specs
    for a, b in [((t, 32, 2.0), (torch.ones(64), 48, 3.5)), ((2 ** 31,), (2 ** 35 + 48,))]:
        assert key(a) == key(b)
    for a, b in [(t, t.half()), (t, t[1:]), (1, 2), (0, 16), (16, 17), (2 ** 31, 32), (True, 1)]:
        assert key((a,)) != key((b,)), (a, b)
    desc = launch._DESCRIPTOR
    if desc is not None:  # copy-engine descriptors: compiled for their dtype and tile, not for their sizes
        m = torch.zeros(64, 32)
        assert key((desc.from_tensor(m, [16, 16]),)) == key((desc.from_tensor(torch.zeros(128, 48), [16, 16]),))
        for other in (desc.from_tensor(m, [16, 32]), desc.from_tensor(m.half(), [16, 16])):
            assert key((desc.from_tensor(m, [16, 16]),)) != key((other,))


def test_mask_is_a_function_of_the_seed_with_the_right_rate():
    seed = torch.tensor([12345, 678], dtype=torch.int64)
    m1 = LF.dropout_keep(seed, 256, 513, 0.1)
    assert m1.shape == (256, 513) and m1.dtype == torch.bool
    assert torch.equal(m1, LF.dropout_keep(seed.clone(), 256, 513, 0.1))
    assert abs(m1.float().mean().item() - 0.9) < 0.005
    other = LF.dropout_keep(torch.tensor([12346, 678]), 256, 513, 0.1)
    assert (m1 != other).float().mean() > 0.1  # another seed: another mask (independent: 2 * 0.9 * 0.1)
    assert LF.dropout_keep(seed, 4, 4, 0.0).all()
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
            seed = LF.dropout_seed(device)
            y = lora_linear(x, W, b, A, B, 1.7, p, training=True, seed=seed)
            leaves = [t.detach().double().requires_grad_(True) for t in (x, A, B)]
            b64 = b.detach().double().requires_grad_(True) if b is not None else None
            ref = LF.lora_linear(leaves[0], W.double(), b64, leaves[1], leaves[2], 1.7, p, seed)
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
    assert torch.allclose(y0, LF.lora_linear(x, W, b, A.detach(), B, 2.0), atol=1e-5)


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
    from lorakit.fast.ops import _merge_pays

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
            assert rel_err(y, LF.lora_linear(*(t.double() if t is not None else None
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
    from lorakit.fast.ops import _merge_pays_training

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
            rys = [LF.lora_linear(xr, W.double(), b.double(), Ar, Br, 0.5),
                   LF.lora_linear(xr, W2.double(), None, A2r, B2r, 2.0)][:len(ys)]
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
        seeds = [LF.dropout_seed(device), LF.dropout_seed(device)]  # one per adapter with dropout
        leaves = [t.requires_grad_(True) for t in [x, *As, *Bs]]
        y = lora_linear_multi(x, W, b, As, Bs, scales, ps, True, seeds=seeds)
        ref_leaves = [t.detach().double().requires_grad_(True) for t in leaves]
        ref = LF.lora_linear_multi(ref_leaves[0], W.double(), b.double(), ref_leaves[1:4], ref_leaves[4:],
                                          scales, ps, [seeds[0], None, seeds[1]])
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
        seed = LF.dropout_seed(device)
        ys = lora_linear_group(x, Ws, bs, As, Bs, [2.0, 1.0, 0.5], 0.1, True, seed=seed)
        x64 = x.detach().double().requires_grad_(True)
        A64 = [a.detach().double().requires_grad_(True) for a in As]
        B64 = [t.detach().double().requires_grad_(True) for t in Bs]
        refs = [LF.lora_linear(x64, W.double(), None if bb is None else bb.double(), a, bm, s, 0.1, seed)
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
        ref = LF.lora_linear_routed(ref_leaves[0], W.double(), b.double(), ref_leaves[1:4], ref_leaves[4:],
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
    seed = LF.dropout_seed("cpu")
    y = lora_linear_routed(x, W, b, As, Bs, [2.0, 0.5, 1.0], rows, dropout=0.3, training=True, seed=seed)
    keep = LF.dropout_keep(seed, x.numel() // 40, 40, 0.3).view(x.shape)
    assert 0 < int(keep.sum()) < keep.numel()
    ref_leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    ref = LF.lora_linear_routed(ref_leaves[0], W, b, ref_leaves[1:4], ref_leaves[4:], [2.0, 0.5, 1.0], rows,
                                       0.3, seed)
    torch.testing.assert_close(y, ref)
    gy = torch.randn(y.shape, generator=gen, dtype=y.dtype)
    for g, w in zip(torch.autograd.grad(y, leaves, gy), torch.autograd.grad(ref, ref_leaves, gy)):
        torch.testing.assert_close(g, w)
    without = LF.lora_linear_routed(x.detach(), W, b, [a.detach() for a in As], [b_.detach() for b_ in Bs],
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
            x = s * u  # s and u are kept by the mul anyway
            recipe = (torch.mul, (s, u)) if rc else None
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

def test_triton_kernels_under_interpreter():
    """tests/test_triton.py on CPU: the interpreter is chosen when Triton compiles, so in a fresh process."""
    if _triton.triton is None:
        pytest.skip("Triton is not installed")
    run_under_interpreter("tests/test_triton.py")
