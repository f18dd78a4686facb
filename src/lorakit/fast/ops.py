"""The fused LoRA linear: one autograd Function for a frozen linear plus its LoRA terms.

    y_j = x @ W_j.T + b_j + sum over terms t of output j:  s_t * (dropout_g(t)(x) @ A_t.T) @ B_t.T

One input x feeds one or more frozen linears j (q, k and v read the same x) and one or more
LoRA terms t (several adapters on one linear). Terms are put in dropout groups g: the terms
of a group share one mask on x, so a group's A's are concatenated and x is read once for all
of them. `lora_linear` (one linear, one term) and `lora_linear_group` (linears sharing x, one term each) take
the leaner `LoraLinearGroup`, whose backward is a sequence of named steps (`STEPS`).

What autograd would do with the plain formula, and what this does instead:
  * saved for backward: x (the same storage the caller holds, so q/k/v share it), the small
    xa = dropout(x) @ A.T (..., r) per group and a 2-number seed per group. Never a mask,
    never dropout(x), never the (..., out) LoRA output.
  * the dropout mask is regenerated in backward from the seed (`functional.dropout_keep`); on CUDA the
    Triton kernels make it in registers, so dropout(x) is not even written in forward.
  * no weight gradient for frozen W. The small LoRA terms are computed first (output y and
    input-gradient gx alike) and the large base GEMM adds onto them in place (`addmm_`), which
    reads them in its epilogue: one memory-bound pass over y or gx fewer than adding them last.
    On Hopper GPUs, from 1,024 rows, the forward is instead one Triton GEMM per group of linears whose
    K loop ends with the LoRA product (`_triton.expand_gemm`): no LoRA output is written or read
    back. Elsewhere, without dropout and with many rows (rows > 1.5 * in), the forward runs one GEMM
    on W + s * B @ A formed in a scratch weight. Backward is the same either way.
  * with `recompute=(fn, tensors)` (see `FastState.mark`) not even x is kept: backward
    rebuilds it as fn(*tensors) from tensors that the ops which made x keep anyway. For an
    RMSNorm output (`rms_norm_apply`) or a product (`torch.mul`) the Triton backward rebuilds
    x tile by tile in registers, bit for bit, so x is never written to memory at all.

On the Triton path the backward reads each g_j once for both gxa_t and dB_t, for all the linears of a
group in one launch (`_triton.lora_grads_group`).

Backward, with g_j = dL/dy_j:
    gxa_t = s_t * g_j @ B_t                    (..., r)
    dB_t  = s_t * g_j.T @ xa_t                 (out, r)
    dA_g  = gxa_g.T @ dropout(x)               (r_g, in)  gxa_g: the group's gxa_t side by side
    dx    = sum_j g_j @ W_j + sum_g dropout'(gxa_g @ A_g)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import triton as _triton
from ..functional import dropout_keep, dropout_seed, seeded_dropout


@dataclass(frozen=True)
class _Plan:
    """Static structure of one call (hashable, so torch.compile treats it as a constant)."""

    n_out: int                            # frozen linears reading x
    term_out: tuple[int, ...]             # output index of each LoRA term
    term_scale: tuple[float, ...]
    groups: tuple[tuple[int, ...], ...]   # term indices of each dropout group, in A-concatenation order
    group_p: tuple[float, ...]            # dropout probability per group (0 = none)
    backend: str                          # "triton" or "torch"
    recompute: Callable | None = None     # x == recompute(*saved recipe tensors), bit for bit
    recompute_cast: torch.dtype | None = None  # the dtype x was cast to (autocast) after recompute's op


def _use_triton(x: Tensor, backend: str) -> bool:
    if backend == "torch" or (backend == "auto" and torch.compiler.is_compiling()):
        return False  # under torch.compile the PyTorch ops are traced and fused by the compiler
    ok = _triton.available_for(x) and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
    if backend == "triton" and not ok:
        raise RuntimeError("backend='triton' needs Triton and a CUDA tensor (or TRITON_INTERPRET=1 on CPU) "
                           f"of dtype float16/bfloat16/float32; got {x.device} {x.dtype}.")
    return ok


def _cat(ts: list[Tensor]) -> Tensor:
    return ts[0] if len(ts) == 1 else torch.cat(ts, 0)


def _shrink(x2: Tensor, A: Tensor, seed: Tensor | None, p: float, triton: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(x2, A, xa = dropout(x2) @ A.T (M, r)). Without dropout cuBLAS (measured as fast as the Triton
    kernel). On the Triton path x2 and A come back with unit last stride, as the backward kernel
    needs them too: save the returned ones."""
    if seed is None:
        return x2, A, torch.mm(x2, A.t())
    if triton:
        if x2.stride(-1) != 1 or not A.is_contiguous():
            x2, A = x2.contiguous(), A.contiguous()
        return x2, A, _triton.shrink(x2, A, seed, p)
    return x2, A, torch.mm(seeded_dropout(x2, seed, p), A.t())


