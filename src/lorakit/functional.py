"""Pure tensor math of LoRA: the update, its merge into a weight, and the exact unmerge.

One definition of "what LoRA computes", shared by the layers, the offline merge and the
fast kernels. Shapes follow nn.Linear: A is (r, in), B is (out, r), and the update of a
weight W (out, in) is dW = scale * B @ A.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    """

    index: Tensor  # (k,) int64 flat positions where round(round(W0 + d) - d) != W0
    values: Tensor  # (k,) the original W0 entries at those positions, in W0's dtype


def _bits(t: Tensor) -> Tensor:
    """The raw bit pattern of a float tensor, so that -0.0 != 0.0 and NaNs compare by payload."""
    return t.view(_INT_VIEW[t.dtype]) if t.dtype in _INT_VIEW else t


def merge_exact(weight: Tensor, delta: Tensor) -> Restore:
    """Add `delta` (float32) to `weight` in place, rounding once into weight's dtype.

    Returns the `Restore` record that lets `unmerge_exact` give back the original weight
    bit-exactly, however many merge/unmerge cycles follow.

    Raises:
        FloatingPointError: the sum holds inf or NaN where `weight` was finite (it overflows the
            dtype, e.g. float16 beyond 65504); `weight` is left unchanged.
    """
    with torch.no_grad():
        merged = (weight.float() + delta).to(weight.dtype)
        if not torch.isfinite(merged).all() and (torch.isfinite(weight) & ~torch.isfinite(merged)).any():
            raise FloatingPointError("the merged weight overflows its dtype")
        undone = (merged.float() - delta).to(weight.dtype)
        wrong = (_bits(undone) != _bits(weight)).reshape(-1)
        index = wrong.nonzero().squeeze(1)
        values = weight.reshape(-1)[index].clone()
        weight.copy_(merged)
    return Restore(index=index, values=values)


def unmerge_exact(weight: Tensor, delta: Tensor, restore: Restore) -> None:
    """Undo `merge_exact` in place: `weight` becomes the pre-merge tensor, bit for bit.

    `delta` must be the very tensor (or a bit-identical recomputation) that was merged.
    """
    with torch.no_grad():
        undone = (weight.float() - delta).to(weight.dtype)
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
