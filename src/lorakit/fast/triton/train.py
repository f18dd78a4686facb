"""Training kernels: the dropout-fused LoRA input kernels, so that dropout(x) is never written to memory:

    shrink:   xa = dropout(x) @ A.T                            (reads x once)
    backward: dA = gxa.T @ dropout(x);  gx += dropout'(gxa @ A)  (reads x once, gx in place)

the LoRA weight gradients, the forward GEMM with the LoRA product in its K loop (`expand_gemm`), and
the normalization apply step rebuilt for fused LoRA inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .dropout import _dropout_args
from .launch import (_DESCRIPTOR, _INTERPRET, _cdiv, _descriptor, _launch, _pow2, _prec, _sm_count, _tune,
                     _tuned, _zero_seed, interpreting, tl, triton)


if triton is not None:
    from .dropout import _keep_tile
    from .launch import _cfgs, _dot

    @triton.jit
    def _shrink_kernel(x_ptr, a_ptr, out_ptr, seed_ptr, M, K, R, stride_xm, stride_am, stride_om,
                       half, thresh, inv_keep,
                       DROPOUT: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
                       BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr):
        # out (M, R) = dropout(x) (M, K) @ A.T, A (R, K); one program per BM rows.
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        rr = tl.arange(0, BR)
        m_ok = rm < M
        r_ok = rr < R
        if DROPOUT:
            k0 = tl.load(seed_ptr).to(tl.uint32)
            mul = tl.load(seed_ptr + 1).to(tl.uint32) | 1
            half_u = k0 * 0 + half  # uint32, also when Triton passes `half` as a constant
            thresh_u = k0 * 0 + thresh
        acc = tl.zeros((BM, BR), dtype=tl.float32)
        for k_start in range(0, K, BK):
            rk = k_start + tl.arange(0, BK)
            k_ok = rk < K
            xt = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_xm + rk[None, :],
                         mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            if DROPOUT:
                keep = _keep_tile(rm, k_start, half_u, k0, mul, thresh_u, BK)
                xt = tl.where(keep, xt, tl.zeros_like(xt))
            at = tl.load(a_ptr + rr[None, :] * stride_am + rk[:, None],
                         mask=r_ok[None, :] & k_ok[:, None], other=0.0)
            acc = _dot(xt, at, acc, PREC, UPCAST)
        acc = acc * inv_keep
        tl.store(out_ptr + rm[:, None].to(tl.int64) * stride_om + rr[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & r_ok[None, :])

    @triton.jit
    def _load_x(x_ptr, u_ptr, v_ptr, rm, rm64, rk, m_ok, k_ok, stride_xm, stride_um, DT: tl.constexpr,
                XSRC: tl.constexpr):
        # The (BM, BK) tile of x: read (XSRC 0), or rebuilt from an RMSNorm's (1) or a product's (2) inputs.
        io_ok = m_ok[:, None] & k_ok[None, :]
        t = tl.load(x_ptr + rm64 * stride_xm + rk[None, :], mask=io_ok, other=0.0)
        if XSRC == 1:
            r = tl.load(u_ptr + rm, mask=m_ok, other=0.0)
            w = tl.load(v_ptr + rk, mask=k_ok, other=0.0)
            xn = (t * r[:, None]).to(DT, fp_downcast_rounding="rtne")
            t = (w[None, :].to(tl.float32) * xn.to(tl.float32)).to(DT, fp_downcast_rounding="rtne")
        elif XSRC == 2:
            u = tl.load(u_ptr + rm64 * stride_um + rk[None, :], mask=io_ok, other=0.0)
            t = (t.to(tl.float32) * u.to(tl.float32)).to(DT, fp_downcast_rounding="rtne")
        return t

    @triton.jit
    def _dropout_bwd_kernel(x_ptr, g_ptr, a_ptr, gx_ptr, ga_ptr, seed_ptr, u_ptr, v_ptr, M, K, R, SPLITS,
                            stride_xm, stride_gm, stride_am, stride_gxm, stride_um, half, thresh, inv_keep,
                            HAS_GX: tl.constexpr, GX_INIT: tl.constexpr, XSRC: tl.constexpr, PREC: tl.constexpr,
                            UPCAST: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr):
        # For one column block of K and one slice of rows:
        #   ga_part[slice] (R, BK) = g.T @ dropout(x)          g = d loss / d xa, (M, R)
        #   gx (M, BK) += where(keep, g @ A, 0) / (1 - p)        in place, if HAS_GX
        #   (GX_INIT: gx = ... instead of +=, gx is written without being read)
        # x itself is read (XSRC 0) or rebuilt in registers from what made it, rounded as PyTorch rounds:
        #   XSRC 1, an RMSNorm output:  x = v * (x_ptr * u[row]).to(dt)   (x_ptr: float32 input, u: 1/rms, v: weight)
        #   XSRC 2, a product:          x = x_ptr * u_ptr                  (both of x's dtype and shape)
        pid_k = tl.program_id(0)
        pid_s = tl.program_id(1)
        k_start = pid_k * BK
        rk = k_start + tl.arange(0, BK)
        rr = tl.arange(0, BR)
        k_ok = rk < K
        r_ok = rr < R
        k0 = tl.load(seed_ptr).to(tl.uint32)
        mul = tl.load(seed_ptr + 1).to(tl.uint32) | 1
        half_u = k0 * 0 + half  # uint32, also when Triton passes `half` as a constant
        thresh_u = k0 * 0 + thresh
        if HAS_GX:
            a = tl.load(a_ptr + rr[:, None] * stride_am + rk[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        ga = tl.zeros((BR, BK), dtype=tl.float32)
        rows_per_prog = tl.cdiv(tl.cdiv(M, SPLITS), BM) * BM
        m_lo = pid_s * rows_per_prog
        m_hi = tl.minimum(m_lo + rows_per_prog, M)
        for m_start in range(m_lo, m_hi, BM):
            rm = m_start + tl.arange(0, BM)
            m_ok = rm < m_hi
            rm64 = rm[:, None].to(tl.int64)
            keep = _keep_tile(rm, k_start, half_u, k0, mul, thresh_u, BK)
            xt = _load_x(x_ptr, u_ptr, v_ptr, rm, rm64, rk, m_ok, k_ok, stride_xm, stride_um,
                         a_ptr.dtype.element_ty, XSRC)
            xt = tl.where(keep, xt, tl.zeros_like(xt))
            gt = tl.load(g_ptr + rm64 * stride_gm + rr[None, :], mask=m_ok[:, None] & r_ok[None, :], other=0.0)
            ga = _dot(tl.trans(gt), xt, ga, PREC, UPCAST)
            if HAS_GX:
                t = _dot(gt, a, tl.zeros((BM, BK), dtype=tl.float32), PREC, UPCAST)
                gx_ptrs = gx_ptr + rm64 * stride_gxm + rk[None, :]
                io_ok = m_ok[:, None] & k_ok[None, :]
                gxt = tl.where(keep, t * inv_keep, 0.0)
                if not GX_INIT:
                    gxt += tl.load(gx_ptrs, mask=io_ok, other=0.0).to(tl.float32)
                tl.store(gx_ptrs, gxt.to(gx_ptr.dtype.element_ty), mask=io_ok)
        ga = ga * inv_keep
        tl.store(ga_ptr + pid_s * R * K + rr[:, None] * K + rk[None, :], ga, mask=r_ok[:, None] & k_ok[None, :])

    @triton.jit
    def _lora_grad_kernel(g0, g1, g2, b0, b1, b2, xa_ptr, gp_ptr, dbp_ptr, M, N0, N1, N2, NB0, NB1, R, SPLITS,
                          sg0, sg1, sg2, sb0, sb1, sb2, stride_xm, xa_col, dbp_off, s0, s1, s2,
                          J: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, BM: tl.constexpr,
                          BN: tl.constexpr, BR: tl.constexpr):
        # The two products of the LoRA backward that read g_j = d loss / d y_j (M, N_j), from one read of g_j,
        # for J <= 3 linears of one group (term j: B_j (N_j, R), xa's columns xa_col + j*R ..). Program
        # (n, slice): column block n of all the group's column blocks (NB0 of g0, then NB1 of g1, then g2's),
        # and one slice of rows:
        #   gp[n] (rows, BR)            = g_j @ B_j             partial sums over this column block (float32)
        #   dbp[slice, rows of n] (BN, BR) = s_j * g_j.T @ xa_j  partial sums over this slice of rows (float32)
        # dbp holds the group's dB rows one linear after the other (N0 + N1 + N2 of them) and starts dbp_off
        # elements after gp (one buffer). Summed over blocks / slices by _sum_parts_kernel (deterministic).
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        # the selected values are run-time integers in every branch (Triton may pass 0 / 1 as constants)
        zero = pid_n * 0
        g_ptr, b_ptr, N, stride_gm, stride_bn, scale = g0, b0, N0 + zero, sg0 + zero, sb0 + zero, s0
        blk, noff, col = pid_n, zero, xa_col + zero
        if J > 1:
            if pid_n >= NB0:
                g_ptr, b_ptr, N, stride_gm, stride_bn, scale = g1, b1, N1 + zero, sg1 + zero, sb1 + zero, s1
                blk, noff, col = pid_n - NB0, N0 + zero, xa_col + R + zero
                if J > 2:
                    if pid_n >= NB0 + NB1:
                        g_ptr, b_ptr, N, stride_gm, stride_bn, scale = g2, b2, N2 + zero, sg2 + zero, sb2 + zero, s2
                        blk, noff, col = pid_n - NB0 - NB1, N0 + N1 + zero, xa_col + 2 * R + zero
        rn = blk * BN + tl.arange(0, BN)
        rr = tl.arange(0, BR)
        n_ok = rn < N
        r_ok = rr < R
        b = tl.load(b_ptr + rn[:, None] * stride_bn + rr[None, :], mask=n_ok[:, None] & r_ok[None, :], other=0.0)
        db = tl.zeros((BN, BR), dtype=tl.float32)
        rows_per_prog = tl.cdiv(tl.cdiv(M, SPLITS), BM) * BM
        m_lo = pid_s * rows_per_prog
        m_hi = tl.minimum(m_lo + rows_per_prog, M)
        gp_base = gp_ptr + pid_n.to(tl.int64) * M * BR
        for m_start in range(m_lo, m_hi, BM):
            rm = m_start + tl.arange(0, BM)
            m_ok = rm < m_hi
            rm64 = rm[:, None].to(tl.int64)
            gt = tl.load(g_ptr + rm64 * stride_gm + rn[None, :], mask=m_ok[:, None] & n_ok[None, :], other=0.0)
            xt = tl.load(xa_ptr + col + rm64 * stride_xm + rr[None, :], mask=m_ok[:, None] & r_ok[None, :],
                         other=0.0)
            db = _dot(tl.trans(gt), xt, db, PREC, UPCAST)
            gp = _dot(gt, b, tl.zeros((BM, BR), dtype=tl.float32), PREC, UPCAST)
            tl.store(gp_base + rm64 * BR + rr[None, :], gp, mask=m_ok[:, None])
        ntot = N0 + N1 + N2
        tl.store(dbp_ptr + dbp_off + pid_s.to(tl.int64) * ntot * BR + (noff + rn[:, None]) * BR + rr[None, :],
                 db * scale, mask=n_ok[:, None])

    @triton.jit
    def _sum_chunk(p_ptr, out_ptr, P, ROWS, R, stride_om, scale, chunk, BR: tl.constexpr, CROWS: tl.constexpr,
                   BP: tl.constexpr):
        # out[i, j] = scale * sum_q p[q, i, j] for the CROWS rows of `chunk` (j < R); p (P, ROWS, BR) float32.
        # BP partials per load, summed in a fixed order (deterministic).
        offs = chunk.to(tl.int64) * CROWS * BR + tl.arange(0, CROWS * BR)
        ok = offs < ROWS * BR
        rq = tl.arange(0, BP)
        acc = tl.zeros((CROWS * BR,), dtype=tl.float32)
        for q0 in range(0, P, BP):
            q = q0 + rq
            t = tl.load(p_ptr + q[:, None].to(tl.int64) * ROWS * BR + offs[None, :],
                        mask=(q < P)[:, None] & ok[None, :], other=0.0)
            acc += tl.sum(t, axis=0)
        row = offs // BR
        col = offs % BR
        tl.store(out_ptr + row * stride_om + col, (acc * scale).to(out_ptr.dtype.element_ty), mask=ok & (col < R))

    @triton.jit
    def _sum_parts_kernel(gp_ptr, gxa_ptr, M, stride_gxa, gxa_col, dbp_ptr, dbp_off, db_ptr, NTOT, SPLITS, R, NG,
                          NB0, NB1, NB2, s0, s1, s2, J: tl.constexpr, BR: tl.constexpr, CROWS: tl.constexpr,
                          BP: tl.constexpr):
        # One launch for both sums of _lora_grad_kernel: programs [0, J * NG) sum term j's column-block
        # partials into gxa's columns gxa_col + j*R .. (times s_j), the others the row-slice partials of
        # the group's dB rows (already scaled).
        pid = tl.program_id(0)
        if pid < J * NG:
            j = pid // NG
            chunk = pid - j * NG
            zero = pid * 0  # run-time integers in every branch (Triton may pass 0 / 1 as constants)
            first, nb, scale = zero, NB0 + zero, s0
            if J > 1:
                if j == 1:
                    first, nb, scale = NB0 + zero, NB1 + zero, s1
                if J > 2:
                    if j == 2:
                        first, nb, scale = NB0 + NB1 + zero, NB2 + zero, s2
            _sum_chunk(gp_ptr + first.to(tl.int64) * M * BR, gxa_ptr + gxa_col + j * R, nb, M, R, stride_gxa, scale,
                       chunk, BR, CROWS, BP)
        else:
            _sum_chunk(dbp_ptr + dbp_off, db_ptr, SPLITS, NTOT, R, R, 1.0, pid - J * NG, BR, CROWS, BP)

    @triton.jit
    def _norm_apply_kernel(h_ptr, r_ptr, w_ptr, out_ptr, N, stride_h, stride_o, BN: tl.constexpr):
        # out[row] = w * (h[row] * rstd[row]).to(out dtype): an RMSNorm's last three ops in one pass, rounded
        # where PyTorch rounds (h * rstd in float32 -> out dtype, then the product in float32 -> out dtype).
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BN)
        ok = cols < N
        h = tl.load(h_ptr + row * stride_h + cols, mask=ok, other=0.0)
        r = tl.load(r_ptr + row)
        w = tl.load(w_ptr + cols, mask=ok, other=0.0)
        xn = (h * r).to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
        y = w.to(tl.float32) * xn.to(tl.float32)
        tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=ok)

    @triton.jit
    def _expand_tiles(x_desc, xa_desc, w_desc, b_desc, y_desc, bias_ptr, scale, M, N, K, col, base, pid, NUM_SMS,
                      HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                      GROUP_M: tl.constexpr, UPCAST: tl.constexpr):
        # This program's tiles of one output (global tile numbers base.. of all outputs, dealt round-robin).
        num_m = tl.cdiv(M, BM)
        num_n = tl.cdiv(N, BN)
        width = GROUP_M * num_n
        first = (pid - base % NUM_SMS + NUM_SMS) % NUM_SMS
        for tile in tl.range(first, num_m * num_n, NUM_SMS):
            first_m = (tile // width) * GROUP_M
            gsize = min(num_m - first_m, GROUP_M)
            om = (first_m + (tile % width) % gsize) * BM
            on = ((tile % width) // gsize) * BN
            xa = xa_desc.load([om, col])  # issued first, used last: its latency hides behind the K loop
            bt = b_desc.load([on, 0])
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for kk in range(tl.cdiv(K, BK)):
                a = x_desc.load([om, kk * BK])
                w = w_desc.load([on, kk * BK])
                if UPCAST:
                    acc = tl.dot(a.to(tl.float32), w.to(tl.float32).T, acc, input_precision="ieee")
                else:
                    acc = tl.dot(a, w.T, acc)
            xs = (xa.to(tl.float32) * scale).to(xa.dtype)
            if UPCAST:
                acc = tl.dot(xs.to(tl.float32), bt.to(tl.float32).T, acc, input_precision="ieee")
            else:
                acc = tl.dot(xs, bt.T, acc)
            if HAS_BIAS:
                rn = on + tl.arange(0, BN)
                acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
            y_desc.store([om, on], acc.to(y_desc.dtype))
        return base + num_m * num_n

    @triton.jit
    def _expand_gemm_kernel(x_desc, xa_desc, w0, w1, w2, b0, b1, b2, y0, y1, y2, bias0, bias1, bias2, s0, s1, s2,
                            M, N0, N1, N2, K, R, NUM_SMS, J: tl.constexpr, HAS_BIAS: tl.constexpr, BM: tl.constexpr,
                            BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, GROUP_M: tl.constexpr,
                            UPCAST: tl.constexpr):
        # y_j = x @ W_j.T + s_j * xa[:, j*R:(j+1)*R] @ B_j.T (+ b_j) for J <= 3 linears reading one x, as one
        # persistent GEMM: the LoRA product is one more step of each tile's K loop, so the (M, N_j) LoRA
        # output is never written to memory. B_j is (N_j, R) with R <= BR: the copy engine reads B's
        # missing columns as zeros, so the BR - R columns of xa read beyond term j's add nothing.
        # (Descriptors one by one: Triton 3.6 launches none inside tuples.)
        pid = tl.program_id(0)
        base = _expand_tiles(x_desc, xa_desc, w0, b0, y0, bias0, s0, M, N0, K, 0, 0, pid, NUM_SMS,
                             HAS_BIAS, BM, BN, BK, GROUP_M, UPCAST)
        if J > 1:
            base = _expand_tiles(x_desc, xa_desc, w1, b1, y1, bias1, s1, M, N1, K, R, base, pid, NUM_SMS,
                                 HAS_BIAS, BM, BN, BK, GROUP_M, UPCAST)
        if J > 2:
            _expand_tiles(x_desc, xa_desc, w2, b2, y2, bias2, s2, M, N2, K, 2 * R, base, pid, NUM_SMS,
                          HAS_BIAS, BM, BN, BK, GROUP_M, UPCAST)


    # Autotuned launchers for large inputs (many tokens): the best tile shape depends on K, R and
    # the GPU; small inputs (tests, decode) use the fixed configurations in the wrappers below.

    _shrink_tuned = triton.autotune(
        configs=_cfgs([(32, 128, 4, 3), (64, 128, 4, 3), (64, 64, 4, 4), (128, 64, 8, 3), (32, 256, 4, 2),
                       (64, 128, 8, 4), (16, 256, 4, 3)], ("BM", "BK")),
        key=["K", "R", "DROPOUT"])(_shrink_kernel)
    _dropout_bwd_tuned = triton.autotune(
        configs=_cfgs([(64, 64, 4, 2), (64, 64, 4, 3), (32, 128, 4, 2), (64, 128, 8, 2), (128, 64, 8, 2),
                       (32, 64, 4, 3), (128, 128, 8, 3)], ("BM", "BK")),
        key=["K", "R", "HAS_GX", "GX_INIT", "XSRC"], restore_value=["gx_ptr"])(_dropout_bwd_kernel)


def shrink(x2: Tensor, A: Tensor, seed: Tensor | None = None, p: float = 0.0, cfg: dict | None = None) -> Tensor:
    """xa = dropout(x2) @ A.T as a new (M, R) tensor of x2's dtype; no dropout when seed is None.

    x2 (M, K) and A (R, K) have unit stride in their last dimension. `cfg` (benchmarks): fixed
    BM, BK, num_warps, num_stages instead of the tuned or default ones.
    """
    M, K = x2.shape
    R = A.shape[0]
    out = torch.empty(M, R, dtype=x2.dtype, device=x2.device)
    dropout = seed is not None and p > 0
    half, thresh, inv_keep = _dropout_args(K, p) if dropout else (1, 0, 1.0)
    BR = _pow2(R)
    args = (x2, A, out, seed if dropout else x2, M, K, R, x2.stride(0), A.stride(0), out.stride(0),
            half, thresh, inv_keep)
    c = {"BM": 32 if BR <= 32 else 16, "BK": 128 if K >= 128 else 64, "num_warps": 4, "num_stages": 3, **(cfg or {})}

    def fixed():
        _launch(_shrink_kernel, (_cdiv(M, c["BM"]),), args,
                dict(DROPOUT=dropout, PREC=_prec(x2.dtype), UPCAST=interpreting(), BM=c["BM"], BK=c["BK"], BR=BR,
                     num_warps=c["num_warps"], num_stages=c["num_stages"]))

    if _tune(M, x2) and not cfg:
        _tuned(_shrink_tuned, _shrink_kernel, (K, R, dropout, x2.dtype, x2.device),
               lambda meta: (_cdiv(M, meta["BM"]),), args,
               dict(DROPOUT=dropout, PREC=_prec(x2.dtype), UPCAST=False, BR=BR), fixed)
    else:
        fixed()
    return out


def dropout_backward(x2: Tensor | None, gxa: Tensor, A: Tensor, gx: Tensor | None, seed: Tensor | None, p: float,
                     gx_init: bool = False, src: tuple | None = None, cfg: dict | None = None) -> Tensor:
    """dA (R, K) float32 = gxa.T @ dropout(x2); if gx is given, gx += (gxa @ A) * mask / (1 - p) in place
    (gx_init: gx = ..., gx's old contents are neither read nor kept). seed None: no dropout.

    x2 (M, K), gxa (M, R), A (R, K), gx (M, K): unit stride in the last dimension. Instead of x2
    (None), `src` (see `rebuild_source`) names what x2 was made of; the kernel rebuilds its tiles
    in registers, bit for bit, and x2 is never written to memory. `cfg` (benchmarks): fixed BM, BK,
    num_warps, num_stages and PER_SM (programs per SM that set the number of row slices).
    """
    xsrc, u, v = 0, None, None
    if src is not None:
        kind, x2, u, v = src
        xsrc = 1 if kind == "norm" else 2
    M, K = x2.shape
    R = A.shape[0]
    if seed is None:  # threshold 0 keeps every element
        seed, p = _zero_seed(x2.device), 0.0
    half, thresh, inv_keep = _dropout_args(K, p)
    BR = _pow2(R)
    # Enough row slices to fill the GPU (~4 programs per SM at 64 columns a program); each slice
    # writes its own partial dA, summed at the end (deterministic, no atomics).
    c = {"BM": 64, "BK": 64 if BR <= 32 else 32, "num_warps": 4, "num_stages": 2, "PER_SM": 4, **(cfg or {})}
    splits = max(1, min(_cdiv(M, 64), _cdiv(c["PER_SM"] * _sm_count(x2.device), _cdiv(K, 64))))
    part = torch.empty(splits, R, K, dtype=torch.float32, device=x2.device)
    has_gx = gx is not None
    # Without gx, `part` stands in for its pointer (never read then): not x2, which the autotuner's
    # restore of gx_ptr would write to, bumping the version of a tensor autograd has saved.
    args = (x2, gxa, A, gx if has_gx else part, part, seed, x2 if u is None else u, x2 if v is None else v,
            M, K, R, splits, x2.stride(0), gxa.stride(0), A.stride(0), gx.stride(0) if has_gx else 0,
            u.stride(0) if xsrc == 2 else 0, half, thresh, inv_keep)

    def fixed():
        _launch(_dropout_bwd_kernel, (_cdiv(K, c["BK"]), splits), args,
                dict(HAS_GX=has_gx, GX_INIT=gx_init, XSRC=xsrc, PREC=_prec(A.dtype), UPCAST=interpreting(),
                     BM=c["BM"], BK=c["BK"], BR=BR, num_warps=c["num_warps"], num_stages=c["num_stages"]))

    if _tune(M, x2) and not cfg:
        _tuned(_dropout_bwd_tuned, _dropout_bwd_kernel, (K, R, has_gx, gx_init, xsrc, A.dtype, x2.device),
               lambda meta: (_cdiv(K, meta["BK"]), splits), args,
               dict(HAS_GX=has_gx, GX_INIT=gx_init, XSRC=xsrc, PREC=_prec(A.dtype), UPCAST=False, BR=BR), fixed)
    else:
        fixed()
    return part.sum(0) if splits > 1 else part[0]


def lora_grads(g: Tensor, B: Tensor, xa: Tensor, scale: float, gxa_out: Tensor, cfg: dict | None = None,
               col: int = 0, db_dtype: torch.dtype | None = None) -> Tensor:
    """The LoRA backward's two products of g, reading g once: writes gxa_out[:, col:col + R] = scale * g @ B
    and returns dB = scale * g.T @ xa[:, col:col + R] (a new (N, R) tensor of `db_dtype`, default B's dtype).

    g (M, N), B (N, R), xa and gxa_out (M, >= col + R): unit stride in the last dimension (row strides
    free). `cfg` (benchmarks): fixed BM, BN, num_warps, num_stages and PER_SM (programs per SM that set
    the number of row slices). `lora_grads_group` does the same for the linears of one group at once.
    """
    return lora_grads_group([g], [B], xa, [scale], gxa_out, col, cfg, db_dtype)[0]


def lora_grads_group(gs, Bs, xa: Tensor, scales, gxa_out: Tensor, col: int = 0,
                     cfg: dict | None = None, db_dtype: torch.dtype | None = None) -> list[Tensor]:
    """`lora_grads` for up to three linears of one group in two launches: for term j (rank R, the same for
    all), gxa_out[:, col + j*R:col + (j+1)*R] = scales[j] * gs[j] @ Bs[j] and dB_j = scales[j] * gs[j].T @
    xa[:, col + j*R:col + (j+1)*R]. Returns the dB_j, row blocks of one new (sum N_j, R) tensor of `db_dtype`
    (default the dtype of Bs)."""
    J = len(gs)
    M = gs[0].shape[0]
    Ns = [g.shape[1] for g in gs]
    R = Bs[0].shape[1]
    BR = _pow2(R)
    n_max = max(Ns)
    # dB's (BN, BR) sum stays in registers. One program per SM, narrow blocks for narrow g (k/v): the
    # fastest in the H100 sweep of benchmarks/bench_kernels.py (1.1B shapes, 8192 rows, rank 16).
    c = {"BM": 128 if n_max <= 512 else 64, "BN": min(_pow2(n_max), 64 if n_max <= 512 else 256 if BR <= 16 else
                                                      (128 if BR <= 32 else 64)),
         "num_warps": 4, "num_stages": 3, "PER_SM": 1, **(cfg or {})}
    BM, BN = c["BM"], c["BN"]
    nbs = [_cdiv(n, BN) for n in Ns] + [0] * (3 - J)
    blocks = nbs[0] + nbs[1] + nbs[2]
    ntot = sum(Ns)
    dev = gs[0].device
    # About one program per SM; each row slice keeps its own partial dB.
    splits = max(1, min(_cdiv(M, BM), _cdiv(c["PER_SM"] * _sm_count(dev), blocks)))
    gp_size = blocks * M * BR
    parts = torch.empty(gp_size + splits * ntot * BR, dtype=torch.float32, device=dev)  # gp, then dbp
    ss = [float(s) for s in scales] + [0.0] * (3 - J)
    pad = [None] * (3 - J)
    _launch(_lora_grad_kernel, (blocks, splits),
            (*gs, *pad, *Bs, *pad, xa, parts, parts, M, *Ns, *[0] * (3 - J), nbs[0], nbs[1], R, splits,
             *[g.stride(0) for g in gs], *[0] * (3 - J), *[B.stride(0) for B in Bs], *[0] * (3 - J), xa.stride(0),
             col, gp_size, *ss),
            dict(J=J, PREC=_prec(gs[0].dtype), UPCAST=_INTERPRET, BM=BM, BN=BN, BR=BR, num_warps=c["num_warps"],
                 num_stages=c["num_stages"]))
    dB = torch.empty(ntot, R, dtype=db_dtype or Bs[0].dtype, device=dev)
    crows = max(1, 512 // BR)  # rows per reduction program: 512 partial values a load
    ng = _cdiv(M, crows)
    _launch(_sum_parts_kernel, (J * ng + _cdiv(ntot, crows),),
            (parts, gxa_out, M, gxa_out.stride(0), col, parts, gp_size, dB, ntot, splits, R, ng, *nbs, *ss),
            dict(J=J, BR=BR, CROWS=crows, BP=16, num_warps=4))
    return [dB] if J == 1 else list(dB.split(Ns))


# -- the forward GEMM with the LoRA product in its K loop ---------------------------------------
def _descriptors_ok(t: Tensor) -> bool:
    """Whether the copy-engine (TMA) GEMMs run on tensors like t: a Hopper or newer GPU (or the
    interpreter on CPU) and float16 / bfloat16."""
    if _DESCRIPTOR is None or t.dtype not in (torch.float16, torch.bfloat16):
        return False
    if t.is_cuda:
        ok = _HOPPER.get(t.device)
        if ok is None:
            ok = _HOPPER[t.device] = not _INTERPRET and torch.cuda.get_device_capability(t.device) >= (9, 0)
        return ok
    return _INTERPRET


_HOPPER: dict = {}


def _stages_that_fit(stages: int, per_stage: int, once: int) -> int:
    """Pipeline depth for a copy-engine GEMM: at most `stages`, with its shared memory (two-byte elements:
    `per_stage` per stage of the K loop, `once` for the LoRA tiles and the output tile) within the
    H100's 227 KiB a block."""
    while stages > 2 and 2 * (stages * per_stage + once) > 225 * 1024:  # barriers take a little more
        stages -= 1
    return stages


def expand_gemm_ok(x2: Tensor, Ws, bs, xa: Tensor, Bs) -> bool:
    """Whether `expand_gemm` serves these operands: a Hopper (or newer) GPU, whose copy engine the
    kernel reads its tiles with; float16/bfloat16; every operand with unit last stride and 16-byte
    aligned rows; ranks of 8 to 64, all equal."""
    if len(Ws) > 3 or not _descriptors_ok(x2):
        return False
    dt = x2.dtype
    r = Bs[0].shape[1]
    if not 8 <= r <= 64 or r % 8 or xa.shape[1] != r * len(Bs):
        return False
    for t in (x2, xa, *Ws, *Bs):  # 2-D: unit last stride, rows of a multiple of 16 bytes
        st = t.stride()
        if t.dtype != dt or st[1] != 1 or st[0] % 8 or t.data_ptr() % 16:
            return False
    for W, B, b in zip(Ws, Bs, bs):
        if B.shape[1] != r or W.shape[0] % 8 or b is not None and (
                b.dtype != dt or b.stride(0) != 1 or b.data_ptr() % 16):
            return False
    return True


def expand_gemm(x2: Tensor, Ws, bs, xa: Tensor, Bs, scales, cfg: dict | None = None) -> list[Tensor]:
    """[x2 @ W_j.T + b_j + scales[j] * xa[:, j*r:(j+1)*r] @ B_j.T for each j] as new (M, N_j) tensors, up to
    three linears reading x2 in one persistent GEMM whose K loop ends with the LoRA product: the LoRA
    output is never written to memory and read back. Check `expand_gemm_ok` first. `cfg` (benchmarks):
    BM, BN, BK, GROUP_M, num_warps, num_stages instead of the defaults."""
    M, K = x2.shape
    J, r = len(Ws), Bs[0].shape[1]
    BR = _pow2(r)
    narrow = max(W.shape[0] for W in Ws) <= 512
    c = {"BM": 128, "BN": 128 if narrow else 256, "BK": 64, "GROUP_M": 8, "num_warps": 4 if narrow else 8,
         "num_stages": 4 if narrow else 3, **(cfg or {})}
    BM, BN, BK = c["BM"], c["BN"], c["BK"]
    stages = _stages_that_fit(c["num_stages"], BM * BK + BN * BK, BM * BR + BN * BR + BM * BN)
    ys = [torch.empty(M, W.shape[0], dtype=x2.dtype, device=x2.device) for W in Ws]
    has_bias = bs[0] is not None
    if any((b is not None) != has_bias for b in bs):  # some with, some without: zeros for the missing ones
        bs = [b if b is not None else W.new_zeros(W.shape[0]) for W, b in zip(Ws, bs)]
    sms = _sm_count(x2.device)
    tiles = sum(_cdiv(M, BM) * _cdiv(W.shape[0], BN) for W in Ws)
    grid = (max(1, min(sms, tiles)),)

    def three(items, unused):  # the kernel takes three of each; None (a constant) where it has fewer linears
        return list(items) + [unused] * (3 - len(items))

    desc = _descriptor
    _launch(_expand_gemm_kernel, grid,
            (desc(x2, [BM, BK]), desc(xa, [BM, BR]), *three([desc(W, [BN, BK]) for W in Ws], None),
             *three([desc(B, [BN, BR]) for B in Bs], None), *three([desc(y, [BM, BN]) for y in ys], None),
             *three(bs if has_bias else (), None), *three([float(s) for s in scales], 0.0), M,
             *three([W.shape[0] for W in Ws], 0), K, r, grid[0]),
            dict(J=J, HAS_BIAS=has_bias, BM=BM, BN=BN, BK=BK, BR=BR, GROUP_M=c["GROUP_M"], UPCAST=_INTERPRET,
                 num_warps=c["num_warps"], num_stages=stages))
    return ys


def rebuild_source(kind: str, tensors: tuple, x_shape: torch.Size, dtype: torch.dtype) -> tuple | None:
    """What `dropout_backward` needs to rebuild x (shape x_shape, dtype) in registers, or None when the
    tensors do not have the layout the kernel reads (then x is rebuilt by PyTorch ops).

    kind "norm": tensors (h32, rstd, weight) with x = weight * (h32 * rstd).to(dtype), an RMSNorm's output;
    kind "mul": tensors (a, b) with x = a * b.
    """
    K = x_shape[-1]
    if kind == "norm":
        h, r, w = tensors
        if h.dtype != torch.float32 or h.shape != x_shape or r.numel() * K != h.numel() or w.shape != (K,) \
                or w.dtype != dtype or not (h.is_contiguous() and r.is_contiguous() and w.is_contiguous()):
            return None
        return "norm", h.view(-1, K), r.view(-1), w
    a, b = tensors
    if a.shape != x_shape or b.shape != x_shape or a.dtype != dtype or b.dtype != dtype \
            or not (a.is_contiguous() and b.is_contiguous()):
        return None
    return "mul", a.view(-1, K), b.view(-1, K), None


def norm_apply(h32: Tensor, rstd: Tensor, weight: Tensor) -> Tensor:
    """weight * (h32 * rstd).to(weight.dtype), bit for bit, in one kernel (h32 (..., N) float32, rstd (..., 1)).

    The recomputation of a Llama-style RMSNorm's output (`fast.fusion.rms_norm_forward`): PyTorch's three
    elementwise kernels move 18 bytes per element, this one 6.
    """
    N = h32.shape[-1]
    h2 = h32.reshape(-1, N)
    r = rstd.reshape(-1)
    if h2.stride(-1) != 1:
        h2 = h2.contiguous()
    if r.numel() != h2.shape[0]:
        raise ValueError(f"norm_apply: rstd has {r.numel()} values for {h2.shape[0]} rows.")
    out = torch.empty(h2.shape, dtype=weight.dtype, device=h32.device)
    BN = _pow2(N)
    _launch(_norm_apply_kernel, (h2.shape[0],), (h2, r.contiguous(), weight.contiguous(), out, N, h2.stride(0),
                                                 out.stride(0)), dict(BN=BN, num_warps=4 if BN <= 2048 else 8))
    return out.view(h32.shape)