class LoraLinearFunction(torch.autograd.Function):
    """apply(x, plan, W_0.., b_0.., A_0.., B_0.., seed_0..seed_{G-1}, *recipe) -> y_0..y_{J-1}."""

    @staticmethod
    def forward(ctx, x: Tensor, plan: _Plan, *tensors):
        J, T, G = plan.n_out, len(plan.term_out), len(plan.groups)
        Ws, bs = tensors[:J], tensors[J:2 * J]
        As, Bs = tensors[2 * J:2 * J + T], tensors[2 * J + T:2 * J + 2 * T]
        seeds = tensors[2 * J + 2 * T:2 * J + 2 * T + G]
        recipe = tensors[2 * J + 2 * T + G:]
        triton = plan.backend == "triton"
        in_f = x.shape[-1]
        x2 = x.reshape(-1, in_f)

        # xa for each group: x read once per group; then term t's slice of it.
        xas, A_cats, xa_of = [], [], [None] * T
        for g, terms in enumerate(plan.groups):
            x2, A_cat, xa = _shrink(x2, _cat([As[t] for t in terms]), seeds[g], plan.group_p[g], triton)
            xas.append(xa)
            A_cats.append(A_cat)
            off = 0
            for t in terms:
                r = As[t].shape[0]
                xa_of[t] = xa[:, off:off + r]
                off += r

        outs = []
        for j in range(J):
            y = None
            for t in range(T):
                if plan.term_out[t] == j:
                    if y is None:
                        y = _lora_out(bs[j], xa_of[t], Bs[t], plan.term_scale[t])
                    else:
                        y.addmm_(xa_of[t], Bs[t].t(), alpha=plan.term_scale[t])
            if y is None:
                y = F.linear(x2, Ws[j], bs[j])
            else:
                y.addmm_(x2, Ws[j].t())  # the base GEMM adds onto the small LoRA output in its epilogue
            outs.append(y.view(*x.shape[:-1], y.shape[-1]))

        ctx.plan = plan
        ctx.x_shape = x.shape
        ctx.bias_grad = tuple(b is not None and b.requires_grad for b in bs)
        ctx.n_recipe = len(recipe)
        ctx.save_for_backward(x2 if plan.recompute is None else None, *Ws, *A_cats, *Bs, *xas,
                              *(s if s is not None else x2.new_empty(0) for s in seeds), *recipe)
        ctx.ranks = tuple(A.shape[0] for A in As)
        ctx.a_dtypes = tuple(A.dtype for A in As)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        plan: _Plan = ctx.plan
        J, T, G = plan.n_out, len(plan.term_out), len(plan.groups)
        saved = ctx.saved_tensors
        x2 = saved[0]
        Ws = saved[1:1 + J]
        A_cats = saved[1 + J:1 + J + G]
        Bs = saved[1 + J + G:1 + J + G + T]
        xas = saved[1 + J + G + T:1 + J + 2 * G + T]
        seeds = saved[1 + J + 2 * G + T:1 + J + 3 * G + T]
        if plan.recompute is not None:
            x2 = _recompute(plan.recompute, saved[1 + J + 3 * G + T:], ctx.x_shape)
            if plan.recompute_cast is not None:
                x2 = x2.to(plan.recompute_cast)
        triton = plan.backend == "triton"
        need = ctx.needs_input_grad  # (x, plan, W.., b.., A.., B.., seed.., recipe..)
        need_x = need[0]
        M = x2.shape[0]
        g2 = [g.reshape(M, g.shape[-1]) for g in grads]

        # The input-gradient starts with the (memory-bound) LoRA terms; the base GEMMs then add onto
        # it in their epilogues, so gx is read once less than when the small terms are added last.
        gx = None
        dW = [g2[j].t() @ x2 if need[2 + j] else None for j in range(J)]
        db = [g2[j].sum(0) if ctx.bias_grad[j] else None for j in range(J)]
        dA, dB = [None] * T, [None] * T
        for g, terms in enumerate(plan.groups):  # each dropout group: the two named steps of LoraLinearGroup
            ranks = [ctx.ranks[t] for t in terms]
            need_b = [need[2 + 2 * J + T + t] for t in terms]
            one_read = triton and all(need_b) and len(terms) <= 3 and max(ranks) <= _ONE_READ_MAX_RANK
            gxa, dB_g = STEPS["lora_grads"][one_read](
                [g2[plan.term_out[t]] for t in terms], [Bs[t] for t in terms], xas[g], ranks,
                [plan.term_scale[t] for t in terms], need_b, Bs[terms[0]].dtype)  # "lora_grads"
            seed = seeds[g] if plan.group_p[g] > 0 and seeds[g].numel() else None
            dA_g, gx_g = STEPS["input_grads"][triton and seed is not None](
                x2, None, gxa, A_cats[g], seed, plan.group_p[g], need_x)  # "input_grads"
            if gx_g is not None:
                gx = gx_g if gx is None else gx.add_(gx_g)
            off = 0
            for t, dB_t in zip(terms, dB_g):
                dB[t] = dB_t
                if need[2 + 2 * J + t]:
                    dA[t] = dA_g[off:off + ctx.ranks[t]].to(ctx.a_dtypes[t])
                off += ctx.ranks[t]

        if need_x:
            for j in range(J):
                gx = torch.mm(g2[j], Ws[j]) if gx is None else gx.addmm_(g2[j], Ws[j])
        gx_out = gx.view(ctx.x_shape) if gx is not None else None
        return (gx_out, None, *dW, *db, *dA, *dB, *([None] * G), *([None] * ctx.n_recipe))


