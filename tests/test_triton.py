"""The Triton kernels compute `lorakit.functional`'s function: each kernel and each fused Function on its
Triton path, against float64 references (dropout with the same seed's mask).

They run on CUDA, or on CPU under the Triton interpreter, which Triton picks when it first compiles a kernel:
TRITON_INTERPRET=1 must be set before Triton is imported. tests/test_kernels.py runs this module in a
fresh pytest process with it set; a plain run on a machine without a GPU skips it.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from lorakit import functional as LF
from lorakit.fast import triton as _triton
from lorakit.fast.triton import decode as tdecode
from lorakit.fast.triton import launch
from lorakit.fast.triton import train as ttrain
from lorakit.fast.ops import lora_linear, lora_linear_group, rms_norm_apply
from lorakit.fast.routed import lora_linear_routed

CUDA = torch.cuda.is_available() and not _triton.interpreting()
dev = "cuda" if CUDA else "cpu"
pytestmark = pytest.mark.skipif(_triton.triton is None or not (CUDA or _triton.interpreting()),
                                reason="needs Triton and a CUDA GPU, or TRITON_INTERPRET=1")
CASES = [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)] + ([(torch.float16, 4e-3)] if CUDA else [])
only_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()



@pytest.mark.parametrize("dtype, tol", CASES, ids=[str(d).removeprefix("torch.") for d, _ in CASES])
def test_dropout_mask_and_lora_linear(dtype, tol):
    seed = LF.dropout_seed(dev)
    for rows, cols in [(5, 7), (37, 130), (3, 1)]:
        assert torch.equal(_triton.keep_mask(seed, rows, cols, 0.3, torch.device(dev)),
                           LF.dropout_keep(seed, rows, cols, 0.3, dev)), (rows, cols)
        xx = torch.randn(rows, cols, device=dev, dtype=dtype)
        got, want = _triton.dropout_apply(xx, seed, 0.3), LF.seeded_dropout(xx, seed, 0.3)
        assert torch.equal(got != 0, want != 0), (rows, cols)  # the same mask
        assert torch.allclose(got.float(), want.float(), rtol=2 ** -7, atol=0), (rows, cols)  # one rounding
    big = [((4100, 192), 16, 0.1)] if dev == "cuda" else []  # large enough for the autotuned launchers
    for shape, r, p in [((70, 150), 1, 0.2), ((2, 33, 64), 40, 0.1), ((3, 40), 16, 0.0)] + big:
        x = torch.randn(*shape, device=dev, dtype=dtype, requires_grad=True)
        W = (torch.randn(48, shape[-1], device=dev) / 8).to(dtype)
        A = (torch.randn(r, shape[-1], device=dev) / 8).to(dtype).requires_grad_(True)
        B = torch.randn(48, r, device=dev, dtype=dtype, requires_grad=True)
        seed = LF.dropout_seed(dev)
        L = [t.detach().double().requires_grad_(True) for t in (x, A, B)]
        ref = LF.lora_linear(L[0], W.double(), None, L[1], L[2], 1.5, p, seed)
        gy = torch.randn_like(ref, dtype=dtype)
        want = torch.autograd.grad(ref, L, gy.double())
        # backend="triton": the general Function; "auto": the lean Function (LoraLinearGroup)
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


@pytest.mark.parametrize("dtype, tol", CASES, ids=[str(d).removeprefix("torch.") for d, _ in CASES])
def test_dropout_backward_that_writes_gx(dtype, tol):
    # dropout backward that writes gx (gx_init) equals the accumulating one minus gx's old contents
    x = torch.randn(300, 96, device=dev, dtype=dtype)
    g = torch.randn(300, 8, device=dev, dtype=dtype)
    A = (torch.randn(8, 96, device=dev) / 8).to(dtype)
    gx0 = torch.randn(300, 96, device=dev, dtype=dtype)
    seed = LF.dropout_seed(dev)
    acc = gx0.clone()
    dA1 = _triton.dropout_backward(x, g, A, acc, seed, 0.1)
    init = torch.full_like(gx0, float("nan"))
    dA2 = _triton.dropout_backward(x, g, A, init, seed, 0.1, gx_init=True)
    assert torch.equal(dA1, dA2)
    assert rel(init + gx0, acc) < tol, rel(init + gx0, acc)


@pytest.mark.parametrize("dtype, tol", CASES, ids=[str(d).removeprefix("torch.") for d, _ in CASES])
def test_both_products_of_g_in_one_pass(dtype, tol):
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


@pytest.mark.parametrize("dtype, tol", CASES, ids=[str(d).removeprefix("torch.") for d, _ in CASES])
def test_a_groups_terms_in_one_launch(dtype, tol):
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


@pytest.mark.parametrize("dtype, tol", CASES, ids=[str(d).removeprefix("torch.") for d, _ in CASES])
def test_rms_norm_apply_is_bit_identical(dtype, tol):
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


@pytest.mark.parametrize("dtype, tol", CASES, ids=[str(d).removeprefix("torch.") for d, _ in CASES])
def test_input_rebuilt_inside_the_backward_kernel(dtype, tol):
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
    seed = LF.dropout_seed(dev)
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


@pytest.mark.parametrize("dtype, tol", CASES, ids=[str(d).removeprefix("torch.") for d, _ in CASES])
def test_qkv_group_through_the_fused_kernels(dtype, tol):
    # a q/k/v group through the fused kernels
    x = torch.randn(2, 9, 64, device=dev, dtype=dtype, requires_grad=True)
    Ws = [(torch.randn(o, 64, device=dev) / 8).to(dtype) for o in (64, 16, 16)]
    As = [(torch.randn(8, 64, device=dev) / 8).to(dtype).requires_grad_(True) for _ in range(3)]
    Bs = [torch.randn(o, 8, device=dev, dtype=dtype, requires_grad=True) for o in (64, 16, 16)]
    seed = LF.dropout_seed(dev)
    x64 = x.detach().double().requires_grad_(True)
    A64 = [a.detach().double().requires_grad_(True) for a in As]
    B64 = [b.detach().double().requires_grad_(True) for b in Bs]
    refs = [LF.lora_linear(x64, W.double(), None, a, b, s, 0.2, seed)
            for W, a, b, s in zip(Ws, A64, B64, [2.0, 1.0, 0.5])]
    gys = [torch.randn_like(r, dtype=dtype) for r in refs]
    want = torch.autograd.grad(refs, [x64, *A64, *B64], [g.double() for g in gys])
    # "triton": the general Function; "auto": the lean Function (LoraLinearGroup)
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


@pytest.mark.parametrize("dtype, tol", CASES, ids=[str(d).removeprefix("torch.") for d, _ in CASES])
def test_forward_gemm_with_the_lora_product_in_its_k_loop(dtype, tol, monkeypatch):
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
        monkeypatch.setattr(_triton, "expand_gemm", lambda *a, **k: calls.append(1) or expand(*a, **k))
        x = torch.randn(1030, 64, device=dev, dtype=dtype, requires_grad=True)
        Ws = [(torch.randn(o, 64, device=dev) / 8).to(dtype) for o in (64, 16)]
        As = [(torch.randn(16, 64, device=dev) / 8).to(dtype).requires_grad_(True) for _ in range(2)]
        Bs = [torch.randn(o, 16, device=dev, dtype=dtype, requires_grad=True) for o in (64, 16)]
        for p in (0.1, 0.0):
            seed = LF.dropout_seed(dev)
            L = [t.detach().double().requires_grad_(True) for t in (x, *As, *Bs)]
            refs = [LF.lora_linear(L[0], W.double(), None, a, b, s, p, seed)
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
        monkeypatch.undo()


@pytest.mark.parametrize("dtype, tol", CASES, ids=[str(d).removeprefix("torch.") for d, _ in CASES])
def test_routed_mixed_ranks(dtype, tol):
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
        ref = LF.lora_linear_routed(L[0], W.double(), b.double(), L[1:4], L[4:], [2.0, 0.5, 1.0], rows)
        assert rel(y, ref) < tol, (dtype, shape, rel(y, ref))
        gy = torch.randn_like(y)
        got = torch.autograd.grad(y, [x, *As, *Bs], gy)
        want = torch.autograd.grad(ref, L, gy.double(), allow_unused=True)  # adapter 1 is unused
        errs = [rel(g, w) for g, w in zip(got, want) if w is not None]
        assert all(e < tol for e in errs), (dtype, shape, errs)
        assert got[2].abs().sum() == 0  # adapter 1 is unused
        seed = LF.dropout_seed(dev)  # with dropout: the seed's mask, in forward and backward
        y = lora_linear_routed(x, W, b, As, Bs, [2.0, 0.5, 1.0], rows, backend="triton", dropout=0.2,
                               training=True, seed=seed)
        L = [t.detach().double().requires_grad_(True) for t in (x, *As, *Bs)]
        ref = LF.lora_linear_routed(L[0], W.double(), b.double(), L[1:4], L[4:], [2.0, 0.5, 1.0], rows,
                                           0.2, seed)
        assert rel(y, ref) < tol, (dtype, shape, rel(y, ref))
        got = torch.autograd.grad(y, [x, *As, *Bs], gy)
        want = torch.autograd.grad(ref, L, gy.double(), allow_unused=True)
        errs = [rel(g, w) for g, w in zip(got, want) if w is not None]
        assert all(e < tol for e in errs), (dtype, shape, "dropout", errs)


@pytest.mark.parametrize("dtype, tol", CASES, ids=[str(d).removeprefix("torch.") for d, _ in CASES])
def test_routed_inference_with_few_tokens(dtype, tol, monkeypatch):
    # routed inference with few tokens (decode): `_triton.routed_small` (half precision), else three launches
    calls = []
    routed_small = _triton.routed_small
    monkeypatch.setattr(_triton, "routed_small", lambda *a, **k: calls.append(1) or routed_small(*a, **k))
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
        ref = LF.lora_linear_routed(x.double(), W.double(), b.double(), [a.double() for a in As],
                                           [b_.double() for b_ in Bs], [2.0, 0.5, 1.0], rows)
        assert rel(y, ref) < tol, (dtype, shape, rel(y, ref))
        small = dtype != torch.float32 and x.numel() // 80 <= _triton.decode.SMALL_MAX_ROWS
        assert len(calls) - n == small, (dtype, shape)
    monkeypatch.undo()


@pytest.mark.parametrize("dtype, tol", CASES, ids=[str(d).removeprefix("torch.") for d, _ in CASES])
def test_inference_with_few_rows(dtype, tol, monkeypatch):
    # inference with few rows (decode): one fused kernel (`_triton.lora_small`); more rows: three ops
    calls = []
    small = _triton.lora_small
    monkeypatch.setattr(_triton, "lora_small", lambda *a, **k: calls.append(1) or small(*a, **k))
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
        ref = LF.lora_linear(x.double(), W.double(), None if b is None else b.double(), A.double(),
                                    B.double(), 2.0)
        rows = x.shape[:-1].numel()
        assert len(calls) - n == (1 if rows <= 64 and (dtype != torch.float32 or rows == 1) else 0), shape
        assert y.shape == ref.shape and y.dtype == dtype and (y.numel() == 0 or rel(y, ref) < tol), (dtype, shape)
    monkeypatch.undo()


@pytest.mark.parametrize("dtype, tol", CASES, ids=[str(d).removeprefix("torch.") for d, _ in CASES])
def test_split_over_k(dtype, tol):
    # split over K: each program's share lands in a float32 workspace, the last one adds them in a fixed order
    # (one row: the multiply-add kernel; more: tensor-core dots)
    W = (torch.randn(72, 200, device=dev) / 14).to(dtype)
    b = torch.randn(72, device=dev, dtype=dtype)
    A = (torch.randn(16, 200, device=dev) / 14).to(dtype)
    B = torch.randn(72, 16, device=dev, dtype=dtype)
    for rows, gemv in [(1, True), (1, False), (3, True)]:
        x = torch.randn(rows, 200, device=dev, dtype=dtype)
        ref = LF.lora_linear(x.double(), W.double(), b.double(), A.double(), B.double(), 2.0)
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
            ref32 = LF.lora_linear(x.double(), W.double(), b.double(), A32.double(), B32.double(), 2.0)
            assert rel(got, ref32) < tol, (rows, rel(got, ref32))


def test_fused_inference_kernel_under_torch_compile(monkeypatch):
    # under torch.compile the fused inference kernel is one opaque op of the graph (lorakit::lora_small)
    calls = []
    small = _triton.lora_small
    monkeypatch.setattr(_triton, "lora_small", lambda *a, **k: calls.append(1) or small(*a, **k))
    x = torch.randn(1, 1, 80, device=dev)  # float32 takes the fused kernel at one row only
    W, b, A = torch.randn(72, 80, device=dev) / 9, torch.randn(72, device=dev), torch.randn(16, 80, device=dev) / 9
    B = torch.randn(72, 16, device=dev)
    compiled = torch.compile(lambda x: lora_linear(x, W, b, A, B, 2.0), fullgraph=True)
    with torch.no_grad():
        y = compiled(x)
    monkeypatch.undo()
    ref = LF.lora_linear(x.double(), W.double(), b.double(), A.double(), B.double(), 2.0)
    assert calls and rel(y, ref) < 1e-4, (len(calls), rel(y, ref))


@only_cuda
def test_direct_launches_equal_tritons_own():
    # direct launches of compiled kernels give what Triton's own launch gives
    x = torch.randn(300, 96, device=dev, dtype=torch.bfloat16)
    A = (torch.randn(8, 96, device=dev) / 8).bfloat16()
    seed = LF.dropout_seed(dev)
    launch._DIRECT["on"] = False
    want = _triton.shrink(x, A, seed, 0.1)
    launch._DIRECT["on"] = True
    got = [_triton.shrink(x, A, seed, 0.1) for _ in range(2)]
    assert launch._COMPILED and all(torch.equal(g, want) for g in got)
    # and for a kernel that reads its tiles through copy-engine descriptors (Hopper)
    Ws = [(torch.randn(o, 96, device=dev) / 10).bfloat16() for o in (64, 32)]
    Bs = [torch.randn(o, 16, device=dev, dtype=torch.bfloat16) for o in (64, 32)]
    xa = torch.randn(300, 32, device=dev, dtype=torch.bfloat16)
    if _triton.expand_gemm_ok(x, Ws, [None, None], xa, Bs):
        launch._DIRECT["on"] = False
        want = _triton.expand_gemm(x, Ws, [None, None], xa, Bs, [2.0, 0.5])
        launch._DIRECT["on"] = True
        got = [_triton.expand_gemm(x, Ws, [None, None], xa, Bs, [2.0, 0.5]) for _ in range(2)]
        assert all(torch.equal(g[j], want[j]) for g in got for j in range(2))
        assert any(k[0] is ttrain._expand_gemm_kernel for k in launch._COMPILED)


@only_cuda
def test_lora_small_replayed_in_a_cuda_graph():
    # lora_small (K split over programs, tile counters) replayed in a CUDA graph equals eager
    W = (torch.randn(2048, 1024, device=dev) / 32).bfloat16()
    A = (torch.randn(16, 1024, device=dev) / 32).bfloat16()
    B = torch.randn(2048, 16, device=dev, dtype=torch.bfloat16)
    b = torch.randn(2048, device=dev, dtype=torch.bfloat16)
    for rows in (1, 8):
        x = torch.randn(rows, 1024, device=dev, dtype=torch.bfloat16)
        assert tdecode._small_config(rows, 2048, 1024, x.device)["SPLIT"] > 1
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


@only_cuda
def test_lora_small_under_reduce_overhead():
    # and under torch.compile's CUDA graphs ("reduce-overhead"), call after call
    W = (torch.randn(2048, 1024, device=dev) / 32).bfloat16()
    A = (torch.randn(16, 1024, device=dev) / 32).bfloat16()
    B = torch.randn(2048, 16, device=dev, dtype=torch.bfloat16)
    step = torch.compile(lambda x: lora_linear(x, W, None, A, B, 2.0), mode="reduce-overhead", fullgraph=True)
    for _ in range(4):
        x = torch.randn(1, 1, 1024, device=dev, dtype=torch.bfloat16)
        with torch.no_grad():
            got = step(x).clone()
        want = LF.lora_linear(x.double(), W.double(), None, A.double(), B.double(), 2.0)
        assert rel(got, want) < 1e-2, rel(got, want)
        with torch.no_grad():  # the kept counters (made by the eager calls above) give eager's bits
            assert torch.equal(got, lora_linear(x, W, None, A, B, 2.0))
    assert _triton.compiled_counters(x.device, 1) is not None


@only_cuda
def test_autotuned_launch_without_gx():
    # autotuned launch without gx (x needs no grad), x shared by two Functions
    x = torch.randn(4096, 320, device=dev, dtype=torch.bfloat16)
    W = torch.randn(64, 320, device=dev, dtype=torch.bfloat16) / 18
    As = [(torch.randn(16, 320, device=dev) / 18).bfloat16().requires_grad_(True) for _ in range(2)]
    Bs = [torch.randn(64, 16, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(2)]
    ys = [lora_linear(x, W, None, A, B, 2.0, 0.1, True) for A, B in zip(As, Bs)]
    torch.autograd.grad(ys, [*As, *Bs], [torch.randn_like(y) for y in ys])


def test_explain_names_the_backend_and_set_fast_path_can_turn_triton_off():
    import lorakit as lk

    model = torch.nn.Sequential(torch.nn.Linear(64, 48)).to(dev)
    lk.inject(model, lk.LoraConfig(r=8, alpha=16, targets="all-linear"))
    with torch.no_grad():
        model[0].adapters["default"].lora_B.normal_()
    x = torch.randn(4, 64, device=dev)
    want = LF.lora_linear(x.double(), model[0].weight.double(), model[0].bias.double(),
                          model[0].adapters["default"].lora_A.double(), model[0].adapters["default"].lora_B.double(),
                          2.0)
    try:
        lk.set_fast_path("on")
        assert lk.explain(model[0], x).endswith("[triton]")
        lk.set_fast_path("on", triton=False)
        assert lk.explain(model[0], x).endswith("[torch]")
        assert rel(model(x), want) < 1e-4
    finally:
        lk.set_fast_path("auto", triton=True)


@pytest.mark.parametrize("dtype, tol", CASES[:2], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_quantized_base_function_on_its_triton_path(dtype, tol, p):
    bnb = pytest.importorskip("bitsandbytes")
    from lorakit.quant import _QuantLoraFunction, _triton_for, dequantize

    K, N, R, scale = 96, 80, 8, 2.0
    base = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=dtype, quant_type="nf4")
    base.weight = bnb.nn.Params4bit(torch.randn(N, K, dtype=dtype) * 0.1, requires_grad=False, quant_type="nf4")
    base = base.to(dev)
    x = torch.randn(3, 7, K, device=dev, dtype=dtype, requires_grad=True)
    A = (torch.randn(R, K, device=dev) * 0.1).requires_grad_(True)
    B = (torch.randn(N, R, device=dev) * 0.1).requires_grad_(True)
    assert _triton_for(x.detach().reshape(-1, K)) is not None
    seed = LF.dropout_seed(dev) if p else None
    y = _QuantLoraFunction.apply(x, A, B, None, base, scale, p, seed, dtype)
    w64 = dequantize(base).double()
    x64, A64, B64 = (t.detach().double().requires_grad_(True) for t in (x, A, B))
    want = x64 @ w64.t() + scale * (LF.seeded_dropout(x64, seed, p) @ A64.t()) @ B64.t()
    assert rel(y, want) < tol
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, A, B), g)
    ref = torch.autograd.grad(want, (x64, A64, B64), g.double())
    for a, b in zip(got, ref):
        assert rel(a, b) < tol


@pytest.mark.parametrize("dtype, tol", CASES, ids=[str(d).removeprefix("torch.") for d, _ in CASES])
def test_several_adapters_on_one_linear_through_the_kernels(dtype, tol):
    from lorakit.fast.ops import lora_linear_multi

    # each adapter with dropout is a group of its own; those without share one group of 1, 2 or 4 terms
    # (the one-read gradient kernel takes up to 3 terms of rank <= 16, a loop more)
    for ranks, ps in [([8, 1, 16], [0.2, 0.0, 0.4]), ([4, 4, 2], [0.0, 0.0, 0.1]), ([8, 8, 8, 8], [0.0] * 4)]:
        x = torch.randn(3, 5, 32, device=dev, dtype=dtype)
        W = (torch.randn(24, 32, device=dev) / 6).to(dtype)
        b = torch.randn(24, device=dev, dtype=dtype)
        As = [(torch.randn(r, 32, device=dev) / 6).to(dtype) for r in ranks]
        Bs = [torch.randn(24, r, device=dev, dtype=dtype) for r in ranks]
        scales = [2.0, 0.5, 1.0, -1.0][:len(ranks)]
        seeds = [LF.dropout_seed(dev) for p in ps if p > 0]
        leaves = [t.requires_grad_(True) for t in [x, *As, *Bs]]
        y = lora_linear_multi(x, W, b, As, Bs, scales, ps, True, seeds=seeds)
        it = iter(seeds)
        per_term = [next(it) if p > 0 else None for p in ps]
        ref_leaves = [t.detach().double().requires_grad_(True) for t in leaves]
        n = len(ranks)
        ref = LF.lora_linear_multi(ref_leaves[0], W.double(), b.double(), ref_leaves[1:1 + n], ref_leaves[1 + n:],
                                   scales, ps, per_term)
        assert rel(y, ref) < tol, (ranks, ps)
        gy = torch.randn_like(y)
        for g, w in zip(torch.autograd.grad(y, leaves, gy), torch.autograd.grad(ref, ref_leaves, gy.double())):
            assert rel(g, w) < tol, (ranks, ps)
