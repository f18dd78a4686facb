"""Triton kernels of the fast path (CUDA, or CPU tensors under TRITON_INTERPRET=1).

Two families:
  * dropout-fused LoRA input kernels, so that dropout(x) is never written to memory:
      shrink:   xa = dropout(x) @ A.T                            (reads x once)
      backward: dA = gxa.T @ dropout(x);  gx += dropout'(gxa @ A)  (reads x once, gx in place)
    with the mask regenerated in registers from the seed (see `functional.dropout_keep`).
  * routed (per-example adapter) kernels in the style of Punica's SGMV: every program
    handles a block of tokens of one batch row, looks the row's adapter up, and multiplies
    by that adapter's stacked matrix. No host sync, no sorting, any mix of ranks (ranks are
    zero-padded to the largest one in the stacks).

Every wrapper takes 2-D row-major tensors and returns new tensors or writes in place where
its docstring says so. Callers check that Triton applies (`available_for`).
"""

from __future__ import annotations

import dataclasses
import os

import torch
from torch import Tensor

from ..functional import dropout_threshold  # its hash constants (HASH_MUL1, HASH_MUL2) are written out in _keep_tile

try:  # Triton is optional: the PyTorch path computes the same function everywhere.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None



# Read once, at import, as Triton reads TRITON_INTERPRET when it decorates the kernels below.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Whether the kernels may run at all: `lk.set_fast_path(..., triton=False)` keeps the fused Functions on
# their PyTorch steps.
ENABLED = {"on": triton is not None}


def interpreting() -> bool:
    return _INTERPRET


def available_for(t: Tensor) -> bool:
    """Whether the Triton kernels can run on tensors like `t` (CUDA, or CPU under the interpreter)."""
    if not ENABLED["on"]:
        return False
    if t.is_cuda:
        return not _INTERPRET
    return _INTERPRET and t.device.type == "cpu"


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << (max(1, n) - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)  # triton.cdiv is a constexpr function in recent Triton, microseconds a call on the host


def _prec(dtype: torch.dtype) -> str:
    # float32 inputs get full-precision dots (Triton's default would be tf32).
    return "ieee" if dtype == torch.float32 else "tf32"