def _lora_out(bias: Tensor | None, xa: Tensor, B: Tensor, scale: float) -> Tensor:
    """bias + scale * xa @ B.T as a new (M, out) tensor: the start of an output that the base GEMM
    then adds onto (`addmm_`), reading it in its epilogue instead of in a separate memory-bound pass."""
    if bias is None:
        return torch.addmm(_zero(xa), xa, B.t(), beta=0, alpha=scale)
    return torch.addmm(bias, xa, B.t(), alpha=scale)


def _recompute(fn: Callable, recipe, x_shape) -> Tensor:
    """x (as 2-D) rebuilt in backward from the tensors it was made of (saved anyway by their own ops)."""
    with torch.no_grad():
        x = fn(*recipe)
    if x.shape != x_shape:
        raise RuntimeError(f"recompute gave shape {tuple(x.shape)} for an input of shape {tuple(x_shape)}.")
    return x.reshape(-1, x_shape[-1])


def rms_norm_apply(h32: Tensor, rstd: Tensor, weight: Tensor) -> Tensor:
    """weight * (h32 * rstd).to(weight.dtype): a Llama-style RMSNorm's output from its float32 input h32
    and 1/rms, the recipe its producer notes (`fast.fusion.rms_norm_forward`). One kernel where Triton runs."""
    if _triton.available_for(h32) and weight.dtype in _TRITON_DTYPES:
        return _triton.norm_apply(h32, rstd, weight)
    return weight * (h32 * rstd).to(weight.dtype)


# Recipes the dropout-backward kernel rebuilds in registers (x never written): fn -> the kernel's name for it.
_IN_KERNEL = {rms_norm_apply: "norm", torch.mul: "mul"}


def _in_kernel(fn: Callable, recipe, x_shape, dtype: torch.dtype) -> tuple | None:
    kind = _IN_KERNEL.get(fn)
    return None if kind is None else _triton.rebuild_source(kind, tuple(recipe), x_shape, dtype)


def _backward_input(ctx, x2: Tensor | None, recipe, dtype: torch.dtype,
                    need_w: bool) -> tuple[Tensor | None, tuple | None]:
    """(x2, src) for a one-group backward: x2 as kept; or rebuilt by PyTorch ops from its recipe; or
    (None, src) when the Triton kernel rebuilds it in registers (only without a weight gradient,
    which would need x2 itself)."""
    if ctx.fn is None:
        return x2, None
    src = _in_kernel(ctx.fn, recipe, ctx.x_shape, dtype) if ctx.triton and not need_w else None
    return (None, src) if src is not None else (_recompute(ctx.fn, recipe, ctx.x_shape), None)


def _check(x: Tensor, weight: Tensor, A: Tensor, B: Tensor, where: str) -> None:
    in_f, out_f, r = x.shape[-1], weight.shape[0], A.shape[0]
    if weight.dim() != 2 or weight.shape[1] != in_f or A.dim() != 2 or A.shape[1] != in_f \
            or B.dim() != 2 or B.shape != (out_f, r):
        raise ValueError(
            f"{where}: shapes do not fit: x {tuple(x.shape)} (..., in), weight {tuple(weight.shape)} (out, in), "
            f"A {tuple(A.shape)} (r, in), B {tuple(B.shape)} (out, r). Pass A and B of the adapter that "
            "belongs to this weight.")


def _check_p(p: float, where: str) -> None:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{where}: dropout must be in [0, 1), got {p}.")


def _cast(dtype: torch.dtype, *ts):
    return [t if t is None or t.dtype == dtype else t.to(dtype) for t in ts]


def _compute_dtype(x: Tensor) -> torch.dtype:
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def _lean_dtypes(x: Tensor, weights, biases) -> bool:
    """Whether the frozen weights are in x's dtype and autocast (if on) computes in it too: then the lean
    Functions serve the call, casting adapters of another dtype (float32, to train) inside, so that no
    autograd node is made for the casts and their gradients come back in the adapters' own dtype."""
    dt, dev = x.dtype, x.device.type
    if torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev) != dt:
        return False
    return all(W.dtype == dt for W in weights) and all(b is None or b.dtype == dt for b in biases)


def _no_grad_needed(tensors) -> bool:
    return not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in tensors)


