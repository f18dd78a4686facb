"""Seeded dropout as a Triton kernel: the keep mask regenerated in registers from the seed (see
`functional.dropout_keep`), shared by the dropout-fused LoRA kernels."""

from __future__ import annotations

import torch
from torch import Tensor

from ...functional import dropout_threshold  # its hash constants (HASH_MUL1, HASH_MUL2) are written out in _keep_tile
from .launch import _cdiv, _launch, tl, triton


if triton is not None:

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