if triton is not None:

    @triton.jit
    def _dot(a, b, acc, PREC: tl.constexpr, UPCAST: tl.constexpr):
        # UPCAST: the CPU interpreter multiplies bfloat16 tiles wrongly (Triton 3.9); float32 there.
        if UPCAST:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        return tl.dot(a, b, acc, input_precision=PREC)

    @triton.jit
    def _keep_tile(rm, k_start, half, k0, mul, thresh, BK: tl.constexpr):
        """(BM, BK) keep-mask for rows `rm` and columns k_start .. k_start+BK (k_start even)."""
        cp = k_start // 2 + tl.arange(0, BK // 2)
        j = rm[:, None].to(tl.uint32) * half + cp[None, :].to(tl.uint32)
        h = j * mul + k0
        h = h ^ (h >> 16)
        h = h * 0x7FEB352D
        h = h ^ (h >> 15)
        h = h * 0x846CA68B
        h = h ^ (h >> 16)
        u = tl.interleave(h & 0xFFFF, h >> 16)
        return u >= thresh

    @triton.jit
    def _dropout_apply_kernel(x_ptr, out_ptr, seed_ptr, M, K, stride_x, stride_o, half, thresh, inv_keep,
                              BM: tl.constexpr, BK: tl.constexpr):
        # out = dropout(x) with the mask of `dropout.keep_mask`: x * (1 / (1 - p)) where kept, rounded once.
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        k_start = tl.program_id(1) * BK
        rk = k_start + tl.arange(0, BK)
        k0 = tl.load(seed_ptr).to(tl.uint32)
        mul = tl.load(seed_ptr + 1).to(tl.uint32) | 1
        keep = _keep_tile(rm, k_start, k0 * 0 + half, k0, mul, k0 * 0 + thresh, BK)
        ok = (rm[:, None] < M) & (rk[None, :] < K)
        x = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_x + rk[None, :], mask=ok, other=0.0).to(tl.float32)
        y = tl.where(keep, x * inv_keep, 0.0)
        tl.store(out_ptr + rm[:, None].to(tl.int64) * stride_o + rk[None, :], y.to(out_ptr.dtype.element_ty), mask=ok)

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
    def _x_and_w_tiles(x_ptr, w_ptr, rm, rn, rk, m_ok, n_ok, k_ok, stride_xm, stride_wn, stride_wk):
        # The (BM, BK) tile of x (unit stride in K) and the (BK, BN) tile of W.T (W (N, K) of any strides).
        xt = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(w_ptr + rn[None, :].to(tl.int64) * stride_wn + rk[:, None] * stride_wk,
                     mask=n_ok[None, :] & k_ok[:, None], other=0.0)
        return xt, wt

    @triton.jit
    def _small_tile(x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, K, R, scale, KC,
                    stride_xm, stride_wn, stride_wk, stride_am, stride_bn, stride_om, blk, pid_n, pid_s, pid_m,
                    SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr):
        # y (M, N) = x @ W.T + bias + scale * (x @ A.T) @ B.T for few rows M (decode): the share of
        # column block `blk`, K split pid_s and row block pid_m (program pid_n of the launch's column blocks).
        # It streams the (BN, KC) block of W at columns pid_s*KC.. and the same columns of the small A
        # (from L2); both products are linear in x, so its share of y is
        #     x_s @ W_s.T + scale * (x_s @ A_s.T) @ B.T         (xa kept float32, its B product in ieee float32)
        # A and B of another dtype than x (float32 adapters on a bfloat16 model) are rounded to x's dtype as
        # they are read, as `A.to(x.dtype)` would round them.
        # With SPLIT > 1 the shares go to a float32 workspace; the last program of a tile to finish
        # (a counter per tile) adds them in the order s = 0, 1, .. (deterministic), rounds once,
        # writes y and sets the counter back to 0 for the next launch.
        rn = blk * BN + tl.arange(0, BN)
        rm = pid_m * BM + tl.arange(0, BM)
        rr = tl.arange(0, BR)
        n_ok = rn < N
        m_ok = rm < M
        r_ok = rr < R
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        xa = tl.zeros((BM, BR), dtype=tl.float32)
        k_hi = tl.minimum(pid_s * KC + KC, K)
        for k_start in range(pid_s * KC, k_hi, BK):
            rk = k_start + tl.arange(0, BK)
            k_ok = rk < k_hi
            xt, wt = _x_and_w_tiles(x_ptr, w_ptr, rm, rn, rk, m_ok, n_ok, k_ok, stride_xm, stride_wn, stride_wk)
            at = tl.load(a_ptr + rr[None, :] * stride_am + rk[:, None], mask=r_ok[None, :] & k_ok[:, None],
                         other=0.0).to(x_ptr.dtype.element_ty)
            acc = _dot(xt, wt, acc, PREC, UPCAST)
            xa = _dot(xt, at, xa, PREC, UPCAST)
        bt = tl.load(b_ptr + rn[None, :] * stride_bn + rr[:, None], mask=n_ok[None, :] & r_ok[:, None], other=0.0)
        acc += scale * tl.dot(xa, bt.to(x_ptr.dtype.element_ty).to(tl.float32), input_precision="ieee")
        _small_finish(acc, rm, rn, m_ok, n_ok, out_ptr, bias_ptr, ws_ptr, cnt_ptr, M, N, stride_om,
                      pid_n, pid_s, pid_m, SPLIT, HAS_BIAS, BM, BN)

    @triton.jit
    def _gemv_tile(x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr, N, K, R, scale, KC,
                   stride_wn, stride_wk, stride_am, stride_bn, stride_om, blk, pid_n, pid_s,
                   SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                   BR: tl.constexpr):
        # `_small_tile` for one row (M == 1): products as float32 multiply-adds on whole (BN, BK) tiles
        # of W, summed over K at the end, instead of tensor-core dots padded to 16 rows.
        rn = blk * BN + tl.arange(0, BN)
        rr = tl.arange(0, BR)
        n_ok = rn < N
        r_ok = rr < R
        acc = tl.zeros((BN, BK), dtype=tl.float32)
        xa = tl.zeros((BR, BK), dtype=tl.float32)
        k_hi = tl.minimum(pid_s * KC + KC, K)
        for k_start in range(pid_s * KC, k_hi, BK):
            rk = k_start + tl.arange(0, BK)
            k_ok = rk < k_hi
            xk = tl.load(x_ptr + rk, mask=k_ok, other=0.0).to(tl.float32)
            wt = tl.load(w_ptr + rn[:, None].to(tl.int64) * stride_wn + rk[None, :] * stride_wk,
                         mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            at = tl.load(a_ptr + rr[:, None] * stride_am + rk[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
            acc += wt.to(tl.float32) * xk[None, :]
            xa += at.to(x_ptr.dtype.element_ty).to(tl.float32) * xk[None, :]
        y = tl.sum(acc, axis=1)
        xs = tl.sum(xa, axis=1)
        bt = tl.load(b_ptr + rn[:, None] * stride_bn + rr[None, :], mask=n_ok[:, None] & r_ok[None, :], other=0.0)
        y += scale * tl.sum(bt.to(x_ptr.dtype.element_ty).to(tl.float32) * xs[None, :], axis=1)
        rm = tl.arange(0, 1)
        _small_finish(y[None, :], rm, rn, rm < 1, n_ok, out_ptr, bias_ptr, ws_ptr, cnt_ptr, 1, N, stride_om,
                      pid_n, pid_s, 0, SPLIT, HAS_BIAS, 1, BN)

    @triton.jit
    def _lora_small_kernel(x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, K, R, scale, KC,
                           stride_xm, stride_wn, stride_wk, stride_am, stride_bn, stride_om,
                           SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
                           BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr):
        # One linear, few rows: program (n, s, m) computes `_small_tile`'s share for column block n.
        pid_n = tl.program_id(0)
        _small_tile(x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, K, R, scale, KC,
                    stride_xm, stride_wn, stride_wk, stride_am, stride_bn, stride_om, pid_n, pid_n,
                    tl.program_id(1), tl.program_id(2), SPLIT, HAS_BIAS, PREC, UPCAST, BM, BN, BK, BR)

    @triton.jit
    def _small_finish(acc, rm, rn, m_ok, n_ok, out_ptr, bias_ptr, ws_ptr, cnt_ptr, M, N, stride_om,
                      pid_n, pid_s, pid_m, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, BM: tl.constexpr,
                      BN: tl.constexpr):
        # Writes y's (BM, BN) tile: this program's float32 share acc, plus (SPLIT > 1) the other splits'.
        io_ok = m_ok[:, None] & n_ok[None, :]
        out_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :]
        if SPLIT == 1:
            if HAS_BIAS:
                acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=io_ok)
        else:
            tile = rm[:, None] * N + rn[None, :]
            tl.store(ws_ptr + pid_s * M * N + tile, acc, mask=io_ok)
            tl.debug_barrier()  # every thread's share is written before the counter says so
            cnt = cnt_ptr + pid_m * tl.num_programs(0) + pid_n
            if tl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu") == SPLIT - 1:
                tl.debug_barrier()
                total = tl.zeros((BM, BN), dtype=tl.float32)
                for q in range(SPLIT):
                    total += tl.load(ws_ptr + q * M * N + tile, mask=io_ok, other=0.0, cache_modifier=".cg")
                if HAS_BIAS:
                    total += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
                tl.store(out_ptrs, total.to(out_ptr.dtype.element_ty), mask=io_ok)
                tl.atomic_xchg(cnt, 0, sem="relaxed", scope="gpu")

    @triton.jit
    def _lora_gemv_kernel(x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, K, R, scale, KC,
                          stride_xm, stride_wn, stride_wk, stride_am, stride_bn, stride_om,
                          SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                          BR: tl.constexpr):
        # One linear, one row (M == 1): program (n, s) computes `_gemv_tile`'s share for column block n.
        pid_n = tl.program_id(0)
        _gemv_tile(x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr, N, K, R, scale, KC,
                   stride_wn, stride_wk, stride_am, stride_bn, stride_om, pid_n, pid_n, tl.program_id(1),
                   SPLIT, HAS_BIAS, BN, BK, BR)

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
    def _cfgs(specs, names):
        return [triton.Config(dict(zip(names, c[:-2])), num_warps=c[-2], num_stages=c[-1]) for c in specs]

    _shrink_tuned = triton.autotune(
        configs=_cfgs([(32, 128, 4, 3), (64, 128, 4, 3), (64, 64, 4, 4), (128, 64, 8, 3), (32, 256, 4, 2),
                       (64, 128, 8, 4), (16, 256, 4, 3)], ("BM", "BK")),
        key=["K", "R", "DROPOUT"])(_shrink_kernel)
    _dropout_bwd_tuned = triton.autotune(
        configs=_cfgs([(64, 64, 4, 2), (64, 64, 4, 3), (32, 128, 4, 2), (64, 128, 8, 2), (128, 64, 8, 2),
                       (32, 64, 4, 3), (128, 128, 8, 3)], ("BM", "BK")),
        key=["K", "R", "HAS_GX", "GX_INIT", "XSRC"], restore_value=["gx_ptr"])(_dropout_bwd_kernel)
    _routed_mm_tuned = triton.autotune(
        configs=_cfgs([(64, 128, 64, 4, 2), (64, 64, 64, 4, 3), (32, 128, 64, 4, 2), (128, 128, 32, 8, 2),
                       (64, 128, 32, 4, 3), (128, 64, 64, 8, 3)], ("BM", "BN", "BK")),
        key=["K", "NOUT", "ACCUM"], restore_value=["out_ptr"])(_routed_mm_kernel)


_TUNING = {"on": True}

# -- launching ------------------------------------------------------------------------------------
# Triton's own launch (`kernel[grid](...)`) binds and specializes every argument on every call:
# 35-95 us of CPU per launch on the benchmark host, where a LoRA step launches ~180 kernels.
# Once a kernel was compiled for a specialization, `_launch` calls the compiled kernel directly.
# Its cache key is finer than Triton's own (every property Triton specializes an argument on, and
# then some), so it can only miss where Triton would hit, never reuse a kernel Triton would not.
_COMPILED: dict = {}
try:  # host-side tile descriptors for the copy engine (Triton 3.4 and later)
    from triton.tools.tensor_descriptor import TensorDescriptor as _DESCRIPTOR
except ImportError:  # pragma: no cover - depends on the Triton version
    _DESCRIPTOR = None
# Triton's TensorDescriptor checks its fields on construction (microseconds); `expand_gemm_ok` has made
# the same checks, so `_descriptor` sets the fields directly where the class is the plain dataclass of
# these fields (Triton 3.4 to 3.9), else it calls `from_tensor`.
_DESC_FIELDS = None
if _DESCRIPTOR is not None and dataclasses.is_dataclass(_DESCRIPTOR) and not hasattr(_DESCRIPTOR, "__slots__"):
    _fields = {f.name: f.default for f in dataclasses.fields(_DESCRIPTOR)}
    if {"base", "shape", "strides", "block_shape"} <= set(_fields) and all(
            v is not dataclasses.MISSING for k, v in _fields.items() if k not in ("base", "shape", "strides",
                                                                                  "block_shape")):
        _DESC_FIELDS = {k: v for k, v in _fields.items() if k not in ("base", "shape", "strides", "block_shape")}


def _descriptor(t: Tensor, block: list[int]):
    """TensorDescriptor.from_tensor(t, block), without repeating the checks of `expand_gemm_ok`."""
    if _DESC_FIELDS is None:
        return _DESCRIPTOR.from_tensor(t, block)
    d = _DESCRIPTOR.__new__(_DESCRIPTOR)
    d.__dict__.update(_DESC_FIELDS)
    d.base, d.shape, d.strides, d.block_shape = t, t.shape, t.stride(), block
    return d


def _same_as_from_tensor() -> bool:
    """Whether `_descriptor` gives what `from_tensor` gives (the same attributes, equal values), on a probe."""
    try:
        t = torch.zeros(16, 16, dtype=torch.float16)
        mine, theirs = vars(_descriptor(t, [16, 16])), vars(_DESCRIPTOR.from_tensor(t, [16, 16]))
        return mine.keys() == theirs.keys() and all(
            mine[k] is theirs[k] or (k != "base" and mine[k] == theirs[k]) for k in mine)
    except Exception:  # noqa: BLE001 - any surprise: use from_tensor
        return False


if _DESC_FIELDS is not None and not _same_as_from_tensor():  # pragma: no cover - depends on the Triton version
    _DESC_FIELDS = None
_DIRECT = {"on": True}  # False: every launch through Triton's own launcher (kernels under a debugger)
_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


def _specs(args: tuple) -> tuple:
    """What Triton specializes each argument on (and then some): a tensor's dtype and 16-byte alignment,
    an int's value if 0 or 1 else its divisibility by 16 and whether it fits 32 bits; float: nothing."""
    out = []
    add = out.append
    for a in args:
        t = type(a)
        if t is int:
            add(a if a == 0 or a == 1 else (a & 15 == 0, -2147483648 <= a < 2147483648))
        elif t is float:
            add(None)
        elif t is _DESCRIPTOR:  # compiled for its dtype and tile, not its sizes
            b = a.base
            add((b.dtype, b.data_ptr() & 15 == 0, *a.block_shape, a.padding))
        elif isinstance(a, Tensor):
            add((a.dtype, a.data_ptr() & 15 == 0))
        else:
            add((t, a))
    return tuple(out)


def _key(kernel, device: torch.device, args: tuple, consts: dict) -> tuple:
    """A direct launch's entry in `_COMPILED`: the kernel, the device, what Triton specializes the arguments on
    and the constants in call order (the same constants in another order only miss, then hit Triton's own
    cache)."""
    return kernel, device, _specs(args), tuple(consts.items())


def _launch(kernel, grid: tuple, args: tuple, consts: dict) -> None:
    """kernel[grid](*args, **consts), by the compiled kernel's own launcher once Triton has compiled it."""
    first = args[0].base if _DESCRIPTOR is not None and type(args[0]) is _DESCRIPTOR else args[0]
    if not (_DIRECT["on"] and first.is_cuda):
        kernel[grid](*args, **consts)
        return
    key = _key(kernel, first.device, args, consts)
    hit = _COMPILED.get(key)
    if hit is not None:
        compiled, args = hit[0], args + hit[1]
        grid = grid + (1,) * (3 - len(grid))  # the compiled kernel's launcher reads 3 dims
        if _RUNTIME:
            _run(compiled, grid, args)
        else:
            compiled[grid](*args)
        return
    compiled = kernel[grid](*args, **consts)
    names = kernel.arg_names[len(args):]
    if hasattr(compiled, "run") and all(n in consts for n in names) \
            and len(consts) == len(names) + sum(o in consts for o in _OPTIONS):
        _COMPILED[key] = (compiled, tuple(consts[n] for n in names))
        if _RUNTIME is None:
            _resolve_runtime(compiled)


# (get_current_device, get_current_stream, the runtime knobs) of Triton's active driver, looked up on the
# first direct launch; () where this Triton's compiled kernels do not have the launcher they expect.
_RUNTIME = None


def _run(compiled, grid: tuple, args: tuple) -> None:
    """What `compiled[grid](*args)` does (grid of 3), with Triton's device and stream functions looked up once."""
    get_device, get_stream, rt = _RUNTIME
    stream = get_stream(get_device())
    compiled.run(grid[0], grid[1], grid[2], stream, compiled.function, compiled.packed_metadata,
                 compiled.launch_metadata(grid, stream, *args), rt.launch_enter_hook, rt.launch_exit_hook, *args)


def _resolve_runtime(compiled) -> None:
    global _RUNTIME
    try:
        from triton import knobs
        from triton.runtime import driver

        active = driver.active
        found = (active.get_current_device, active.get_current_stream, knobs.runtime)
        ok = all(hasattr(compiled, a) for a in ("function", "packed_metadata", "launch_metadata")) \
            and hasattr(knobs.runtime, "launch_enter_hook") and hasattr(knobs.runtime, "launch_exit_hook")
    except (ImportError, AttributeError):  # pragma: no cover - depends on the Triton version
        found, ok = (), False
    _RUNTIME = found if ok else ()


def _tune(M: int, t: Tensor) -> bool:
    return _TUNING["on"] and M >= 4096 and t.is_cuda and not interpreting()


_BEST: dict = {}  # (kernel, tuning key) -> the triton.Config its autotuner chose


def _tuned(tuner, kernel, key: tuple, grid, args: tuple, consts: dict, fallback) -> None:
    """Launch `kernel` with the configuration `tuner` (its autotuned form) picks for `key`.

    The first launch per key goes through the autotuner (benchmarking the configurations);
    later ones launch the chosen configuration directly, which skips the autotuner's
    per-call argument handling (about half the CPU cost of a launch). If autotuning itself
    fails: warn once and use the fixed configuration (`fallback`) from then on.
    """
    cfg = _BEST.get((kernel, key))
    if cfg is not None:
        _launch(kernel, grid(cfg.kwargs), args,
                {**consts, **cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
        return
    try:
        tuner[grid](*args, **consts)
    except Exception as e:  # a failed tuning run must not take the fast path down with it
        import warnings

        warnings.warn(f"lorakit: Triton autotuning failed ({type(e).__name__}: {e}); using fixed tile sizes.")
        _TUNING["on"] = False
        fallback()
        return
    best = getattr(tuner, "best_config", None)
    if best is not None:
        _BEST[(kernel, key)] = best


# -- wrappers -------------------------------------------------------------------------------------

def _dropout_args(cols: int, p: float) -> tuple[int, int, float]:
    return (cols + 1) // 2, dropout_threshold(p), 1.0 / (1.0 - p)


def keep_mask(seed: Tensor, rows: int, cols: int, p: float, device: torch.device) -> Tensor:
    """The kernels' keep-mask as a (rows, cols) bool tensor (for tests): where `dropout_apply` keeps a one."""
    return dropout_apply(torch.ones(rows, cols, device=device), seed, p) != 0


def dropout_apply(x2: Tensor, seed: Tensor, p: float) -> Tensor:
    """`functional.seeded_dropout(x2, seed, p)` in one pass (the same mask; a kept value x / (1 - p) is rounded
    once from float32): a new tensor, x2 (M, K) with unit stride in K. The routed Function uses it where the
    dropped input has to exist as a tensor."""
    M, K = x2.shape
    out = torch.empty(M, K, dtype=x2.dtype, device=x2.device)
    half, thresh, inv_keep = _dropout_args(K, p)
    BM, BK = 32, 128
    _launch(_dropout_apply_kernel, (_cdiv(M, BM), _cdiv(K, BK)),
            (x2, out, seed, M, K, x2.stride(0), out.stride(0), half, thresh, inv_keep),
            dict(BM=BM, BK=BK, num_warps=4, num_stages=1))
    return out


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


# Few rows (decode): the fused one-launch kernel serves up to this many; above, the base GEMM is
# compute-bound enough that cuBLAS for it wins.
SMALL_MAX_ROWS = 64
_SMALL_CFGS: dict = {}
_COUNTERS: dict = {}
_OUTGROWN: list = []


def _small_config(M: int, N: int, K: int, device: torch.device) -> dict:
    """Tile sizes for `lora_small`, as the H100 sweep of benchmarks/bench_decode.py found fastest for
    the Llama linears: one row (multiply-add kernel) wants about three programs per SM (column
    blocks x K splits), more rows (tensor-core dots) about one; each program gets at least two BK steps."""
    key = (M == 1, N, K, device)
    c = _SMALL_CFGS.get(key)
    if c is None:
        BN = 16 if N <= 512 else 64
        BK = 128
        split = _small_split(M, _cdiv(N, BN), K, BK, device)
        c = _SMALL_CFGS[key] = {"BN": BN, "BK": BK, "SPLIT": split, "num_warps": 4, "num_stages": 3}
    return c


def _small_split(M: int, blocks: int, K: int, BK: int, device: torch.device) -> int:
    """K splits for `blocks` column blocks: about three programs per SM for one row, one for more rows."""
    sms = _sm_count(device)
    want = (3 * sms + blocks // 2) // blocks if M == 1 else sms // blocks
    return max(1, min(want, K // (2 * BK)))


def _k_chunks(K: int, BK: int, split: int) -> tuple[int, int]:
    """(KC, splits): K cut into at most `split` chunks of KC columns, a multiple of BK, none of them empty."""
    split = max(1, min(split, _cdiv(K, BK)))
    KC = _cdiv(_cdiv(K, split), BK) * BK
    return KC, _cdiv(K, KC)


def _counters(device: torch.device, n: int) -> Tensor:
    """Zeroed int32 tile counters for `lora_small`'s split reduction, one buffer per device and stream
    (every launch leaves them at zero again; two streams must not share them). A buffer outgrown is
    kept alive: a captured CUDA graph may still point into it."""
    key = (device, _stream_handle(device) if device.type == "cuda" else 0)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        if buf is not None:
            _OUTGROWN.append(buf)
        buf = _COUNTERS[key] = torch.zeros(max(n, 16384), dtype=torch.int32, device=device)
    if (device, "compiled") not in _COUNTERS and device.type == "cuda" \
            and not torch.cuda.is_current_stream_capturing():
        _COUNTERS[(device, "compiled")] = torch.zeros(16384, dtype=torch.int32, device=device)
    return buf


def _workspace(device: torch.device, n: int) -> Tensor:
    """A float32 scratch buffer of at least n elements for the split-K partial sums of `SmallPlan` launches,
    one per device and stream, grown as needed. Launches on one stream run one after another, and each
    reads back what it wrote before it ends, so they can share it; a plan keeps the buffer it was made
    with alive."""
    key = (device, _stream_handle(device), "ws")
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        buf = _COUNTERS[key] = torch.empty(max(n, 1 << 16), dtype=torch.float32, device=device)
    return buf


def _stream_handle(device: torch.device) -> int:
    """The current CUDA stream of `device` as its raw handle (what Triton reads for every launch: a
    fraction of the cost of a `torch.cuda.Stream` object). Two live streams never share a handle."""
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is None:  # pragma: no cover - every CUDA build of PyTorch has it
        return torch.cuda.current_stream(device).cuda_stream
    return raw(device.index if device.index is not None else torch.cuda.current_device())


def compiled_counters(device: torch.device, n: int) -> Tensor | None:
    """A zeroed counter buffer for the graphs torch.compile captures, or None. It was made by an eager
    call outside any CUDA graph (a graph may keep pointing into it, but may not allocate it in its own
    pool). Compiled calls replay one after another on one stream, and each leaves it at zero again."""
    buf = _COUNTERS.get((device, "compiled"))
    return buf if buf is not None and buf.numel() >= n else None


def _small_setup(x2: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scale: float,
                 cfg: dict | None = None):
    """(kernel, grid, split, consts, args(out, ws, cnt)) of one `lora_small` launch."""
    M, K = x2.shape
    N = weight.shape[0]
    R = A.shape[0]
    BM = min(_pow2(M), 64)
    c = _small_config(M, N, K, x2.device)
    if cfg:
        c = dict(c, **cfg)
    BK = min(c["BK"], _pow2(K))
    KC, split = _k_chunks(K, BK, c["SPLIT"])
    grid = (_cdiv(N, c["BN"]), split, _cdiv(M, BM))
    if M == 1 and c.get("GEMV", True):
        kernel, consts = _lora_gemv_kernel, dict(SPLIT=split, HAS_BIAS=bias is not None, BN=c["BN"], BK=BK,
                                                 BR=_pow2(R), num_warps=c["num_warps"], num_stages=c["num_stages"])
    else:
        kernel, consts = _lora_small_kernel, dict(
            SPLIT=split, HAS_BIAS=bias is not None, PREC=_prec(x2.dtype), UPCAST=interpreting(), BM=BM, BN=c["BN"],
            BK=BK, BR=_pow2(R), num_warps=c["num_warps"], num_stages=c["num_stages"])
    fixed = (M, N, K, R, float(scale), KC, x2.stride(0), weight.stride(0), weight.stride(1), A.stride(0), B.stride(0),
             N)

    def args(out, ws, cnt):
        return (x2, weight, x2 if bias is None else bias, A, B, out, ws, cnt, *fixed)
    return kernel, grid, split, consts, args


def lora_small(x2: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scale: float,
               cfg: dict | None = None, fresh_counters: bool = False, compiled: bool = False) -> Tensor:
    """y = x2 @ weight.T + bias + scale * (x2 @ A.T) @ B.T as a new (M, N) tensor, in one launch (M small).

    x2 (M, K), A (R, K), B (N, R), bias (N,) or None: unit stride in the last dimension; weight (N, K)
    any strides (a transposed (K, N) weight, as GPT-2's Conv1D keeps it, is read in place). A and B may
    be of another dtype than x2 (float32 adapters): the kernel rounds them to x2's dtype as it reads them,
    the bits of `lora_small(x2, ..., A.to(x2.dtype), B.to(x2.dtype), ...)`. `cfg`
    overrides the tile sizes (benchmarks). `fresh_counters`: zeroed tile counters of the call's own
    (one small fill more) instead of the buffer kept across calls, which torch.compile's CUDA graphs
    refuse when it was allocated in their memory pool. `compiled`: the counters of `compiled_counters`
    where they exist, else fresh ones.
    """
    M, N = x2.shape[0], weight.shape[0]
    if M == 0:
        return torch.empty(0, N, dtype=x2.dtype, device=x2.device)
    kernel, grid, split, consts, args = _small_setup(x2, weight, bias, A, B, scale, cfg)
    out = torch.empty(M, N, dtype=x2.dtype, device=x2.device)
    ws = torch.empty(split, M, N, dtype=torch.float32, device=x2.device) if split > 1 else out
    kept = compiled_counters(x2.device, grid[0] * grid[2]) if compiled and split > 1 else None
    if split == 1:
        cnt = out
    elif kept is not None:
        cnt = kept
    elif fresh_counters or compiled:
        cnt = torch.zeros(grid[0] * grid[2], dtype=torch.int32, device=x2.device)
    else:
        cnt = _counters(x2.device, grid[0] * grid[2])
    _launch(kernel, grid, args(out, ws, cnt), consts)
    return out


class SmallPlan:
    """`lora_small` for one call site (an adapted linear in eager decode), worked out once.

    On the device hosts an eager decode call of an adapted linear took about 90 µs of CPU, against 25 µs
    for the base model's `nn.Linear`: checks and tile arithmetic in `lora_linear` and `lora_small`, two
    allocations and the launch's cache key, every token. A plan keeps what those compute (tile sizes,
    grid, the compiled kernel, a workspace and counters of its own stream) and `__call__` launches the
    kernel directly, with the tensors it is given. It serves only operands of the layout it was made for
    (device, shape, strides, dtype and 16-byte alignment of the input, weight, bias, A and B) and the same
    scale, on the same stream, outside CUDA graph capture; for anything else it returns None and the
    caller takes the general path. It holds no reference to the operands.
    """

    __slots__ = ("shape", "stride", "dtype", "aligned", "index", "layout", "scale", "stream", "device",
                 "out_shape", "grid", "split", "fixed_args", "compiled", "tail", "ws", "cnt")

    def __call__(self, x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor,
                 scale: float) -> Tensor | None:
        if not (scale == self.scale and _fits(self, x) and self.layout == _layout(weight, bias, A, B)):
            return None
        out = torch.empty(self.out_shape, dtype=self.dtype, device=self.device)
        ws, cnt = (self.ws, self.cnt) if self.split > 1 else (out, out)
        _run(self.compiled, self.grid, (x, weight, x if bias is None else bias, A, B, out, ws, cnt, *self.fixed_args,
                                        *self.tail))
        return out

    def __reduce__(self):  # a copied or pickled module gets no plan (it holds a compiled kernel)
        return _none, ()

    def __deepcopy__(self, memo):
        return None


def _fits(plan, x: Tensor) -> bool:
    """Whether a plan's launch serves input x now: x's shape, strides, dtype, 16-byte alignment and device as
    when the plan was made, the same current stream, no CUDA graph capture and no autocast."""
    return (x.shape == plan.shape and x.dtype == plan.dtype and x.stride() == plan.stride
            and (x.data_ptr() & 15 == 0) == plan.aligned and x.get_device() == plan.index
            and _stream_handle(plan.device) == plan.stream and not torch.cuda.is_current_stream_capturing()
            and not torch.is_autocast_enabled("cuda"))


def _plan_for(plan, x: Tensor):
    """Fill the fields `_fits` reads from x and the current stream; returns the plan."""
    plan.shape, plan.stride, plan.dtype, plan.aligned = x.shape, x.stride(), x.dtype, x.data_ptr() & 15 == 0
    plan.device, plan.index, plan.stream = x.device, x.get_device(), _stream_handle(x.device)
    return plan


def _layout(weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor) -> tuple:
    """What a launch is made for besides the input: each operand's device, shape, strides, dtype and 16-byte
    alignment. The launch reads the tensors it is given, so any tensors of this layout are served right."""
    return tuple(None if t is None else (t.get_device(), t.shape, t.stride(), t.dtype, t.data_ptr() & 15 == 0)
                 for t in (weight, bias, A, B))


def _none() -> None:
    return None


def small_plan(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scale: float) -> SmallPlan | None:
    """A `SmallPlan` for calls like `lora_small(x.reshape(-1, in), weight, bias, A, B, scale)`, once that call
    has run (compiled the kernel), or None where the direct launch does not serve (see `_launch`)."""
    if not (_DIRECT["on"] and _RUNTIME and x.is_cuda and x.is_contiguous()):
        return None
    x2 = x.view(-1, x.shape[-1])
    M, N = x2.shape[0], weight.shape[0]
    if M == 0 or torch.cuda.is_current_stream_capturing():
        return None
    kernel, grid, split, consts, args = _small_setup(x2, weight, bias, A, B, scale)
    device = x.device
    ws = _workspace(device, split * M * N) if split > 1 else None
    cnt = _counters(device, grid[0] * grid[2]) if split > 1 else None
    out = torch.empty(M, N, dtype=x.dtype, device=device)
    full = args(out, ws if ws is not None else out, cnt if cnt is not None else out)
    hit = _COMPILED.get(_key(kernel, device, full, consts))
    if hit is None:
        return None
    plan = _plan_for(SmallPlan(), x)
    plan.layout = _layout(weight, bias, A, B)
    plan.scale = scale
    plan.out_shape = (*x.shape[:-1], N)
    plan.grid = grid + (1,) * (3 - len(grid))
    plan.split, plan.ws, plan.cnt = split, ws, cnt
    plan.fixed_args = full[8:]
    plan.compiled, plan.tail = hit
    return plan


def routed_small_ok(x2: Tensor, A_stack: Tensor, B_stack: Tensor, bias: Tensor | None) -> bool:
    """Whether `routed_small` serves this inference call: at most SMALL_MAX_ROWS tokens of float16 / bfloat16
    (tensor-core dots), contiguous stacks, a rank (padded to a power of two) times the row block of at most
    1,024 (the B tile each program gathers), and not under torch.compile."""
    M = x2.shape[0]
    return 0 < M <= SMALL_MAX_ROWS and x2.dtype in (torch.float16, torch.bfloat16) and x2.stride(-1) == 1 \
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


_SM: dict = {}
_ZERO_SEEDS: dict = {}


def _zero_seed(device: torch.device) -> Tensor:
    seed = _ZERO_SEEDS.get(device)
    if seed is None:
        seed = _ZERO_SEEDS[device] = torch.zeros(2, dtype=torch.int64, device=device)
    return seed



def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    if device not in _SM:
        _SM[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SM[device]


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