def lora_linears(x: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor | None],
                 As: Sequence[Tensor], Bs: Sequence[Tensor], scales: Sequence[float],
                 term_out: Sequence[int] | None = None, dropouts: Sequence[float] | float = 0.0,
                 training: bool = False, shared_dropout: bool = True, seeds: Sequence[Tensor | None] | None = None,
                 backend: str = "auto", recompute: tuple[Callable, Sequence[Tensor]] | None = None
                 ) -> tuple[Tensor, ...]:
    """Several frozen linears over one input x, with LoRA terms; the general form of the fast path.

    Args:
        x: (..., in).
        weights, biases: the frozen linears, W_j (out_j, in), b_j (out_j,) or None.
        As, Bs, scales: LoRA terms, A_t (r_t, in), B_t (out_{term_out[t]}, r_t).
        term_out: which linear each term adds to (default: term t to linear t).
        dropouts: dropout probability of each term (or one for all), used when `training`.
        shared_dropout: terms with the same dropout probability share one mask on x, so x is
            read once for all their A's (e.g. q, k, v as one group). False gives every term
            with dropout its own mask, as separate `nn.Dropout` modules would.
        seeds: one seed per dropout group ((2,) int64 tensors, see `functional.dropout_seed`), in the
            order groups are formed; default: fresh ones. For tests and exact replays.
        backend: "auto" (Triton where it applies), "torch" or "triton".
        recompute: (fn, tensors) with fn(*tensors) == x exactly (see `FastState.mark`):
            backward rebuilds x from tensors instead of keeping x.

    Returns:
        y_j (..., out_j) for each linear j.

    Raises:
        ValueError: mismatched shapes or a dropout outside [0, 1).
    """
    J, T = len(weights), len(As)
    term_out = tuple(range(T)) if term_out is None else tuple(int(j) for j in term_out)
    ps = [float(dropouts)] * T if isinstance(dropouts, (int, float)) else [float(p) for p in dropouts]
    if len(biases) != J or len(Bs) != T or len(scales) != T or len(term_out) != T or len(ps) != T:
        raise ValueError(f"lora_linears: {J} weights need {J} biases; {T} A's need as many B's, scales, "
                         f"dropouts and term_out entries (got {len(biases)}, {len(Bs)}, {len(scales)}, "
                         f"{len(ps)}, {len(term_out)}).")
    for t in range(T):
        if not 0 <= term_out[t] < J:
            raise ValueError(f"lora_linears: term_out[{t}] = {term_out[t]} names no weight (there are {J}).")
        _check(x, weights[term_out[t]], As[t], Bs[t], "lora_linears")
        _check_p(ps[t], "lora_linears")
    if not training:
        ps = [0.0] * T

    # Dropout groups: all terms without dropout form one group (no mask, x read once for all).
    groups: list[list[int]] = []
    group_p: list[float] = []
    for t in range(T):
        p = ps[t]
        for gi, members in enumerate(groups):
            if group_p[gi] == p and (p == 0.0 or shared_dropout):
                members.append(t)
                break
        else:
            groups.append([t])
            group_p.append(p)

    dtype = _compute_dtype(x)
    x_dtype = x.dtype
    x, = _cast(dtype, x)
    weights = _cast(dtype, *weights)
    biases = _cast(dtype, *biases)
    As = _cast(dtype, *As)
    Bs = _cast(dtype, *Bs)
    tri = _use_triton(x, backend)

    if seeds is None:
        seeds = [dropout_seed(x.device) if p > 0 else None for p in group_p]
    else:
        seeds = list(seeds)
        if len(seeds) != len(groups):
            raise ValueError(f"lora_linears: {len(seeds)} seeds given for {len(groups)} dropout groups.")
        seeds = [s.to(device=x.device, dtype=torch.int64) if s is not None and p > 0 else None
                 for s, p in zip(seeds, group_p)]

    fn, recipe = (None, ()) if recompute is None else (recompute[0], tuple(recompute[1]))
    cast = dtype if fn is not None and x_dtype != dtype else None
    plan = _Plan(J, term_out, tuple(float(s) for s in scales), tuple(tuple(m) for m in groups),
                 tuple(group_p), "triton" if tri else "torch", fn, cast)
    if _no_grad_needed([x, *weights, *biases, *As, *Bs]):
        with torch.no_grad():
            return LoraLinearFunction.forward(_NoCtx(), x, plan, *weights, *biases, *As, *Bs, *seeds, *recipe)
    return LoraLinearFunction.apply(x, plan, *weights, *biases, *As, *Bs, *seeds, *recipe)


class _NoCtx:
    """Stands in for autograd's ctx when nothing needs a gradient (inference: no graph, no saving)."""

    needs_input_grad = ()

    def save_for_backward(self, *tensors) -> None:
        pass


_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_ZEROS: dict = {}
# `_triton.lora_grads` writes and reads float32 partial sums of about out * tokens * rank / 64 bytes
# (rank 16: a quarter of what its one read of g saves; rank 32: all of it). Above 16, cuBLAS does both.
_ONE_READ_MAX_RANK = 16


