"""LoRA wrapper layers: the forward pass of an adapted module lives here.

A wrapper takes the place of a base module (nn.Linear, GPT-2's Conv1D, nn.Embedding,
nn.Conv1d/2d/3d) in its parent. It owns the base module's `weight` and `bias` under the
same names, so `state_dict` keys of the base model do not change and base checkpoints
load unchanged, plus an `adapters` ModuleDict with one small `LoraAdapter` per name.

    y = base(x) + sum over active adapters a of  a.scale * B_a @ A_a @ dropout_a(x)

A DoRA adapter (`LoraConfig(dora=True)`) also holds a magnitude m (out,) and contributes
`functional.dora_delta_out`: the output of W + dW with each output row rescaled to length m.

State changes (merge, unmerge, routing, enabling) are explicit calls on the wrapper,
made through the free functions in `lorakit.inject`; nothing changes behind the user's back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import fast
from . import functional as LF
from .errors import AdapterNotFoundError, ConfigError, MergeError, StateError

# The forward passes below read what they need from the modules' own `_parameters` / `_modules` dicts
# (`_param`): an attribute read that nn.Module.__getattr__ answers costs as much as the decode step's
# tensor ops around it.
def _param(module: nn.Module, name: str) -> Tensor | None:
    """`getattr(module, name)` for a tensor that is usually a registered parameter, without __getattr__."""
    params = module._parameters
    return params[name] if name in params else getattr(module, name)


class LoraAdapter(nn.Module):
    """One named adapter of one layer: `lora_A` (r, in), `lora_B` (out, r), a scale and a dropout.

    For convolutions A is (r, in, *kernel) and B is (out, r, 1, ...), as in PEFT's files.
    A DoRA adapter also has `lora_magnitude_vector` (out,) ((1, out, 1, ...) for convolutions), PEFT's name and
    shapes; for others it is None.
    With `slices` (fused projections such as GPT-2's c_attn), A holds one rank-r block per
    enabled slice, (k*r, in), and B the enabled slices' rows, (k*out/n, r); `full_B()` expands
    B to the (out, k*r) block matrix that acts on the whole fused output.
    """

    def __init__(self, A: Tensor, B: Tensor, alpha: float, r: int, rslora: bool,
                 dropout: float, slices: list[bool] | None = None, magnitude: Tensor | None = None) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(A)
        self.lora_B = nn.Parameter(B)
        self.lora_magnitude_vector = nn.Parameter(magnitude) if magnitude is not None else None
        # DoRA: (key, ||W + scale * B @ A|| per output row) of the last `weight_norm` call
        self._norm_cache: tuple[tuple, Tensor] | None = None
        self.r = r
        self.alpha = float(alpha)
        self.rslora = rslora
        self.scale = float(alpha) / (math.sqrt(r) if rslora else r)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.slices = list(slices) if slices is not None else None

    @property
    def dora(self) -> bool:
        """Whether this is a DoRA adapter (it has a magnitude vector)."""
        return self._parameters.get("lora_magnitude_vector") is not None

    def weight_norm(self, weight: Tensor) -> Tensor:
        """DoRA's ||W + scale * B @ A|| per output row (`functional.dora_weight_norm`; float32 (out,), no autograd)
        for weight (out, in) the layer's weight.

        Computed once and reused while W, A and B are the same tensors at the same version: an optimizer step,
        a merge or unmerge, a load (anything that changes them in place) or a new dtype or device makes the next
        call compute it again. Not cached while torch.compile traces or a CUDA graph is captured.
        """
        A, B = _param(self, "lora_A"), _param(self, "lora_B")
        if torch.compiler.is_compiling() or (weight.is_cuda and torch.cuda.is_current_stream_capturing()):
            return LF.dora_weight_norm(weight, A, self.full_B(), self.scale)
        key = (self.scale, *((t.data_ptr(), t._version, t.dtype, t.device) for t in (weight, A, B)))
        cache = self._norm_cache
        if cache is None or cache[0] != key:
            cache = self._norm_cache = (key, LF.dora_weight_norm(weight, A, self.full_B(), self.scale))
        return cache[1]

    @property
    def dropout_p(self) -> float:
        dropout = self._modules["dropout"]
        return dropout.p if isinstance(dropout, nn.Dropout) else 0.0

    def apply_dropout(self, x: Tensor) -> Tensor:
        """dropout(x); x itself where that is the identity (no dropout, or eval), without a module call."""
        dropout = self._modules["dropout"]
        if type(dropout) is nn.Identity or (type(dropout) is nn.Dropout and not dropout.training):
            return x
        return dropout(x)

    def operands(self) -> tuple[Tensor, Tensor, float, float]:
        """(lora_A, full_B(), scale, dropout_p): an adapter's arguments to a fused call, read from the
        module's own dicts (see `_param`)."""
        params = self._parameters
        if self.slices is None and "lora_A" in params and "lora_B" in params:
            A, B = params["lora_A"], params["lora_B"]
        else:
            A, B = self.lora_A, self.full_B()
        return A, B, self.scale, self.dropout_p

    def full_B(self) -> Tensor:
        """B acting on the whole output: (out, r_total); for sliced adapters a block matrix with zero rows.

        Built on every call (not cached), so it always reflects in-place changes of `lora_B`."""
        B = _param(self, "lora_B")
        if self.slices is None:
            return B
        n, k = len(self.slices), sum(self.slices)
        out_slice = B.shape[0] // k
        full = B.new_zeros(out_slice * n, self.r * k)
        enabled = [i for i, on in enumerate(self.slices) if on]
        for j, i in enumerate(enabled):
            full[i * out_slice:(i + 1) * out_slice, j * self.r:(j + 1) * self.r] = B[j * out_slice:(j + 1) * out_slice]
        return full

    def extra_repr(self) -> str:
        sliced = f", slices={self.slices}" if self.slices is not None else ""
        dora = ", dora=True" if self.dora else ""
        return f"r={self.r}, alpha={self.alpha:g}, scale={self.scale:g}{sliced}{dora}"


@dataclass
class WeightEdit:
    """One change written into a layer's weight: `+ scale * B @ A` in float32, rounded once.

    A merged adapter is one (its factors as they were when merged); a PiSSA residual is another (its
    initial factors with a negative scale). `restore` lets `LF.unmerge_exact` take it out bit-exactly.
    A merged DoRA adapter has a `factor` (out,) float32, its m / ||W + dW|| on the weight without merged
    adapters (PEFT's rule) when merged: the change is then W -> factor * (W + dW), rounded once.
    """

    A: Tensor
    B: Tensor  # full_B(): (out, r_total)
    scale: float
    restore: LF.Restore | None = None
    factor: Tensor | None = None


class LoraLayer(nn.Module):
    """Common state of every wrapper: adapters, which are active, merged, or routed per example."""

    #: set by subclasses: how the adapter update lands on `weight`
    kind = "linear"
    #: whether `weight` is quantized (`lorakit.quant`): never merged into, adapters kept in float32
    quantized = False

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.weight = base.weight
        self.bias = getattr(base, "bias", None)
        # The emptied base module is kept (unregistered, holding no tensors) to be put back by eject.
        self._base_params = [p for p in ("weight", "bias") if p in base._parameters]
        for pname in self._base_params:
            del base._parameters[pname]
        object.__setattr__(self, "_base", base)
        self._init_adapter_state()

    def _init_adapter_state(self) -> None:
        """The adapter bookkeeping every wrapper starts with (no adapter, nothing merged or routed)."""
        self.adapters = nn.ModuleDict()
        self.active: list[str] = []
        # Changes held in `weight`, each undone exactly by `rewrite`: merged adapters in merge order, and
        # below them the PiSSA residuals (weight - scale * B0 @ A0) of adapters initialized by PiSSA.
        self.merged: dict[str, WeightEdit] = {}
        self.residuals: dict[str, WeightEdit] = {}
        self.disabled = False
        self.routing: list[str | None] | None = None
        self._rows_cache: tuple[torch.device, Tensor, list[str]] | None = None
        self._route_owner: int | None = None  # the thread that entered the current route (lorakit.inject.route)

    # -- the base module, rebuilt on eject ---------------------------------------------------------
    def unwrap(self) -> nn.Module:
        """Give the base module its parameters back and return it (the adapters are dropped)."""
        base = self._base
        for pname in self._base_params:
            base.register_parameter(pname, getattr(self, pname))
        return base

    # -- adapters -----------------------------------------------------------------------------------
    def adapter_dtype(self) -> torch.dtype:
        """The dtype of new adapters' A and B: the weight's."""
        return self.weight.dtype

    def adapter(self, name: str) -> LoraAdapter:
        if name not in self.adapters:
            raise AdapterNotFoundError(
                f"{type(self).__name__} has no adapter {name!r}; it has {list(self.adapters)}."
            )
        return self.adapters[name]

    def delta_weight(self, name: str) -> Tensor:
        """dW of adapter `name` in float32, laid out like `self.weight`."""
        a = self.adapter(name)
        return self._to_weight_layout(LF.delta_weight(a.lora_A, a.full_B(), a.scale))

    def _to_weight_layout(self, delta: Tensor) -> Tensor:
        return delta  # (out, in[, *kernel]) is the weight's own layout for Linear and convolutions

    def weight_out_in(self) -> Tensor:
        """The base weight as (out, in[, *kernel]), the layout of B @ A (an embedding's (num, dim) transposed)."""
        return self._to_weight_layout(_param(self, "weight"))  # a transpose or nothing: its own inverse

    def _dora_factor(self, a: LoraAdapter, dtype: torch.dtype) -> Tensor:
        """DoRA's m / ||W + scale * B @ A|| (out,) in `dtype`, differentiable in m (`LF.dora_factor`)."""
        return LF.dora_factor(_param(a, "lora_magnitude_vector"), a.weight_norm(self.weight_out_in()), dtype)

    def check_finite(self, name: str, module_name: str = "") -> Tensor:
        """dW of adapter `name` (float32, on the weight's device), after checking it is finite.

        Raises:
            MergeError: the update holds NaN or inf.
        """
        delta = self.delta_weight(name).to(self.weight.device)
        if not torch.isfinite(delta).all():
            raise MergeError(
                f"Adapter {name!r} on {module_name or type(self).__name__} has a non-finite update (NaN or inf); "
                "no weight was changed. The adapter is broken (diverged training?): retrain or reload it."
            )
        return delta

    # -- changes held in `weight`: PiSSA residuals, then merged adapters, in the order they were made ----
    def merge(self, name: str, module_name: str = "") -> None:
        """Fold adapter `name` into `weight` (float32 delta rounded once). Merging twice merges once.

        Raises:
            StateError: a per-example route is active.
            MergeError: the merged weight would hold inf or NaN where it was finite (a non-finite update,
                or an overflow of the weight's dtype); nothing is changed.
        """
        if name in self.merged or name not in self.adapters:
            return
        if self.routing is not None:
            raise StateError(f"Cannot merge adapter {name!r} into {module_name or type(self).__name__} while "
                             "a per-example route is active; leave the `route(...)` block first.")
        self.rewrite(add=[name], module_name=module_name)

    def unmerge(self, names: list[str] | None = None, module_name: str = "") -> None:
        """Take merged adapters (default: all) out of `weight`.

        The weight becomes exactly (bit for bit) what merging only the adapters that stay merged onto
        the pre-merge weight, in their merge order, gives; unmerging all of them restores it.

        Raises:
            MergeError: re-merging the adapters merged after an unmerged one would overflow the weight's
                dtype (nothing is changed then).
        """
        drop = [n for n in self.merged if names is None or n in names]
        self.rewrite(drop=drop, module_name=module_name)

    def rewrite(self, drop: list[str] = (), add: list[str] = (), drop_residuals: list[str] = (),
                module_name: str = "", dry_run: bool = False) -> None:
        """Unmerge the merged adapters `drop`, put back the weight PiSSA took out for `drop_residuals`,
        then merge the adapters `add`, leaving `weight` bit for bit what making only the remaining
        changes, in their order, on the original weight W0 gives.

        Changes are undone exactly (`LF.unmerge_exact`) last first, down to the first one dropped;
        those kept are then made again in their order from the factors recorded when they were made,
        which reproduces them bit for bit. With `dry_run` (or whenever changes must be remade) the
        sequence first runs on a copy, so a failure leaves `weight` as it was.

        Raises:
            MergeError: a merged weight would hold inf/NaN where the weight before it was finite
                (an overflow of its dtype); nothing is changed.
        """
        edits = [(True, n, e) for n, e in self.residuals.items()] + [(False, n, e) for n, e in self.merged.items()]
        gone = [i for i, (res, n, _) in enumerate(edits) if n in (drop_residuals if res else drop)]
        cut = gone[0] if gone else len(edits)
        redo = [edits[i] for i in range(cut, len(edits)) if i not in gone]
        new = [(False, n, self._new_edit(n)) for n in add if n not in self.merged]
        if not gone and not new or dry_run and not redo and not new:  # nothing to do; undoing alone cannot fail
            return
        if dry_run or redo or len(new) > 1:
            self._replay(self.weight.data.clone(), edits[cut:], redo + new, module_name)
            if dry_run:
                return
        records = self._replay(self.weight.data, edits[cut:], redo + new, module_name)
        for res, n, _ in edits[cut:]:
            (self.residuals if res else self.merged).pop(n)
        for (res, n, e), restore in zip(redo + new, records):
            e.restore = restore
            (self.residuals if res else self.merged)[n] = e

    def _replay(self, w: Tensor, undo: list, make: list, module_name: str) -> list[LF.Restore]:
        """Undo the changes `undo` (last first) in `w` in place, then make `make` in order; their new records."""
        for _, _, e in reversed(undo):
            LF.unmerge_exact(w, self._edit_delta(e), e.restore, self._edit_factor(e))
        records = []
        for res, n, e in make:
            try:
                records.append(LF.merge_exact(w, self._edit_delta(e), self._edit_factor(e)))
            except FloatingPointError:
                what = f"the PiSSA residual of {n!r}" if res else f"adapter {n!r}"
                raise MergeError(
                    f"Merging {what} into {module_name or type(self).__name__} would overflow its {w.dtype} weight "
                    "(inf or NaN where the weight was finite); no weight was changed. Keep the adapter unmerged, "
                    "or merge into a wider dtype (e.g. model.float()); check the adapter holds finite values."
                ) from None
        return records

    def _new_edit(self, name: str) -> WeightEdit:
        a = self.adapters[name]
        edit = WeightEdit(a.lora_A.detach().clone(), a.full_B().detach().clone(), a.scale)
        if a.dora:  # the norm is taken on the weight without the merged adapters, as PEFT's merge does
            unmerged = self._to_weight_layout(self._unmerged_weight())  # (out, in)
            norm = LF.dora_weight_norm(unmerged, edit.A, edit.B, edit.scale).to(self.weight.device)
            edit.factor = LF.dora_factor(a.lora_magnitude_vector.detach(), norm, torch.float32)
        return edit

    def _unmerged_weight(self) -> Tensor:
        """`weight` with every merged adapter taken out (the PiSSA residuals stay): itself when none is merged."""
        if not self.merged:
            return self.weight.data
        w = self.weight.data.clone()
        for e in reversed(list(self.merged.values())):
            LF.unmerge_exact(w, self._edit_delta(e), e.restore, self._edit_factor(e))
        return w

    def _edit_delta(self, e: WeightEdit) -> Tensor:
        return self._to_weight_layout(LF.delta_weight(e.A, e.B, e.scale)).to(self.weight.device)

    def _edit_factor(self, e: WeightEdit) -> Tensor | None:
        """A DoRA edit's factor (out,) shaped to scale the output rows of `weight` as it is laid out."""
        if e.factor is None:
            return None
        return self._to_weight_layout(e.factor.reshape(-1, *(1,) * (self.weight.dim() - 1)))

    # -- forward ------------------------------------------------------------------------------------
    def _base_forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _adapter_forward(self, x: Tensor, a: LoraAdapter) -> Tensor:
        """scale * B @ A @ dropout(x) for one adapter, in the output's layout."""
        raise NotImplementedError

    def _unmerged_active(self) -> list[LoraAdapter]:
        adapters, merged = self._modules["adapters"]._modules, self.merged  # the ModuleDict's own dict
        return [adapters[n] for n in self.active if n in adapters and n not in merged]

    def forward(self, x: Tensor) -> Tensor:
        if self.disabled:
            return self._base_forward(x)
        if self.routing is not None:
            return self._routed_forward(x)
        y = self._base_forward(x)
        for a in self._unmerged_active():
            y = y + self._adapter_forward(x, a)
        return y

    def _route_rows(self, device: torch.device) -> tuple[Tensor, list[str], list[LoraAdapter]]:
        """(rows, names, adapters): rows[b] indexes `names` (and `adapters`) for batch row b, -1 for base
        only. Cached per route block."""
        cache = self._rows_cache
        if cache is None or cache[0] != device:
            names = [n for n in dict.fromkeys(self.routing) if n is not None and n in self.adapters]
            rows = torch.tensor([names.index(n) if n in names else -1 for n in self.routing],
                                dtype=torch.long, device=device)
            cache = self._rows_cache = (device, rows, names, [self.adapters[n] for n in names])
        return cache[1], cache[2], cache[3]

    def _routed_forward(self, x: Tensor) -> Tensor:
        if x.shape[0] != len(self.routing):
            raise StateError(
                f"route() was given {len(self.routing)} adapter names but this batch has {x.shape[0]} rows "
                f"(input shape {tuple(x.shape)}); pass one name (or None) per example."
            )
        y = self._base_forward(x)
        rows, names, _ = self._route_rows(x.device)
        for i, name in enumerate(names):
            idx = (rows == i).nonzero().squeeze(1)
            y = y.index_add(0, idx, self._adapter_forward(x.index_select(0, idx), self.adapters[name]))
        return y


class LoraLinear(LoraLayer):
    """LoRA on nn.Linear (weight (out, in)) or Hugging Face's Conv1D (weight (in, out), `fan_in_fan_out`)."""

    #: the `lorakit.fast.FastState` of the model this layer belongs to (plans, stacks, fusion), set by the
    #: fast path on first use; None until then
    fast_state = None

    def __init__(self, base: nn.Module, fan_in_fan_out: bool = False) -> None:
        self.fan_in_fan_out = fan_in_fan_out
        super().__init__(base)
        w = self.weight
        self.in_features, self.out_features = (w.shape[0], w.shape[1]) if fan_in_fan_out else (w.shape[1], w.shape[0])

    def forward(self, x: Tensor) -> Tensor:
        if self.disabled or not fast.enabled_for(x):
            return super().forward(x)  # the reference path: `lorakit.functional` per adapter
        return fast.linear_forward(self, x)  # one of `lorakit.fast.dispatch.PATHS`; `lk.explain(self, x)` says which

    def weight_out_in(self) -> Tensor:
        """The base weight as (out, in): Hugging Face's Conv1D stores it (in, out)."""
        weight = _param(self, "weight")
        return weight.t() if self.fan_in_fan_out else weight

    def _base_forward(self, x: Tensor) -> Tensor:
        weight, bias = _param(self, "weight"), _param(self, "bias")
        if self.fan_in_fan_out:  # Conv1D: y = x @ W + b with W (in, out)
            y = x @ weight
            return y + bias if bias is not None else y
        return F.linear(x, weight, bias)

    def _adapter_forward(self, x: Tensor, a: LoraAdapter) -> Tensor:
        if a.dora:
            weight = self.weight_out_in()
            f = LF.dora_factor(_param(a, "lora_magnitude_vector"), a.weight_norm(weight), x.dtype)
            return LF.dora_delta_out(a.apply_dropout(x), weight, _param(a, "lora_A"), a.full_B(), a.scale, f)
        return LF.lora_delta_out(a.apply_dropout(x), _param(a, "lora_A"), a.full_B(), a.scale)

    def _to_weight_layout(self, delta: Tensor) -> Tensor:
        return delta.t() if self.fan_in_fan_out else delta

    def extra_repr(self) -> str:
        t = ", fan_in_fan_out=True" if self.fan_in_fan_out else ""
        return f"in_features={self.in_features}, out_features={self.out_features}{t}, active={self.active}"


class LoraEmbedding(LoraLayer):
    """LoRA on nn.Embedding (weight (num, dim)). A is (r, num) and B is (dim, r), PEFT's
    `lora_embedding_A/B`; the update of the weight is (B @ A).T * scale."""

    kind = "embedding"

    def __init__(self, base: nn.Embedding) -> None:
        super().__init__(base)
        self.num_embeddings, self.embedding_dim = self.weight.shape
        self.padding_idx = base.padding_idx

    def _base_forward(self, x: Tensor) -> Tensor:
        b = self._base
        return F.embedding(x, self.weight, b.padding_idx, b.max_norm, b.norm_type, b.scale_grad_by_freq, b.sparse)

    def _adapter_forward(self, x: Tensor, a: LoraAdapter) -> Tensor:
        # Embedding LoRA has no dropout on its (integer) input, as in PEFT.
        b = self._base
        after_a = F.embedding(x, a.lora_A.t(), b.padding_idx, b.max_norm, b.norm_type, b.scale_grad_by_freq, b.sparse)
        lora = (after_a @ a.lora_B.t()) * a.scale
        if not a.dora:
            return lora
        # DoRA (PEFT's DoraEmbeddingLayer): the norm runs over each embedding dimension (rows of the (dim, num)
        # weight W.T + dW); the contribution is (f - 1) * embedding(x) + f * lora, f (dim,)
        f = self._dora_factor(a, lora.dtype)
        return (f - 1) * self._base_forward(x) + f * lora

    def _to_weight_layout(self, delta: Tensor) -> Tensor:
        return delta.t()

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, active={self.active}"


class LoraConv(LoraLayer):
    """LoRA on nn.Conv1d/2d/3d: A is a conv with the base's kernel, stride and padding into r
    channels, B a 1x1 conv back to the output channels (PEFT's layout)."""

    kind = "conv"

    def __init__(self, base: nn.modules.conv._ConvNd) -> None:
        super().__init__(base)
        self.in_channels, self.out_channels = base.in_channels, base.out_channels
        self._conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[self.weight.dim() - 2]

    def _base_forward(self, x: Tensor) -> Tensor:
        return self._base._conv_forward(x, self.weight, self.bias)

    def _adapter_forward(self, x: Tensor, a: LoraAdapter) -> Tensor:
        b = self._base
        x = a.dropout(x)
        if b.padding_mode != "zeros":
            padded = F.pad(x, b._reversed_padding_repeated_twice, mode=b.padding_mode)
            h = self._conv(padded, a.lora_A, None, b.stride, 0, b.dilation)
        else:
            h = self._conv(x, a.lora_A, None, b.stride, b.padding, b.dilation)
        lora = self._conv(h, a.lora_B) * a.scale
        if not a.dora:
            return lora
        # DoRA (PEFT's _DoraConvNdLayer): (f - 1) * conv(dropout(x), W) + f * lora, f (out,) per output channel,
        # the norm over each output channel's (in, *kernel) filter of W + dW
        f = self._dora_factor(a, lora.dtype).reshape(-1, *(1,) * (self.weight.dim() - 2))  # (out, 1, ...)
        return (f - 1) * b._conv_forward(x, self.weight, None) + f * lora

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, active={self.active}"


def is_conv1d_hf(module: nn.Module) -> bool:
    """Hugging Face's GPT-2 style Conv1D: a linear layer whose weight is stored (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d_hf(module)


def supported(module: nn.Module) -> bool:
    return (is_linear_like(module) or isinstance(module, nn.Embedding)
            or isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)))


def wrap(module: nn.Module) -> LoraLayer:
    """The right wrapper for a supported base module."""
    from .quant import LoraQuantLinear, is_bnb_linear  # quant imports this module

    if is_bnb_linear(module):  # a subclass of nn.Linear whose weight is packed
        return LoraQuantLinear(module)
    if isinstance(module, nn.Linear):
        return LoraLinear(module)
    if is_conv1d_hf(module):
        return LoraLinear(module, fan_in_fan_out=True)
    if isinstance(module, nn.Embedding):
        return LoraEmbedding(module)
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if module.groups != 1:
            raise StateError(f"Conv with groups={module.groups} is not supported by LoRA here; exclude it.")
        return LoraConv(module)
    raise TypeError(type(module).__name__)


def new_adapter(layer: LoraLayer, weight_name: str, r: int, alpha: float, rslora: bool, dropout: float,
                init: str, slices: list[bool] | None, name: str = "default", dora: bool = False) -> LoraAdapter:
    """Create adapter `name` sized for `layer`, initialized by `init` (see LoraConfig.init).

    init='pissa' also rewrites the layer's weight to the residual (see `pissa_init`). With `dora` the
    adapter gets a magnitude, ||W + scale * B @ A|| per output row of the layer's weight as it is now.

    Raises:
        ConfigError: `dora` on a layer that cannot take it (see `check_dora`).
        StateError: init='pissa' where PiSSA does not apply, or slices on a layer other than a linear.
    """
    if dora:
        check_dora(layer, weight_name)
    w = layer.weight
    dev, dt = w.device, layer.adapter_dtype()
    if init == "pissa" and layer.quantized:
        raise StateError(f"init='pissa' needs a floating-point weight; {weight_name} is quantized "
                         f"({type(layer._base).__name__}). Use init='kaiming' or 'gaussian' on a quantized base.")
    if isinstance(layer, LoraEmbedding):
        n_in, n_out, kernel = layer.num_embeddings, layer.embedding_dim, ()
    elif isinstance(layer, LoraConv):
        n_in, n_out, kernel = layer.in_channels, layer.out_channels, tuple(w.shape[2:])
    else:
        n_in, n_out, kernel = layer.in_features, layer.out_features, ()
    ones = (1,) * len(kernel)
    if slices is not None:
        if not isinstance(layer, LoraLinear):
            raise StateError(f"slices apply to linear layers only, not to {weight_name} "
                             f"({type(layer._base).__name__}).")
        if n_out % len(slices):
            raise StateError(f"{weight_name}: output size {n_out} does not split into {len(slices)} equal slices.")
        k = sum(slices)
        A = torch.empty(k * r, n_in, device=dev, dtype=dt)
        B = torch.zeros(n_out // len(slices) * k, r, device=dev, dtype=dt)
    else:
        A = torch.empty(r, n_in, *kernel, device=dev, dtype=dt)
        B = torch.zeros(n_out, r, *ones, device=dev, dtype=dt)
    adapter = LoraAdapter(A, B, alpha, r, rslora, dropout, slices)
    adapter.train(layer.training)  # its dropout acts only while the model trains, as the layer's own modules
    with torch.no_grad():
        if init == "zeros":
            adapter.lora_A.zero_()
        elif isinstance(layer, LoraEmbedding):  # PEFT/loralib: A = 0, B ~ N(0, 1)
            adapter.lora_A.zero_()
            nn.init.normal_(adapter.lora_B)
        elif init == "gaussian":
            nn.init.normal_(adapter.lora_A, std=1.0 / r)
        else:  # kaiming; also the placeholder for pissa, which `pissa_init` then overwrites
            nn.init.kaiming_uniform_(adapter.lora_A, a=math.sqrt(5))
    if init == "pissa":
        pissa_init(layer, adapter, weight_name, name)
    if dora:
        norm = LF.dora_weight_norm(layer.weight_out_in(), adapter.lora_A, adapter.full_B(), adapter.scale)
        if isinstance(layer, LoraConv):  # PEFT's shape for convolutions: (1, out, 1, ...)
            norm = norm.reshape(1, -1, *ones)
        adapter.lora_magnitude_vector = nn.Parameter(norm.to(dt))
    return adapter


def check_dora(layer: LoraLayer, weight_name: str) -> None:
    """Refuse DoRA where lorakit does not compute it: on a quantized layer (it takes nn.Linear, GPT-2's Conv1D,
    nn.Embedding and nn.Conv1d/2d/3d, as PEFT does).

    Raises:
        ConfigError: naming the module, its type and what to do.
    """
    base = type(layer._base).__name__
    if layer.quantized:
        raise ConfigError(f"dora=True cannot adapt {weight_name} ({base}): DoRA needs the norm of the weight, "
                          "and lorakit computes it for unquantized weights only. Use dora=False on a quantized "
                          "base, or load the base in 16 bits.")
    if not isinstance(layer, (LoraLinear, LoraEmbedding, LoraConv)):
        raise ConfigError(f"dora=True cannot adapt {weight_name} ({base}): lorakit's DoRA takes linear layers "
                          "(nn.Linear, GPT-2's Conv1D), nn.Embedding and nn.Conv1d/2d/3d. Leave the module out of "
                          "targets (or exclude it), or adapt it in another adapter with dora=False.")


def pissa_init(layer: LoraLayer, adapter: LoraAdapter, weight_name: str, name: str) -> None:
    """Set A, B to the top-r SVD factors of W and replace W by the residual W - scale * B0 @ A0.

    The initial factors A0 (r, in) and B0 (out, r) stay with the adapter as buffers `pissa_A0` /
    `pissa_B0` (not trained, not saved in the model's state_dict): an adapter file for the original
    weight is written from B @ A - B0 @ A0 (`lorakit.io.adapter_state_dict`). The residual is a change
    of the layer's weight like a merge (`LoraLayer.residuals`): deleting the adapter or ejecting
    without merging gives the original weight back bit for bit.
    """
    if not isinstance(layer, LoraLinear) or adapter.slices is not None:
        raise StateError(f"init='pissa' supports plain linear layers only; {weight_name} is "
                         f"{type(layer._base).__name__}. Exclude it or use init='kaiming'.")
    if layer.merged:
        raise StateError(f"{weight_name}: unmerge before adding a pissa adapter.")
    w = layer.weight.data
    A, B, _ = LF.pissa_factors(w.t() if layer.fan_in_fan_out else w, adapter.r, adapter.scale)
    with torch.no_grad():
        adapter.lora_A.copy_(A)
        adapter.lora_B.copy_(B)
    # the residual is taken from the factors as the adapter holds them (in the weight's dtype), so that
    # residual + scale * B0 @ A0 is the original weight up to one rounding
    adapter.register_buffer("pissa_A0", adapter.lora_A.detach().clone(), persistent=False)
    adapter.register_buffer("pissa_B0", adapter.lora_B.detach().clone(), persistent=False)
    edit = WeightEdit(adapter.pissa_A0, adapter.pissa_B0, -adapter.scale)
    try:
        edit.restore = LF.merge_exact(w, layer._edit_delta(edit))
    except FloatingPointError:
        raise MergeError(f"{weight_name}: the PiSSA residual overflows its {w.dtype} weight; use init='kaiming' "
                         "or a wider dtype.") from None
    layer.residuals[name] = edit
