"""Dropout masks that are a pure function of (seed, row, column): regenerated in backward, never stored.

The fast LoRA path applies dropout to the input x of A. Storing the mask (or the dropped
copy of x) for backward costs as much memory as x itself; instead each call draws a seed,
keeps it (two int64 numbers), and the backward recomputes the very same mask from it.

The mask is a counter-based hash, defined identically here (PyTorch integer ops, any
device) and in the Triton kernels (`_triton.py`), so both give bit-identical masks:

    pair   j = (row * ceil(cols / 2) + col // 2)  mod 2**32
    h      = lowbias32((j * (seed[1] | 1) + seed[0])  mod 2**32)
    u      = low 16 bits of h for even columns, high 16 bits for odd columns
    keep   = u >= round(p * 65536)

`lowbias32` is a 32-bit integer finalizer (xorshift-multiply, C. Wellons' constants). One
hash feeds two elements, so the mask costs a handful of integer operations per element.
The drop probability is quantized to 1/65536 (p = 0.05 drops with probability 0.0500031)
and the kept values are scaled by 1 / (1 - p), as `torch.nn.functional.dropout` does. The
pattern repeats after 2**33 elements of one input, far beyond any activation.
"""

from __future__ import annotations

import torch
from torch import Tensor

_M32 = 0xFFFFFFFF
MUL1 = 0x7FEB352D
MUL2 = 0x846CA68B


def threshold(p: float) -> int:
    """The 16-bit threshold: an element is kept when its 16 random bits are >= this."""
    return min(65536, max(0, int(round(p * 65536.0))))


def new_seed(device: torch.device | str) -> Tensor:
    """A fresh seed, (2,) int64 in [0, 2**32), drawn from the device's default generator.

    Drawn on the device (no host sync, traceable by torch.compile) and from the generator
    that `torch.utils.checkpoint` saves and restores, so a recomputed forward sees the same
    seed and therefore the same mask.
    """
    return torch.randint(0, 2**32, (2,), dtype=torch.int64, device=device)


def _lowbias32(h: Tensor) -> Tensor:
    # h holds values in [0, 2**32) in int64; products wrap in int64 but their low 32 bits are right.
    h = h ^ (h >> 16)
    h = (h * MUL1) & _M32
    h = h ^ (h >> 15)
    h = (h * MUL2) & _M32
    return h ^ (h >> 16)


def keep_mask(seed: Tensor, rows: int, cols: int, p: float, device: torch.device | str | None = None) -> Tensor:
    """The (rows, cols) bool keep-mask that the fast path uses for a 2-D input (rows, cols).

    A 3-D input (b, t, cols) uses rows = b * t. Tests build references from this mask.
    """
    device = seed.device if device is None else torch.device(device)
    seed = seed.to(device=device, dtype=torch.int64)
    half = (cols + 1) // 2
    r = torch.arange(rows, dtype=torch.int64, device=device)
    c = torch.arange(cols, dtype=torch.int64, device=device)
    j = (r[:, None] * half + (c >> 1)[None, :]) & _M32
    h = _lowbias32((j * (seed[1] | 1) + seed[0]) & _M32)
    u = (h >> ((c & 1) * 16)[None, :]) & 0xFFFF
    return u >= threshold(p)


def apply_dropout(x2: Tensor, seed: Tensor, p: float) -> Tensor:
    """dropout(x2) for a 2-D x2 with the mask of `keep_mask` (a new tensor; x2 is untouched)."""
    keep = keep_mask(seed, x2.shape[0], x2.shape[1], p, x2.device)
    return x2 * keep.to(x2.dtype) * (1.0 / (1.0 - p))