def _to_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _unit_last(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _zero(t: Tensor) -> Tensor:
    """A cached 0-d zero of t's dtype and device: the ignored `input` of addmm(beta=0, alpha=s),
    which scales a product without a separate multiply."""
    if torch.compiler.is_compiling():  # no cache mutation inside a traced graph
        return torch.zeros((), dtype=t.dtype, device=t.device)
    key = (t.dtype, t.device)
    z = _ZEROS.get(key)
    if z is None:
        z = _ZEROS[key] = torch.zeros((), dtype=t.dtype, device=t.device)
    return z


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scale: float,
                dropout: float = 0.0, training: bool = False, seed: Tensor | None = None,
                backend: str = "auto", recompute: tuple[Callable, Sequence[Tensor]] | None = None) -> Tensor:
    """y = F.linear(x, weight, bias) + scale * (dropout(x) @ A.T) @ B.T.

    x (..., in); weight (out, in) frozen; bias (out,) or None; A (r, in); B (out, r).
    Gradients for x, A, B (and bias / weight only if they require grad). Dropout applies when
    `training` and `dropout > 0`; its mask is a function of `seed` ((2,) int64, default: a
    fresh one), the same in forward and backward (see `functional.dropout_keep`). `recompute`:
    (fn, tensors) with fn(*tensors) == x exactly, so that backward rebuilds x instead of
    keeping it (see `FastState.mark`).

    Raises:
        ValueError: mismatched shapes or a dropout outside [0, 1).
    """
    in_f = x.shape[-1]
    dt = x.dtype
    if weight.dim() != 2 or weight.shape[1] != in_f or A.dim() != 2 or A.shape[1] != in_f \
            or B.shape != (weight.shape[0], A.shape[0]):
        _check(x, weight, A, B, "lora_linear")
    if backend == "triton" or not _lean_dtypes(x, (weight,), (bias,)):
        return lora_linears(x, [weight], [bias], [A], [B], [scale], None, dropout, training,
                            seeds=None if seed is None else [seed], backend=backend, recompute=recompute)[0]
    drop = training and dropout > 0
    if not _needs_graph(x, weight, bias, A, B) and not drop:
        # Inference (decode is bound by per-call CPU overhead): one kernel for few rows, one GEMM on a
        # scratch merged weight for many, else three ops.
        x2 = x.reshape(-1, in_f)
        if x2.shape[0] <= _triton.decode.SMALL_MAX_ROWS and backend == "auto" and _small_ok(x2, A, B, bias):
            if torch.compiler.is_compiling():
                # traced by torch.compile as one opaque op (`lorakit::lora_small`), so a compiled (and
                # CUDA-graphed) decode step runs the same kernel
                y = _small_op(x2, weight, bias, A.to(dt), B.to(dt), float(scale))
            else:  # adapters of another dtype are rounded to x's inside the kernel, with the same bits
                y = _triton.lora_small(x2, weight, bias, A, B, float(scale))
            return y.view(*x.shape[:-1], y.shape[-1])
        if A.dtype != dt or B.dtype != dt:
            A, B = A.to(dt), B.to(dt)
        if backend == "auto" and _merge_pays(x2.shape[0], weight.shape[0], in_f):
            # Many rows (prefill, batch scoring): W + s * B @ A formed once per call in a scratch
            # weight, rounded once as `lk.merge` would round it, then one GEMM. The adapter stays
            # unmerged; the call moves 2 * out * in elements instead of rows * (in + 2 * out).
            return _on_merged_weight(x, weight, bias, A, B, scale)
        y = _lora_out(bias, x2 @ A.t(), B, scale)
        y.addmm_(x2, weight.t())  # the base GEMM adds onto the small LoRA output in its epilogue
        return y.view(*x.shape[:-1], y.shape[-1])
    seed, triton = _seed_and_kernels(x, drop, dropout, seed, backend, "lora_linear")
    fn, recipe = recompute if recompute is not None else (None, ())
    args = ((A.shape[0],), (float(scale),), float(dropout), triton)
    if not _needs_graph(x, weight, bias, A, B):
        with torch.no_grad():
            return LoraLinearGroup.forward(_NoCtx(), x, 1, *args, None, weight, bias, A, B, seed)[0]
    return LoraLinearGroup.apply(x, 1, *args, fn, weight, bias, A, B, seed, *recipe)[0]


def decode_plan(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scale: float):
    """A `_triton.SmallPlan` that repeats what `lora_linear(x, weight, bias, A, B, scale)` just did for this
    inference call (one `lora_small` launch), or None where that is not the path it took."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling() or not _lean_dtypes(x, (weight,), (bias,)) \
            or x.numel() > _triton.decode.SMALL_MAX_ROWS * x.shape[-1]:
        return None
    x2 = x.reshape(-1, x.shape[-1])
    if not _small_ok(x2, A, B, bias):
        return None
    return _triton.small_plan(x, weight, bias, A, B, float(scale))


def _on_merged_weight(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scale: float) -> Tensor:
    """F.linear(x, W + scale * B @ A, bias), the merged weight formed in a scratch tensor and rounded once
    (as `lk.merge` rounds it); `weight` itself is not written."""
    return F.linear(x, torch.addmm(weight, B, A, alpha=scale), bias)


def _merge_pays(rows: int, out_f: int, in_f: int) -> bool:
    """Whether an inference call reads and writes less memory through a scratch merged weight
    (2 * out * in elements) than through the LoRA terms beside the base GEMM (the shrink reads x,
    the base GEMM's epilogue reads back the LoRA output that was written first: rows * (in + 2 * out))."""
    return 2 * out_f * in_f < rows * (in_f + 2 * out_f)


# Rows from which a training forward runs `_triton.expand_gemm` (measured: benchmarks/bench_fused_gemm.py).
_EXPAND_MIN_ROWS = 1024


def _expanded(x2: Tensor, Ws, bs, xa: Tensor, Bs, scales, triton: bool) -> list[Tensor] | None:
    """The outputs of the linears reading x2, each with its LoRA term, as one GEMM whose K loop ends with
    the LoRA product (`_triton.expand_gemm`: the LoRA output is never written and read back); None where
    that kernel does not serve (then the caller writes the LoRA output and the base GEMM adds onto it)."""
    if not triton or x2.shape[0] < _EXPAND_MIN_ROWS or not _triton.expand_gemm_ok(x2, Ws, bs, xa, Bs):
        return None
    return _triton.expand_gemm(x2, Ws, bs, xa, Bs, scales)


def _merge_pays_training(rows: int, in_f: int) -> bool:
    """Whether a training forward without dropout is cheaper through a scratch merged weight. The shrink
    runs either way (backward needs x @ A.T); the merge moves 2 * out * in elements and saves the LoRA
    output's write (rows * out) and its read in the base GEMM's epilogue (about a third of a read on
    the H100: rows * out / 3). So: rows * 4/3 > 2 * in."""
    return 2 * rows > 3 * in_f


def _small_ok(x2: Tensor, A: Tensor, B: Tensor, bias: Tensor | None) -> bool:
    """Whether `_triton.lora_small` serves this inference call (its operands' layout included; A and B may be
    of another dtype than x, as float32 adapters on a bfloat16 model are). Float32 x serves one row only:
    more rows take full-precision dots, which Triton runs without tensor cores (on the H100, 383 us a call at
    64 rows of SmolLM2's shapes, where cuBLAS takes a few)."""
    return x2.dtype in _TRITON_DTYPES and (x2.dtype != torch.float32 or x2.shape[0] == 1) and x2.stride(-1) == 1 \
        and A.dtype in _TRITON_DTYPES and B.dtype in _TRITON_DTYPES and A.stride(-1) == 1 and B.stride(-1) == 1 \
        and (bias is None or bias.stride(0) == 1) and _triton.available_for(x2) \
        and (_small_op is not None or not torch.compiler.is_compiling())


def _small_impl(x2: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scale: float) -> Tensor:
    # torch.compile's CUDA graphs ("reduce-overhead") refuse a buffer allocated in their memory pool that
    # outlives the graph: the tile counters are the ones an eager call made outside any graph (a
    # prefill, say), else zeroed ones of the call's own (one fill kernel more per call).
    return _triton.lora_small(x2, weight, bias, A, B, scale, compiled=True)


_small_op = None
if _triton.triton is not None and hasattr(torch.library, "custom_op"):
    _small_op = torch.library.custom_op(
        "lorakit::lora_small", _small_impl, mutates_args=(),
        schema="(Tensor x2, Tensor weight, Tensor? bias, Tensor A, Tensor B, float scale) -> Tensor")
    _small_op.register_fake(lambda x2, weight, bias, A, B, scale: x2.new_empty(x2.shape[0], weight.shape[0]))


def _seed_and_kernels(x: Tensor, drop: bool, p: float, seed: Tensor | None, backend: str,
                      where: str) -> tuple[Tensor | None, bool]:
    """(the dropout seed or None, whether the Triton kernels run) for the one-group Functions."""
    # Under torch.compile the PyTorch ops are traced and fused by the compiler instead. Without dropout
    # the Triton backward still serves an input rebuilt in registers (`_in_kernel`).
    triton = backend == "auto" and x.dtype in _TRITON_DTYPES and not torch.compiler.is_compiling() \
        and _triton.available_for(x)
    if not drop:
        return None, triton
    _check_p(p, where)
    seed = dropout_seed(x.device) if seed is None else seed.to(device=x.device, dtype=torch.int64)
    return seed, triton


def _needs_graph(x, weight, bias, A, B) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or A.requires_grad or B.requires_grad or weight.requires_grad
                                        or (bias is not None and bias.requires_grad))


