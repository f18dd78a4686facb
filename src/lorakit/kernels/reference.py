"""Plain PyTorch definitions of what the fast path computes: always correct, differentiated by autograd.

These are the specification the fused Functions and kernels are tested against.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def reference_lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scale: float,
                          dropout: float = 0.0, training: bool = False, keep: Tensor | None = None) -> Tensor:
    """y = F.linear(x, weight, bias) + scale * (dropout(x) @ A.T) @ B.T.

    `keep` (bool, broadcastable to x) fixes the dropout mask, so a reference can reproduce the
    fast path's mask exactly; without it dropout is `F.dropout`.
    """
    xd = x
    if training and dropout > 0:
        xd = x * keep.to(x.dtype) / (1.0 - dropout) if keep is not None else F.dropout(x, dropout, True)
    return F.linear(x, weight, bias) + scale * ((xd @ A.t()) @ B.t())


def reference_lora_linear_multi(x: Tensor, weight: Tensor, bias: Tensor | None, As: Sequence[Tensor],
                                Bs: Sequence[Tensor], scales: Sequence[float], dropouts: Sequence[float] | float = 0.0,
                                training: bool = False, keeps: Sequence[Tensor | None] | None = None) -> Tensor:
    """y = F.linear(x, weight, bias) + sum_k scales[k] * (dropout_k(x) @ As[k].T) @ Bs[k].T."""
    n = len(As)
    ps = [float(dropouts)] * n if isinstance(dropouts, (int, float)) else list(dropouts)
    keeps = list(keeps) if keeps is not None else [None] * n
    y = F.linear(x, weight, bias)
    for A, B, s, p, keep in zip(As, Bs, scales, ps, keeps):
        y = y + (reference_lora_linear(x, weight, None, A, B, s, p, training, keep) - F.linear(x, weight))
    return y


def reference_lora_linear_routed(x: Tensor, weight: Tensor, bias: Tensor | None, As: Sequence[Tensor],
                                 Bs: Sequence[Tensor], scales: Sequence[float], rows: Tensor, dropout: float = 0.0,
                                 keep: Tensor | None = None) -> Tensor:
    """Batch row b of x (x is (batch, ..., in)) gets adapter rows[b]; rows[b] = -1 means the base only.

    `keep` (bool, x's shape) with `dropout`: the dropout mask on x before A."""
    ys = []
    xd = x if keep is None else x * keep.to(x.dtype) / (1.0 - dropout)
    for b in range(x.shape[0]):
        a = int(rows[b])
        xb = x[b]
        yb = F.linear(xb, weight, bias)
        if a >= 0:
            yb = yb + scales[a] * ((xd[b] @ As[a].t()) @ Bs[a].t())
        ys.append(yb)
    return torch.stack(ys, 0)
