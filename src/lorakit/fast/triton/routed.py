"""Routed (per-example adapter) kernels in the style of Punica's SGMV: every program handles a block
of tokens of one batch row, looks the row's adapter up, and multiplies by that adapter's stacked
matrix. No host sync, no sorting, any mix of ranks (ranks are zero-padded to the largest one in the
stacks). Few tokens (decode) take `routed_small`: a shrink split over K, then the base GEMM with the
expand in one kernel."""

from __future__ import annotations

import torch
from torch import Tensor

from . import decode
from .decode import _counters, _k_chunks
from .launch import (_cdiv, _launch, _pow2, _prec, _sm_count, _tune, _tuned, available_for, interpreting,
                     tl, triton)


if triton is not None:
    from .decode import _small_finish, _x_and_w_tiles
    from .launch import _cfgs, _dot

    @triton.jit
    def _routed_mm_kernel(in_ptr, mat_ptr, out_ptr, rows_ptr, scale_ptr, T, K, NOUT,
                          stride_in, stride_out, stride_ma, stride_mk, stride_mj,
                          ACCUM: tl.constexpr, SCALED: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
                          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        # For batch row b with adapter a = rows[b] >= 0 and its tokens n = b*T .. b*T+T-1:
        #   out[n, :] (+)= scale[a] * in[n, :] @ M_a,  M_a[k, j] = mat[a*stride_ma + k*stride_mk + j*stride_mj]
        b = tl.program_id(0)
        a = tl.load(rows_ptr + b)
        if a >= 0:
            rt = tl.program_id(1) * BM + tl.arange(0, BM)
            rn = tl.program_id(2) * BN + tl.arange(0, BN)
            t_ok = rt < T
            n_ok = rn < NOUT
            tok = (b * T + rt).to(tl.int64)
            mat = mat_ptr + a * stride_ma
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for k_start in range(0, K, BK):
                rk = k_start + tl.arange(0, BK)
                k_ok = rk < K
                xt = tl.load(in_ptr + tok[:, None] * stride_in + rk[None, :], mask=t_ok[:, None] & k_ok[None, :],
                             other=0.0)
                mt = tl.load(mat + rk[:, None] * stride_mk + rn[None, :] * stride_mj,
                             mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                acc = _dot(xt, mt, acc, PREC, UPCAST)
            if SCALED:
                acc = acc * tl.load(scale_ptr + a).to(tl.float32)
            out_ptrs = out_ptr + tok[:, None] * stride_out + rn[None, :]
            io_ok = t_ok[:, None] & n_ok[None, :]
            if ACCUM:
                acc += tl.load(out_ptrs, mask=io_ok, other=0.0).to(tl.float32)
            tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=io_ok)

    @triton.jit
    def _routed_outer_kernel(u_ptr, v_ptr, out_ptr, rows_ptr, T, U, V, stride_u, stride_v,
                             PREC: tl.constexpr, UPCAST: tl.constexpr,
                             BU: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr):
        # out[b] (U, V) float32 = u[b].T @ v[b] over the T tokens of batch row b (0 where rows[b] < 0).
        b = tl.program_id(0)
        a = tl.load(rows_ptr + b)
        ru = tl.program_id(1) * BU + tl.arange(0, BU)
        rv = tl.program_id(2) * BV + tl.arange(0, BV)
        u_ok = ru < U
        v_ok = rv < V
        acc = tl.zeros((BU, BV), dtype=tl.float32)
        if a >= 0:
            for t_start in range(0, T, BT):
                rt = t_start + tl.arange(0, BT)
                t_ok = rt < T
                tok = (b * T + rt).to(tl.int64)
                ut = tl.load(u_ptr + tok[:, None] * stride_u + ru[None, :], mask=t_ok[:, None] & u_ok[None, :],
                             other=0.0)
                vt = tl.load(v_ptr + tok[:, None] * stride_v + rv[None, :], mask=t_ok[:, None] & v_ok[None, :],
                             other=0.0)
                acc = _dot(tl.trans(ut), vt, acc, PREC, UPCAST)
        tl.store(out_ptr + b.to(tl.int64) * U * V + ru[:, None] * V + rv[None, :], acc,
                 mask=u_ok[:, None] & v_ok[None, :])


    @triton.jit
    def _routed_shrink_small_kernel(x_ptr, a_ptr, rows_ptr, xa_ptr, M, K, R, T, KC, stride_xm, stride_aa, stride_ar,
                                    BR: tl.constexpr, BK: tl.constexpr):
        # xa[s, m, :R] = x[m, s*KC : s*KC+KC] @ A_a[:, the same columns].T in float32, a = rows[m // T]; zero
        # for base-only rows (a < 0). Program (m, s): one token, one split of K; the K splits are what
        # give a decode batch enough programs (one per token would stream a whole A each, serially).
        m = tl.program_id(0)
        s = tl.program_id(1)
        a = tl.load(rows_ptr + m // T)
        rr = tl.arange(0, BR)
        r_ok = rr < R
        acc = tl.zeros((BR, BK), dtype=tl.float32)
        if a >= 0:
            k_hi = tl.minimum(s * KC + KC, K)
            for k_start in range(s * KC, k_hi, BK):
                rk = k_start + tl.arange(0, BK)
                k_ok = rk < k_hi
                xk = tl.load(x_ptr + m * stride_xm + rk, mask=k_ok, other=0.0).to(tl.float32)
                at = tl.load(a_ptr + a.to(tl.int64) * stride_aa + rr[:, None] * stride_ar + rk[None, :],
                             mask=r_ok[:, None] & k_ok[None, :], other=0.0)
                acc += at.to(tl.float32) * xk[None, :]
        tl.store(xa_ptr + (s * M + m) * BR + rr, tl.sum(acc, axis=1))

    @triton.jit
    def _routed_small_kernel(x_ptr, w_ptr, bias_ptr, b_ptr, scale_ptr, rows_ptr, xa_ptr, out_ptr, ws_ptr, cnt_ptr,
                             M, N, K, R, T, KC, XSPLIT, stride_xm, stride_wn, stride_wk, stride_ba, stride_bn,
                             stride_om, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, PREC: tl.constexpr,
                             UPCAST: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                             BR: tl.constexpr, BRS: tl.constexpr, XSP: tl.constexpr):
        # y (M, N) = x @ W.T + bias + scales[a] * xa @ B_a.T per token (a = rows[m // T], none if a < 0), xa
        # the XSPLIT (<= XSP) float32 partial sums of `_routed_shrink_small_kernel`. The base product streams W
        # as in `_lora_small_kernel`. The LoRA terms are linear in xa's columns, so the programs of a tile
        # share them out: K split s adds those of rank columns s*BRS .. s*BRS+BRS, each row's slice of B
        # gathered by its adapter as one (BM, BN, BRS) tile (multiply-adds, no tensor cores), before the
        # splits are summed. No loop: the partial sums and B come in one load each.
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        pid_m = tl.program_id(2)
        rn = pid_n * BN + tl.arange(0, BN)
        rm = pid_m * BM + tl.arange(0, BM)
        n_ok = rn < N
        m_ok = rm < M
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        k_hi = tl.minimum(pid_s * KC + KC, K)
        for k_start in range(pid_s * KC, k_hi, BK):
            rk = k_start + tl.arange(0, BK)
            k_ok = rk < k_hi
            xt, wt = _x_and_w_tiles(x_ptr, w_ptr, rm, rn, rk, m_ok, n_ok, k_ok, stride_xm, stride_wn, stride_wk)
            acc = _dot(xt, wt, acc, PREC, UPCAST)
        if pid_s * BRS < R:
            a = tl.load(rows_ptr + rm // T, mask=m_ok, other=-1)
            use = m_ok & (a >= 0)
            a = tl.where(use, a, 0).to(tl.int64)
            rr = pid_s * BRS + tl.arange(0, BRS)
            r_ok = rr < R
            q = tl.arange(0, XSP)
            xa = tl.load(xa_ptr + (q[None, :, None] * M + rm[:, None, None]) * BR + rr[None, None, :],
                         mask=use[:, None, None] & (q < XSPLIT)[None, :, None] & r_ok[None, None, :], other=0.0)
            xa = tl.sum(xa, axis=1) * tl.load(scale_ptr + a, mask=use, other=0.0)[:, None]
            bt = tl.load(b_ptr + a[:, None, None] * stride_ba + rn[None, :, None].to(tl.int64) * stride_bn
                         + rr[None, None, :], mask=use[:, None, None] & n_ok[None, :, None] & r_ok[None, None, :],
                         other=0.0)
            acc += tl.sum(bt.to(tl.float32) * xa[:, None, :], axis=2)
        _small_finish(acc, rm, rn, m_ok, n_ok, out_ptr, bias_ptr, ws_ptr, cnt_ptr, M, N, stride_om,
                      pid_n, pid_s, pid_m, SPLIT, HAS_BIAS, BM, BN)

    _routed_mm_tuned = triton.autotune(
        configs=_cfgs([(64, 128, 64, 4, 2), (64, 64, 64, 4, 3), (32, 128, 64, 4, 2), (128, 128, 32, 8, 2),
                       (64, 128, 32, 4, 3), (128, 64, 64, 8, 3)], ("BM", "BN", "BK")),
        key=["K", "NOUT", "ACCUM"], restore_value=["out_ptr"])(_routed_mm_kernel)


def routed_small_ok(x2: Tensor, A_stack: Tensor, B_stack: Tensor, bias: Tensor | None) -> bool:
    """Whether `routed_small` serves this inference call: at most SMALL_MAX_ROWS tokens of float16 / bfloat16
    (tensor-core dots), contiguous stacks, a rank (padded to a power of two) times the row block of at most
    1,024 (the B tile each program gathers), and not under torch.compile."""
    M = x2.shape[0]
    return 0 < M <= decode.SMALL_MAX_ROWS and x2.dtype in (torch.float16, torch.bfloat16) and x2.stride(-1) == 1 \
        and A_stack.is_contiguous() and B_stack.is_contiguous() and (bias is None or bias.stride(0) == 1) \
        and _pow2(M) * _pow2(A_stack.shape[1]) <= 1024 and available_for(x2) and not torch.compiler.is_compiling()


def routed_small(x2: Tensor, weight: Tensor, bias: Tensor | None, A_stack: Tensor, B_stack: Tensor, scales: Tensor,
                 rows: Tensor, cfg: dict | None = None) -> Tensor:
    """Per-token adapters for few tokens (decode of a batch that mixes adapters), as a new (M, N) tensor:

        y[m] = x2[m] @ weight.T + bias + scales[a] * (x2[m] @ A_stack[a].T) @ B_stack[a].T,  a = rows[m // T]

    (no LoRA term where a < 0), T = M // len(rows) tokens per batch row. Two launches: the shrink, split
    over K so that a few tokens still fill the GPU, then the base product with each row's expand added
    in its epilogue. See `routed_small_ok` for what it serves; `cfg` overrides tile sizes (benchmarks).
    """
    M, K = x2.shape
    N = weight.shape[0]
    R = A_stack.shape[1]
    T = M // rows.shape[0]
    BR = _pow2(R)
    c = dict(_routed_small_config(M, N, K, x2.device), **(cfg or {}))
    KCX = _cdiv(_cdiv(K, c["XSPLIT"]), c["XBK"]) * c["XBK"]
    xsplit = _cdiv(K, KCX)
    xa = torch.empty(xsplit, M, BR, dtype=torch.float32, device=x2.device)
    _launch(_routed_shrink_small_kernel, (M, xsplit),
            (x2, A_stack, rows, xa, M, K, R, T, KCX, x2.stride(0), A_stack.stride(0), A_stack.stride(1)),
            dict(BR=BR, BK=c["XBK"], num_warps=c["xwarps"], num_stages=2))
    BM = _pow2(M)
    BK = min(c["BK"], _pow2(K))
    KC, split = _k_chunks(K, BK, c["SPLIT"])
    grid = (_cdiv(N, c["BN"]), split, 1)
    out = torch.empty(M, N, dtype=x2.dtype, device=x2.device)
    ws = torch.empty(split, M, N, dtype=torch.float32, device=x2.device) if split > 1 else out
    cnt = _counters(x2.device, grid[0]) if split > 1 else out
    _launch(_routed_small_kernel, grid,
            (x2, weight, x2 if bias is None else bias, B_stack, scales, rows, xa, out, ws, cnt, M, N, K, R, T, KC,
             xsplit, x2.stride(0), weight.stride(0), weight.stride(1), B_stack.stride(0), B_stack.stride(1),
             out.stride(0)),
            dict(SPLIT=split, HAS_BIAS=bias is not None, PREC=_prec(x2.dtype), UPCAST=interpreting(), BM=BM,
                 BN=c["BN"], BK=BK, BR=BR, BRS=_pow2(_cdiv(BR, split), 1), XSP=_pow2(xsplit, 1),
                 num_warps=c["num_warps"], num_stages=c["num_stages"]))
    return out


_ROUTED_SMALL_CFGS: dict = {}


def _routed_small_config(M: int, N: int, K: int, device: torch.device) -> dict:
    """Tile sizes for `routed_small`, as the H100 sweep of benchmarks/bench_decode.py (`--part routed`) found
    fastest for the Llama linears: the shrink in up to 16 K splits of 128 columns (8 for a token or a few),
    the main kernel in 32-column blocks (each program gathers a (rows, 32, rank) tile of B) and about two
    programs per SM."""
    key = (M > 4, N, K, device)
    c = _ROUTED_SMALL_CFGS.get(key)
    if c is None:
        BN, BK = 32, 128
        split = max(1, min(2 * _sm_count(device) // _cdiv(N, BN), K // (2 * BK)))
        c = _ROUTED_SMALL_CFGS[key] = {"BN": BN, "BK": BK, "SPLIT": split, "num_warps": 4, "num_stages": 3,
                                       "XBK": 128, "XSPLIT": 16 if M > 4 else 8, "xwarps": 4}
    return c


def routed_mm(inp: Tensor, mats: Tensor, mat_strides: tuple[int, int, int], nout: int, rows: Tensor,
              scales: Tensor | None, out: Tensor, accumulate: bool) -> Tensor:
    """out[b*T + t] (+)= scales[rows[b]] * inp[b*T + t] @ M_{rows[b]} for rows[b] >= 0; other rows untouched.

    scales None: no scaling.

    inp (B*T, K) and out (B*T, nout) are row-major; M_a[k, j] = mats[a*s0 + k*s1 + j*s2] with
    (s0, s1, s2) = mat_strides.
    """
    N, K = inp.shape
    batch = rows.shape[0]
    T = N // batch
    args = (inp, mats, out, rows, scales if scales is not None else inp, T, K, nout, inp.stride(0), out.stride(0),
            *mat_strides)
    BN = min(128, _pow2(nout))
    BK = min(64, _pow2(K))
    BM = 16 if T < 64 else (32 if nout <= 64 else 64)

    def fixed():
        _launch(_routed_mm_kernel, (batch, _cdiv(T, BM), _cdiv(nout, BN)), args,
                dict(ACCUM=accumulate, SCALED=scales is not None, PREC=_prec(inp.dtype), UPCAST=interpreting(),
                     BM=BM, BN=BN, BK=BK, num_warps=4, num_stages=2))

    if _tune(N, inp) and T >= 64 and nout >= 64:
        _tuned(_routed_mm_tuned, _routed_mm_kernel, (K, nout, accumulate, scales is not None, inp.dtype, inp.device),
               lambda meta: (batch, _cdiv(T, meta["BM"]), _cdiv(nout, meta["BN"])), args,
               dict(ACCUM=accumulate, SCALED=scales is not None, PREC=_prec(inp.dtype), UPCAST=False), fixed)
    else:
        fixed()
    return out


def routed_outer(u: Tensor, v: Tensor, rows: Tensor) -> Tensor:
    """(batch, U, V) float32: u[b].T @ v[b] over the tokens of batch row b; zero where rows[b] < 0."""
    N, U = u.shape
    V = v.shape[1]
    batch = rows.shape[0]
    T = N // batch
    BU = min(64, _pow2(U))
    BV = min(64, _pow2(V))
    BT = 64 if T >= 64 else 16
    out = torch.empty(batch, U, V, dtype=torch.float32, device=u.device)
    grid = (batch, _cdiv(U, BU), _cdiv(V, BV))
    _launch(_routed_outer_kernel, grid, (u, v, out, rows, T, U, V, u.stride(0), v.stride(0)),
            dict(PREC=_prec(u.dtype), UPCAST=interpreting(), BU=BU, BV=BV, BT=BT, num_warps=4, num_stages=2))
    return out