def lora_linear_multi(x: Tensor, weight: Tensor, bias: Tensor | None, As: Sequence[Tensor], Bs: Sequence[Tensor],
                      scales: Sequence[float], dropouts: Sequence[float] | float = 0.0, training: bool = False,
                      seeds: Sequence[Tensor | None] | None = None, backend: str = "auto") -> Tensor:
    """y = F.linear(x, weight, bias) + sum_k scales[k] * (dropout_k(x) @ As[k].T) @ Bs[k].T.

    Several active adapters on one linear, each with its own dropout mask (adapters without
    dropout share one read of x). `seeds`: one per adapter with dropout, in order.
    """
    n = len(As)
    ps = [float(dropouts)] * n if isinstance(dropouts, (int, float)) else list(dropouts)
    if seeds is not None:
        # One seed per adapter with dropout; the no-dropout group (no seed) sits where its first member is.
        seeds = list(seeds)
        active = [p for p in ps if training and p > 0]
        if len(seeds) != len(active):
            raise ValueError(f"lora_linear_multi: {len(seeds)} seeds for {len(active)} adapters with dropout.")
        it, full, zero_seen = iter(seeds), [], False
        for p in ps:
            if training and p > 0:
                full.append(next(it))
            elif not zero_seen:
                full.append(None)
                zero_seen = True
        seeds = full
    return lora_linears(x, [weight], [bias], As, Bs, scales, [0] * n, ps, training,
                        shared_dropout=False, seeds=seeds, backend=backend)[0]


def lora_linear_group(x: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor | None],
                      As: Sequence[Tensor], Bs: Sequence[Tensor], scales: Sequence[float],
                      dropout: float = 0.0, training: bool = False, seed: Tensor | None = None,
                      backend: str = "auto", recompute: tuple[Callable, Sequence[Tensor]] | None = None
                      ) -> tuple[Tensor, ...]:
    """Linears that read the same x (q/k/v, gate/up), one adapter each, as one fused call.

    y_j = F.linear(x, W_j, b_j) + s_j * (dropout(x) @ A_j.T) @ B_j.T, with ONE dropout mask on x
    shared by the group (as if dropout were applied to x once, before the projections): x
    is read once for all A's in forward and backward, the LoRA and base input-gradients are
    summed in place, and one mask is regenerated instead of one per projection.
    """
    J = len(weights)
    in_f = x.shape[-1]
    lean = backend != "triton" and J > 0 and len(biases) == J and len(As) == J and len(Bs) == J \
        and len(scales) == J and _lean_dtypes(x, weights, biases)
    if lean:
        a_dt, b_dt = As[0].dtype, Bs[0].dtype
        for W, A, B in zip(weights, As, Bs):
            if not (A.dtype == a_dt and B.dtype == b_dt and W.dim() == 2 and W.shape[1] == in_f and A.dim() == 2
                    and A.shape[1] == in_f and B.shape == (W.shape[0], A.shape[0])):
                lean = False  # the general path casts, or raises the explanatory error
                break
    if not lean:
        return lora_linears(x, weights, biases, As, Bs, scales, None, dropout, training,
                            shared_dropout=True, seeds=None if seed is None else [seed], backend=backend,
                            recompute=recompute)
    seed, triton = _seed_and_kernels(x, training and dropout > 0, dropout, seed, backend, "lora_linear_group")
    fn, recipe = recompute if recompute is not None else (None, ())
    args = (tuple(A.shape[0] for A in As), tuple(float(s) for s in scales), float(dropout), triton)
    if not _needs_graph_any(x, weights, biases, As, Bs):
        with torch.no_grad():
            return LoraLinearGroup.forward(_NoCtx(), x, J, *args, None, *weights, *biases, *As, *Bs, seed)
    return LoraLinearGroup.apply(x, J, *args, fn, *weights, *biases, *As, *Bs, seed, *recipe)


