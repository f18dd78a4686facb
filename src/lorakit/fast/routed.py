"""Per-example adapters in one batch: batch row b uses adapter rows[b] (-1: base only).

    y[b] = x[b] @ W.T + bias + scales[a] * (x[b] @ A_a.T) @ B_a.T,   a = rows[b] >= 0

Adapters are stacked, zero-padded to the largest rank R: A_stack (n, R, in), B_stack
(n, out, R). Padding changes nothing (the padded rows of A and columns of B are zero, and
so are their gradients), and lets one kernel serve any mix of ranks. `stack_adapters` does
it with differentiable ops, so gradients reach each A_i and B_i; a caller that serves many
batches (inference) can stack once and pass the stacks.

Dropout (training): one mask on x, a pure function of a seed (`functional.dropout_keep`), applied before
each row's A; backward regenerates it from the seed instead of keeping it.

Two paths compute the same function:
  * CUDA + Triton: SGMV/BGMV-style kernels (`_triton.routed_mm`, `routed_outer`): each
    program takes a block of one batch row's tokens, reads the row's adapter index on the
    device and multiplies by that adapter's matrices. No host sync, no gather of x.
    Hand-written backward: saves x, rows and the small xa (tokens, R). Inference on few
    tokens (decode) takes `_triton.routed_small` instead: a shrink split over K, then the
    base product with each row's expand in its epilogue (two launches, not three).
  * elsewhere: per-row gather of the stacks and batched matmuls, differentiated by autograd.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import triton as _triton
from ..functional import dropout_seed, seeded_dropout
from .ops import _check_p


def stack_adapters(As: Sequence[Tensor], Bs: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """(A_stack (n, R, in), B_stack (n, out, R)), zero-padded to the largest rank R; differentiable."""
    R = max(A.shape[0] for A in As)
    if all(A.shape[0] == R for A in As):
        return torch.stack(list(As)), torch.stack(list(Bs))
    A_stack = torch.stack([F.pad(A, (0, 0, 0, R - A.shape[0])) for A in As])
    B_stack = torch.stack([F.pad(B, (0, R - B.shape[1])) for B in Bs])
    return A_stack, B_stack


def _routed_forward_triton(x2, rows, weight, bias, A_stack, B_stack, scales, seed=None, p=0.0) -> tuple[Tensor, Tensor]:
    """(y2, xa): the base GEMM, then the shrink (dropout(x) -> xa, (tokens, R)) and expand (y += s * xa @ B.T)
    kernels. With a seed, dropout(x) is a temporary of this call (backward makes it again)."""
    n, R, in_f = A_stack.shape
    out_f = B_stack.shape[1]
    # Rows routed to no adapter (-1) are left unwritten in xa, and every reader skips them too.
    xa = torch.empty(x2.shape[0], R, dtype=x2.dtype, device=x2.device)
    _triton.routed_mm(x2 if seed is None else _triton.dropout_apply(x2, seed, p), A_stack, (R * in_f, 1, in_f), R,
                      rows, None, xa, accumulate=False)
    y = F.linear(x2, weight, bias)
    _triton.routed_mm(xa, B_stack, (out_f * R, 1, R), out_f, rows, scales, y, accumulate=True)
    return y, xa


class RoutedLoraFunction(torch.autograd.Function):
    """apply(x2, rows, weight, bias, A_stack, B_stack, scales, seed, p) -> y2 (Triton path, x2 is (batch*T, in);
    seed None: no dropout)."""

    @staticmethod
    def forward(ctx, x2, rows, weight, bias, A_stack, B_stack, scales, seed, p):
        y, xa = _routed_forward_triton(x2, rows, weight, bias, A_stack, B_stack, scales, seed, p)
        ctx.bias_grad = bias is not None and bias.requires_grad
        ctx.p = p
        ctx.save_for_backward(x2, rows, weight, A_stack, B_stack, scales, xa, seed)
        return y

    @staticmethod
    def backward(ctx, gy):
        x2, rows, weight, A_stack, B_stack, scales, xa, seed = ctx.saved_tensors
        need = ctx.needs_input_grad
        n, R, in_f = A_stack.shape
        out_f = B_stack.shape[1]
        gy = gy.contiguous()
        gx = gW = gb = gA = gB = None
        # gxa = s_a * gy @ B_a, per token (zero for base-only rows).
        gxa = torch.zeros(x2.shape[0], R, dtype=x2.dtype, device=x2.device)
        _triton.routed_mm(gy, B_stack, (out_f * R, R, 1), R, rows, scales, gxa, accumulate=False)
        if need[0]:
            gx = gy @ weight
            if seed is None:
                _triton.routed_mm(gxa, A_stack, (R * in_f, in_f, 1), in_f, rows, None, gx, accumulate=True)
            else:  # the LoRA term goes through the same mask as x did
                gl = torch.zeros_like(gx)
                _triton.routed_mm(gxa, A_stack, (R * in_f, in_f, 1), in_f, rows, None, gl, accumulate=True)
                gx += _triton.dropout_apply(gl, seed, ctx.p)
        if need[2]:
            gW = gy.t() @ x2
        if ctx.bias_grad:
            gb = gy.sum(0)
        # Per-row partial sums, then summed into their adapters (-1 rows go to a dropped extra slot).
        slot = torch.where(rows >= 0, rows, n)
        if need[4]:
            xd = x2 if seed is None else _triton.dropout_apply(x2, seed, ctx.p)  # what A saw
            parts = _triton.routed_outer(gxa, xd, rows)  # (batch, R, in)
            gA = torch.zeros(n + 1, R, in_f, dtype=torch.float32, device=x2.device).index_add_(0, slot, parts)[:n]
            gA = gA.to(A_stack.dtype)
        if need[5]:
            parts = _triton.routed_outer(gy, xa, rows)  # (batch, out, R)
            gB = torch.zeros(n + 1, out_f, R, dtype=torch.float32, device=x2.device).index_add_(0, slot, parts)[:n]
            gB = (gB * scales.view(n, 1, 1)).to(B_stack.dtype)
        return gx, None, gW, gb, gA, gB, None, None, None


def _routed_torch(x3: Tensor, rows: Tensor, weight: Tensor, bias: Tensor | None, A_stack: Tensor, B_stack: Tensor,
                  scales: Tensor, seed: Tensor | None = None, p: float = 0.0) -> Tensor:
    # x3 (batch, T, in). Gather each row's adapter (a BGMV in batched matmuls); -1 rows get a zero factor.
    idx = rows.clamp(min=0)
    on = (rows >= 0).to(x3.dtype) * scales.to(x3.dtype)[idx]
    xd = x3 if seed is None else seeded_dropout(x3.reshape(-1, x3.shape[-1]), seed, p).view(x3.shape)
    xa = torch.bmm(xd, A_stack[idx].transpose(1, 2))                            # (batch, T, R)
    delta = torch.bmm(xa, B_stack[idx].transpose(1, 2)) * on.view(-1, 1, 1)    # (batch, T, out)
    return F.linear(x3, weight, bias) + delta


def lora_linear_routed(x: Tensor, weight: Tensor, bias: Tensor | None, As: Sequence[Tensor] | Tensor,
                       Bs: Sequence[Tensor] | Tensor, scales: Sequence[float] | Tensor, rows: Tensor,
                       backend: str = "auto", dropout: float = 0.0, training: bool = False,
                       seed: Tensor | None = None) -> Tensor:
    """Per-example adapters: rows[b] indexes As/Bs for batch row b of x (x is (batch, ..., in)); -1 = base only.

    As/Bs: lists of A_i (r_i, in) and B_i (out, r_i), ranks may differ; or already stacked
    (A_stack (n, R, in), B_stack (n, out, R), see `stack_adapters`). scales: floats or an (n,)
    tensor. Gradients for x and every A_i, B_i (and weight / bias if they require grad).
    Dropout applies to x before A when `training` and `dropout > 0`, one mask for every row, a
    function of `seed` ((2,) int64, default: a fresh one; see `functional.dropout_keep` for x as
    (tokens, in)).

    Raises:
        ValueError: rows of the wrong length, an index outside [-1, n), shapes that do not fit, or a dropout
            outside [0, 1).
    """
    if isinstance(As, Tensor) and As.dim() == 3:
        A_stack, B_stack = As, Bs
    else:
        A_stack, B_stack = stack_adapters(As, Bs)
    n, R, in_f = A_stack.shape
    batch = x.shape[0]
    out_f = weight.shape[0]
    if x.dim() < 2 or x.shape[-1] != in_f or weight.shape[1] != in_f or B_stack.shape != (n, out_f, R):
        raise ValueError(f"lora_linear_routed: shapes do not fit: x {tuple(x.shape)} (batch, ..., in), weight "
                         f"{tuple(weight.shape)} (out, in), adapters A {tuple(A_stack.shape)} (n, r, in), "
                         f"B {tuple(B_stack.shape)} (n, out, r).")
    if rows.shape != (batch,):
        raise ValueError(f"lora_linear_routed: rows has shape {tuple(rows.shape)}; expected ({batch},), "
                         "one adapter index (or -1) per batch row of x.")
    if not torch.compiler.is_compiling() and rows.device.type == "cpu" and rows.numel() \
            and (int(rows.min()) < -1 or int(rows.max()) >= n):
        raise ValueError(f"lora_linear_routed: rows must lie in [-1, {n}); got {rows.tolist()}.")
    rows = rows.to(device=x.device, dtype=torch.int64)
    if not isinstance(scales, Tensor):
        scales = torch.tensor([float(s) for s in scales], dtype=torch.float32, device=x.device)
    scales = scales.to(device=x.device, dtype=torch.float32)
    use_triton = backend != "torch" and _triton.available_for(x) and x.dtype in _TRITON_DTYPES
    if backend == "triton" and not use_triton:
        raise RuntimeError("backend='triton' needs Triton and a CUDA tensor (or TRITON_INTERPRET=1 on CPU).")
    _check_p(dropout, "lora_linear_routed")
    if training and dropout > 0:
        seed = dropout_seed(x.device) if seed is None else seed.to(device=x.device, dtype=torch.int64)
    else:
        seed = None
    return routed_prepared(x, weight, bias, A_stack.contiguous(), B_stack.contiguous(), scales, rows, use_triton,
                           seed, float(dropout))


_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def routed_prepared(x: Tensor, weight: Tensor, bias: Tensor | None, A_stack: Tensor, B_stack: Tensor,
                    scales: Tensor, rows: Tensor, use_triton: bool | None = None, seed: Tensor | None = None,
                    p: float = 0.0) -> Tensor:
    """`lora_linear_routed` for inputs already checked: contiguous stacks, float32 scales and int64 rows
    on x's device, the dropout seed on x's device (None: no dropout). The serving path of `lk.route`
    calls this directly, with stacks built once."""
    in_f = x.shape[-1]
    out_f = weight.shape[0]
    dtype = x.dtype
    if use_triton is None:
        use_triton = _triton.available_for(x) and dtype in _TRITON_DTYPES
    if weight.dtype != dtype:
        weight = weight.to(dtype)
    if A_stack.dtype != dtype:
        A_stack, B_stack = A_stack.to(dtype), B_stack.to(dtype)
    if bias is not None and bias.dtype != dtype:
        bias = bias.to(dtype)
    x3 = x.reshape(x.shape[0], -1, in_f)
    if not use_triton:
        return _routed_torch(x3, rows, weight, bias, A_stack, B_stack, scales, seed, p).view(*x.shape[:-1], out_f)
    x2 = x3.reshape(-1, in_f)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if not torch.is_grad_enabled() or not (x2.requires_grad or weight.requires_grad or A_stack.requires_grad
                                           or B_stack.requires_grad or (bias is not None and bias.requires_grad)):
        if seed is None and _triton.routed_small_ok(x2, A_stack, B_stack, bias):  # decode: two launches, not three
            y = _triton.routed_small(x2, weight, bias, A_stack, B_stack, scales, rows)
        else:
            y = _routed_forward_triton(x2, rows, weight, bias, A_stack, B_stack, scales, seed, p)[0]
    else:
        y = RoutedLoraFunction.apply(x2, rows, weight, bias, A_stack, B_stack, scales, seed, p)
    return y.view(*x.shape[:-1], out_f)
