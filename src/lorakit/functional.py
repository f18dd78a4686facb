"""Pure tensor math of LoRA: the update, its merge into a weight, the exact unmerge, and the
adapted linear in each form the fast path computes (one adapter, several summed, routed per
example, dropout as a function of a seed and the element's position), and DoRA (a learned magnitude
per output row times the row-normalized W + dW).

One definition of "what LoRA computes", shared by the layers, the offline merge and the
fast kernels (`lorakit.fast`), which are tested against these functions. Shapes follow
nn.Linear: A is (r, in), B is (out, r), and the update of a weight W (out, in) is
dW = scale * B @ A.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

_INT_VIEW = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
}


def lora_delta_out(x: Tensor, A: Tensor, B: Tensor, scale: float) -> Tensor:
    """The adapter's contribution to a linear layer's output: scale * (x @ A.T) @ B.T.

    x (..., in), A (r, in), B (out, r) -> (..., out). Dropout, if any, is applied to x by the caller.
    """
    return F.linear(F.linear(x, A), B) * scale


def delta_weight(A: Tensor, B: Tensor, scale: float) -> Tensor:
    """dW = scale * B @ A in float32, shape (out, in) (or (out, in, *kernel) for convolutions).

    A (r, in) or (r, in, *kernel) and B (out, r) or (out, r, 1, ...): the convolution case is
    a kernel-sized A followed by a 1x1 B, whose composition is the single kernel B @ A.
    """
    a = A.detach().float()
    b = B.detach().float().reshape(B.shape[0], -1)
    return (b @ a.reshape(a.shape[0], -1)).mul_(scale).reshape(B.shape[0], *a.shape[1:])


@dataclass
class Restore:
    """What `unmerge_exact` needs beyond the merged weight to give back W0 bit for bit.

    Subtracting the delta again in float32 and rounding undoes most of the merge; the few
    elements where two roundings do not cancel are kept here (flat indices and their W0 values).
    A DoRA merge (`factor` given) is undone as round(W / factor - d), with the same kind of record.
    """

    index: Tensor  # (k,) int64 flat positions where round(round(W0 + d) - d) != W0
    values: Tensor  # (k,) the original W0 entries at those positions, in W0's dtype


def _bits(t: Tensor) -> Tensor:
    """The raw bit pattern of a float tensor, so that -0.0 != 0.0 and NaNs compare by payload."""
    return t.view(_INT_VIEW[t.dtype]) if t.dtype in _INT_VIEW else t


def merge_exact(weight: Tensor, delta: Tensor, factor: Tensor | None = None) -> Restore:
    """Add `delta` (float32) to `weight` in place, rounding once into weight's dtype; with `factor`
    (DoRA, float32, broadcast against weight) the weight becomes round(factor * (weight + delta)).

    Returns the `Restore` record that lets `unmerge_exact` give back the original weight
    bit-exactly, however many merge/unmerge cycles follow.

    Raises:
        FloatingPointError: the result holds inf or NaN where `weight` was finite (it overflows the
            dtype, e.g. float16 beyond 65504); `weight` is left unchanged.
    """
    with torch.no_grad():
        summed = weight.float() + delta
        merged = (summed if factor is None else summed.mul_(factor)).to(weight.dtype)
        if not torch.isfinite(merged).all() and (torch.isfinite(weight) & ~torch.isfinite(merged)).any():
            raise FloatingPointError("the merged weight overflows its dtype")
        undone = _undo(merged, delta, factor)
        wrong = (_bits(undone) != _bits(weight)).reshape(-1)
        index = wrong.nonzero().squeeze(1)
        values = weight.reshape(-1)[index].clone()
        weight.copy_(merged)
    return Restore(index=index, values=values)


def _undo(merged: Tensor, delta: Tensor, factor: Tensor | None) -> Tensor:
    """round(merged - delta), or round(merged / factor - delta) for a DoRA merge: right but for a few elements."""
    m = merged.float()  # `merged` itself for a float32 weight: no in-place ops on it
    return ((m if factor is None else m / factor) - delta).to(merged.dtype)


def unmerge_exact(weight: Tensor, delta: Tensor, restore: Restore, factor: Tensor | None = None) -> None:
    """Undo `merge_exact` in place: `weight` becomes the pre-merge tensor, bit for bit.

    `delta` and `factor` must be the very tensors (or bit-identical recomputations) that were merged.
    """
    with torch.no_grad():
        undone = _undo(weight, delta, factor).contiguous()
        undone.view(-1)[restore.index] = restore.values
        weight.copy_(undone)


def pissa_factors(weight: Tensor, r: int, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """PiSSA initialization (Meng et al. 2024): A, B from the top-r SVD of W, and the residual.

    weight (out, in). Returns (A (r, in), B (out, r), residual (out, in)) in float32 with
    scale * B @ A + residual == W up to float32 rounding, so the model's output is unchanged.
    """
    w = weight.detach().float()
    U, S, Vh = torch.linalg.svd(w, full_matrices=False)
    root = (S[:r] / scale).sqrt()
    A = root[:, None] * Vh[:r]
    B = U[:, :r] * root[None, :]
    residual = w - scale * (B @ A)
    return A, B, residual


# -- dropout as a pure function of (seed, row, column) ---------------------------------------------
# The fast path keeps a seed (two int64 numbers) instead of a mask and regenerates the mask in
# backward. The mask is a counter-based hash, computed identically by `dropout_keep` (PyTorch
# integer ops, any device) and by the Triton kernels (`lorakit.fast.triton`):
#
#     pair   j = (row * ceil(cols / 2) + col // 2)  mod 2**32
#     h      = lowbias32((j * (seed[1] | 1) + seed[0])  mod 2**32)
#     u      = low 16 bits of h for even columns, high 16 bits for odd columns
#     keep   = u >= round(p * 65536)
#
# `lowbias32` is a 32-bit integer finalizer (xorshift-multiply, C. Wellons' constants). One hash feeds
# two elements. The drop probability is quantized to 1/65536 and kept values are scaled by 1 / (1 - p),
# as `torch.nn.functional.dropout` does. An input (..., cols) counts its rows as x.reshape(-1, cols).

_M32 = 0xFFFFFFFF
HASH_MUL1 = 0x7FEB352D
HASH_MUL2 = 0x846CA68B


def dropout_threshold(p: float) -> int:
    """The 16-bit threshold of drop probability p: an element is kept when its 16 random bits are >= this."""
    return min(65536, max(0, int(round(p * 65536.0))))


def dropout_seed(device: torch.device | str) -> Tensor:
    """A fresh seed, (2,) int64 in [0, 2**32), drawn from the device's default generator.

    Drawn on the device (no host sync, traceable by torch.compile) and from the generator that
    `torch.utils.checkpoint` saves and restores, so a recomputed forward draws the same mask.
    """
    return torch.randint(0, 2**32, (2,), dtype=torch.int64, device=device)


def _lowbias32(h: Tensor) -> Tensor:
    # h holds values in [0, 2**32) in int64; products wrap in int64 but their low 32 bits are right.
    h = h ^ (h >> 16)
    h = (h * HASH_MUL1) & _M32
    h = h ^ (h >> 15)
    h = (h * HASH_MUL2) & _M32
    return h ^ (h >> 16)


def dropout_keep(seed: Tensor, rows: int, cols: int, p: float, device: torch.device | str | None = None) -> Tensor:
    """The (rows, cols) bool keep-mask of seed (2,) int64 and drop probability p (see the formula above)."""
    device = seed.device if device is None else torch.device(device)
    seed = seed.to(device=device, dtype=torch.int64)
    half = (cols + 1) // 2
    r = torch.arange(rows, dtype=torch.int64, device=device)
    c = torch.arange(cols, dtype=torch.int64, device=device)
    j = (r[:, None] * half + (c >> 1)[None, :]) & _M32
    h = _lowbias32((j * (seed[1] | 1) + seed[0]) & _M32)
    u = (h >> ((c & 1) * 16)[None, :]) & 0xFFFF
    return u >= dropout_threshold(p)


def seeded_dropout(x: Tensor, seed: Tensor | None, p: float) -> Tensor:
    """dropout(x) with the mask `dropout_keep(seed, ...)` over x as (-1, cols); x itself when seed is None
    or p == 0. A new tensor; x is untouched."""
    if seed is None or p == 0:
        return x
    cols = x.shape[-1]
    keep = dropout_keep(seed, x.numel() // cols if cols else 0, cols, p, x.device).view(x.shape)
    return x * keep.to(x.dtype) * (1.0 / (1.0 - p))


# -- the adapted linear ---------------------------------------------------------------------------
def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scale: float,
                dropout: float = 0.0, seed: Tensor | None = None) -> Tensor:
    """y = F.linear(x, weight, bias) + scale * (dropout(x) @ A.T) @ B.T.

    x (..., in), weight (out, in), bias (out,) or None, A (r, in), B (out, r). Dropout applies when
    `seed` is given and dropout > 0, with the mask `dropout_keep(seed, ...)`. Differentiated by autograd.
    """
    return F.linear(x, weight, bias) + lora_delta_out(seeded_dropout(x, seed, dropout), A, B, scale)


def lora_linear_multi(x: Tensor, weight: Tensor, bias: Tensor | None, As: Sequence[Tensor], Bs: Sequence[Tensor],
                      scales: Sequence[float], dropouts: Sequence[float] | float = 0.0,
                      seeds: Sequence[Tensor | None] | None = None) -> Tensor:
    """Several adapters on one linear, summed: F.linear(x, weight, bias) + sum_k lora_delta_out(dropout_k(x), ...).

    Adapter k drops out with probability dropouts[k] and mask `dropout_keep(seeds[k], ...)` (None: no dropout).
    """
    n = len(As)
    ps = [float(dropouts)] * n if isinstance(dropouts, (int, float)) else list(dropouts)
    seeds = list(seeds) if seeds is not None else [None] * n
    y = F.linear(x, weight, bias)
    for A, B, s, p, seed in zip(As, Bs, scales, ps, seeds):
        y = y + lora_delta_out(seeded_dropout(x, seed, p), A, B, s)
    return y


def lora_linear_routed(x: Tensor, weight: Tensor, bias: Tensor | None, As: Sequence[Tensor], Bs: Sequence[Tensor],
                       scales: Sequence[float], rows: Tensor, dropout: float = 0.0,
                       seed: Tensor | None = None) -> Tensor:
    """Per-example adapters: batch row b of x (batch, ..., in) gets adapter rows[b]; rows[b] = -1: the base only.

    Dropout (with `seed`) is one mask over the whole of x, as `seeded_dropout(x, seed, dropout)`.
    """
    xd = seeded_dropout(x, seed, dropout)
    ys = []
    for b in range(x.shape[0]):
        a = int(rows[b])
        yb = F.linear(x[b], weight, bias)
        if a >= 0:
            yb = yb + lora_delta_out(xd[b], As[a], Bs[a], scales[a])
        ys.append(yb)
    return torch.stack(ys, 0)


# -- DoRA (Liu et al. 2024): a learned magnitude per output row times the direction of W + dW -------------
def dora_weight_norm(weight: Tensor, A: Tensor, B: Tensor, scale: float) -> Tensor:
    """||W + scale * B @ A|| over each output row, (out,), in float32 (float64 for a float64 weight), no autograd.

    weight (out, in[, *kernel]) (an embedding's weight transposed: (dim, num)); A, B as `delta_weight` takes them.
    DoRA treats this norm as a constant (the paper's section 4.3, as PEFT does): no gradient flows through it.
    """
    with torch.no_grad():
        dt = torch.promote_types(weight.dtype, torch.float32)
        w = weight.detach().to(dt).reshape(weight.shape[0], -1)
        b, a = B.detach().to(dt).reshape(B.shape[0], -1), A.detach().to(dt).reshape(A.shape[0], -1)
        return torch.linalg.vector_norm(torch.addmm(w, b, a, alpha=scale), dim=1)


def dora_factor(magnitude: Tensor, norm: Tensor, dtype: torch.dtype) -> Tensor:
    """f = magnitude / norm (out,) in `dtype`, differentiable in the magnitude (the norm is a constant)."""
    return (magnitude.reshape(-1).to(norm.dtype) / norm).to(dtype)


def dora_delta_out(x: Tensor, weight: Tensor, A: Tensor, B: Tensor, scale: float, factor: Tensor) -> Tensor:
    """A DoRA adapter's contribution to a linear's output (PEFT's formula):
    (f - 1) * x @ W.T + f * scale * (x @ A.T) @ B.T.

    x (..., in) is the adapter's input (after its dropout), weight (out, in), factor f (out,) (`dora_factor`).
    Added to the base output F.linear(x_undropped, W, b), it gives f * (x @ (W + scale * B @ A).T) + b
    without dropout: the row-normalized W + dW, rescaled by the learned magnitude.
    """
    return (factor - 1) * F.linear(x, weight) + factor * lora_delta_out(x, A, B, scale)


def dora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scale: float,
                magnitude: Tensor, dropout: float = 0.0, seed: Tensor | None = None) -> Tensor:
    """DoRA on a linear: F.linear(x, W, b) + dora_delta_out(dropout(x), ...) with f = magnitude / ||W + scale * B @ A||.

    x (..., in), weight (out, in), bias (out,) or None, A (r, in), B (out, r), magnitude (out,). Dropout as in
    `lora_linear`; the base term sees x itself. Differentiated by autograd (the norm held constant).
    """
    f = dora_factor(magnitude, dora_weight_norm(weight, A, B, scale), x.dtype)
    return F.linear(x, weight, bias) + dora_delta_out(seeded_dropout(x, seed, dropout), weight, A, B, scale, f)