def _needs_graph_any(x, weights, biases, As, Bs) -> bool:
    if not torch.is_grad_enabled():
        return False
    return x.requires_grad or any(t is not None and t.requires_grad for ts in (weights, biases, As, Bs) for t in ts)


class LoraLinearGroup(torch.autograd.Function):
    """J >= 1 linears reading one x, one adapter each, one dropout mask on x: `lora_linear` (J = 1) and
    `lora_linear_group` (q/k/v, gate/up) when the frozen weights are in x's dtype.

    apply(x, J, ranks, scales, p, triton, recompute_fn, W_0.., b_0.., A_0.., B_0.., seed, *recipe) -> y_0..y_{J-1}

    Backward is a sequence of named steps, each with a PyTorch and a Triton implementation (`STEPS`):
    "rebuild" x (kept, or rebuilt from its recipe), "lora_grads" (gxa = s * g @ B and dB = s * g.T @ xa),
    "input_grads" (dA = gxa.T @ dropout(x) and the LoRA part of gx), then the base GEMMs add g @ W onto gx.
    """

    @staticmethod
    def forward(ctx, x, J, ranks, scales, p, triton, recompute_fn, *tensors):
        Ws, bs, As, Bs = tensors[:J], tensors[J:2 * J], tensors[2 * J:3 * J], tensors[3 * J:4 * J]
        seed, recipe = tensors[4 * J], tensors[4 * J + 1:]
        ctx.a_dtype, ctx.b_dtype = As[0].dtype, Bs[0].dtype  # the gradients' dtypes; the products run in x's
        dt = x.dtype
        if ctx.b_dtype != dt:
            Bs = [B.to(dt) for B in Bs]
        x2 = x.reshape(-1, x.shape[-1])
        A = _to_dtype(torch.cat(As) if J > 1 else As[0], dt)
        x2, A, xa = _shrink(x2, A, seed, p, triton)
        outs, off, lead = [], 0, x.shape[:-1]
        fused = _expanded(x2, Ws, bs, xa, Bs, scales, triton)
        merge = fused is None and seed is None and _merge_pays_training(x2.shape[0], x2.shape[1])
        for j in range(J):
            r = ranks[j]
            if fused is not None:
                y = fused[j]
            elif merge:
                y = _on_merged_weight(x2, Ws[j], bs[j], A[off:off + r], Bs[j], scales[j])
            else:
                y = _lora_out(bs[j], xa[:, off:off + r], Bs[j], scales[j])
                y.addmm_(x2, Ws[j].t())  # the base GEMM adds onto the small LoRA output in its epilogue
            outs.append(y.view(*lead, y.shape[-1]))
            off += r
        ctx.J, ctx.ranks, ctx.scales, ctx.p, ctx.triton, ctx.fn, ctx.x_shape = J, ranks, scales, p, triton, \
            recompute_fn, x.shape
        ctx.bias_grad = tuple(b is not None and b.requires_grad for b in bs)
        ctx.save_for_backward(None if recompute_fn is not None else x2, A, xa, seed, *Ws, *Bs, *recipe)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        J = ctx.J
        x2, A, xa, seed, *rest = ctx.saved_tensors
        Ws, Bs, recipe = rest[:J], rest[J:2 * J], rest[2 * J:]
        need = ctx.needs_input_grad  # (x, J, ranks, scales, p, triton, fn, W.., b.., A.., B.., seed, recipe..)
        need_x, need_w, need_b = need[0], need[7:7 + J], need[7 + 3 * J:7 + 4 * J]
        x2, src = _backward_input(ctx, x2, recipe, A.dtype, any(need_w))  # "rebuild"
        M = xa.shape[0]
        g2 = [g.reshape(M, g.shape[-1]) for g in grads]
        dW = [g2[j].t() @ x2 if need_w[j] else None for j in range(J)]
        db = [g2[j].sum(0) if ctx.bias_grad[j] else None for j in range(J)]
        lora_grads = STEPS["lora_grads"][ctx.triton and all(need_b) and max(ctx.ranks) <= _ONE_READ_MAX_RANK]
        gxa, dB = lora_grads(g2, Bs, xa, ctx.ranks, ctx.scales, need_b, ctx.b_dtype)
        input_grads = STEPS["input_grads"][ctx.triton and (seed is not None or src is not None)]
        dA, gx = input_grads(x2, src, gxa, A, seed, ctx.p, need_x)
        if need_x:  # the base GEMMs add onto the LoRA term in their epilogues
            for j in range(J):
                gx.addmm_(g2[j], Ws[j])
            gx = gx.view(ctx.x_shape)
        dA = _to_dtype(dA, ctx.a_dtype)  # one cast for the group, then views
        dAs, off = [], 0
        for j in range(J):
            r = ctx.ranks[j]
            dAs.append(dA[off:off + r] if need[7 + 2 * J + j] else None)
            off += r
        return (gx, None, None, None, None, None, None, *dW, *db, *dAs, *dB, None, *([None] * len(recipe)))


# -- the named backward steps: (PyTorch, Triton) implementations of each -----------------------------
def _lora_grads_torch(g2, Bs, xa, ranks, scales, need_b, b_dtype):
    """gxa (M, sum r) = [s_j * g_j @ B_j] side by side, and dB_j = s_j * g_j.T @ xa_j: two GEMMs per linear."""
    z, gxas, dB, off = _zero(xa), [], [], 0
    for g, B, r, s, nb in zip(g2, Bs, ranks, scales, need_b):
        dB.append(_to_dtype(torch.addmm(z, g.t(), xa[:, off:off + r], beta=0, alpha=s), b_dtype) if nb else None)
        gxas.append(torch.addmm(z, g, B, beta=0, alpha=s))
        off += r
    return (torch.cat(gxas, 1) if len(gxas) > 1 else gxas[0]), dB


def _lora_grads_triton(g2, Bs, xa, ranks, scales, need_b, b_dtype):
    """The same, each g read once for both of its products (`_triton.lora_grads_group`); one launch for a
    group of one rank."""
    gxa = torch.empty(xa.shape, dtype=xa.dtype, device=xa.device)
    if min(ranks) == max(ranks):
        dB = _triton.lora_grads_group([_unit_last(g) for g in g2], [_unit_last(B) for B in Bs], xa, scales, gxa,
                                      db_dtype=b_dtype)
    else:
        dB, off = [], 0
        for g, B, r, s in zip(g2, Bs, ranks, scales):
            dB.append(_triton.lora_grads(_unit_last(g), _unit_last(B), xa, s, gxa, col=off, db_dtype=b_dtype))
            off += r
    return gxa, dB


def _input_grads_torch(x2, src, gxa, A, seed, p, need_x):
    """dA = gxa.T @ dropout(x2) and gx = dropout'(gxa @ A) (None without need_x), the mask from the seed."""
    if seed is None:
        return torch.mm(gxa.t(), x2), (torch.mm(gxa, A) if need_x else None)
    keep = dropout_keep(seed, x2.shape[0], x2.shape[1], p, x2.device).to(x2.dtype)
    dA = torch.mm(gxa.t(), x2 * keep).mul_(1.0 / (1.0 - p))
    return dA, ((gxa @ A).mul_(keep).mul_(1.0 / (1.0 - p)) if need_x else None)


def _input_grads_triton(x2, src, gxa, A, seed, p, need_x):
    """The same in one pass over x2, the mask made in registers (`_triton.dropout_backward`); x2 may be None,
    rebuilt tile by tile from `src` inside the kernel."""
    gx = A.new_empty(gxa.shape[0], A.shape[1]) if need_x else None
    return _triton.dropout_backward(x2, gxa, A, gx, seed, p, gx_init=True, src=src), gx


#: step name -> (PyTorch implementation, Triton implementation), indexed by whether Triton runs it
STEPS = {
    "lora_grads": (_lora_grads_torch, _lora_grads_triton),
    "input_grads": (_input_grads_torch, _input_grads_triton),
}


# -- DoRA ------------------------------------------------------------------------------------------------------
def dora_output(z: Tensor, magnitude: Tensor, norm: Tensor, bias: Tensor | None) -> Tensor:
    """y = (magnitude / norm) * z + bias: a DoRA layer's output from z = x @ (W + s*B@A).T (no dropout).

    z (..., out); magnitude (out,) (any shape of out elements), trained; norm (out,) float32, a constant
    (`LoraAdapter.weight_norm`); bias (out,) or None. One autograd node: backward gives dz = g * f,
    dm = sum over rows of g * z / norm and the bias gradient, keeping z and f only.
    """
    return _DoraScale.apply(z, magnitude, norm, bias)


class _DoraScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, magnitude, norm, bias):
        f = (magnitude.reshape(-1).to(norm.dtype) / norm).to(z.dtype)  # (out,)
        ctx.save_for_backward(z, f, norm)
        ctx.m_dtype, ctx.m_shape, ctx.has_bias = magnitude.dtype, magnitude.shape, bias is not None
        return torch.addcmul(bias.to(z.dtype), z, f) if bias is not None else z * f

    @staticmethod
    def backward(ctx, g):
        z, f, norm = ctx.saved_tensors
        need_z, need_m, _, need_b = ctx.needs_input_grad
        g2, z2 = g.reshape(-1, g.shape[-1]), z.reshape(-1, z.shape[-1])
        gz = g * f if need_z else None
        gm = ((g2 * z2).sum(0, dtype=torch.float32) / norm).to(ctx.m_dtype).reshape(ctx.m_shape) if need_m else None
        gb = g2.sum(0) if ctx.has_bias and need_b else None
        return gz, gm, None, gb

