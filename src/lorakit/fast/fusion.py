"""Fusion across modules, set up by one explicit call: `handle = lk.fuse(model)`.

Two things the per-linear fused Function cannot see on its own:

* **Sibling groups.** q/k/v (and gate/up) are separate linears that read the same tensor. For
  the model families of `families()` (and any the caller declares with `groups=`), the adapted
  members of such a group compute their outputs in one `ops.lora_linear_group` call in training:
  x read once, one concatenated A, one dropout mask on x shared by the group (as if dropout were
  applied to x once, before the projections), input gradients summed in place. The first member
  called with a tensor computes every member's output; the others pick theirs up if they are
  called with that very tensor, unchanged, else compute alone.

* **Producers.** The LoRA Function keeps its input x for the gradient of A. When x is the output
  of a Llama-style RMSNorm, or the `act(gate) * up` product of a gated MLP, the ops that made x
  keep their own inputs for backward anyway, so x can be rebuilt from those and need not stay
  alive. `fuse` gives the modules of a registered producer class (`producers()`, extended by
  `register_producer`) a forward that computes the class's result op for op and notes the recipe
  in the model's `FastState`.

`fuse` changes nothing else; `handle.report()` says what it set up and what it skipped,
`handle.undo()` (or `lk.unfuse(model)`) puts back every forward it replaced. Fusion only changes
how the fast path computes (`lk.set_fast_path`); the reference path computes the same outputs.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from .state import FastState, fast_path_mode, model_state

QKV = ("q_proj", "k_proj", "v_proj")
GATE_UP = ("gate_proj", "up_proj")


# -- producers: forwards that note how to rebuild their output ----------------------------------------
def _marking() -> bool:
    # A recipe only helps an autograd graph; under torch.compile tracing the compiler plans memory itself.
    return torch.is_grad_enabled() and not torch.compiler.is_compiling()


def rms_norm_forward(module: nn.Module, state: FastState, hidden_states: Tensor) -> Tensor:
    """The Llama-family RMSNorm forward, op for op; its output is noted as rebuildable from the float32
    input and 1/rms, which pow and the multiply keep for their own backward anyway."""
    input_dtype = hidden_states.dtype
    h32 = hidden_states.to(torch.float32)
    variance = h32.pow(2).mean(-1, keepdim=True)
    rstd = torch.rsqrt(variance + module.variance_epsilon)
    out = module.weight * (h32 * rstd).to(input_dtype)
    if hidden_states.requires_grad and _marking() and out.dtype == module.weight.dtype == input_dtype:
        from .ops import rms_norm_apply

        state.mark(out, rms_norm_apply, h32, rstd, module.weight)
    return out


def gated_mlp_forward(module: nn.Module, state: FastState, x: Tensor) -> Tensor:
    """down_proj(act_fn(gate_proj(x)) * up_proj(x)); the product is noted as rebuildable from its two
    factors, which the multiply keeps for its own backward anyway."""
    s = module.act_fn(module.gate_proj(x))
    u = module.up_proj(x)
    h = s * u
    if h.requires_grad and _marking():
        state.mark(h, torch.mul, s, u)
    return module.down_proj(h)


@dataclass(frozen=True)
class Family:
    """A model family's module classes: which children of which class form sibling groups, and which
    classes are producers (tests/test_fusion.py checks each producer against its class's forward)."""

    name: str
    groups: dict[type, tuple[tuple[str, ...], ...]]
    producers: dict[type, Callable]


def _llama_like(name: str, module, prefix: str, norm: bool = True) -> Family:
    attn, mlp = getattr(module, f"{prefix}Attention"), getattr(module, f"{prefix}MLP")
    producers: dict[type, Callable] = {mlp: gated_mlp_forward}
    if norm:
        producers[getattr(module, f"{prefix}RMSNorm")] = rms_norm_forward
    return Family(name, {attn: (QKV,), mlp: (GATE_UP,)}, producers)


def families() -> list[Family]:
    """The declared table of known Hugging Face model families (those the installed transformers has)."""
    out: list[Family] = []
    try:
        from transformers.models.llama import modeling_llama
        from transformers.models.mistral import modeling_mistral
        from transformers.models.qwen2 import modeling_qwen2
    except ImportError:
        return out
    out += [_llama_like("llama", modeling_llama, "Llama"), _llama_like("mistral", modeling_mistral, "Mistral"),
            _llama_like("qwen2", modeling_qwen2, "Qwen2")]
    try:
        from transformers.models.qwen3 import modeling_qwen3
        out.append(_llama_like("qwen3", modeling_qwen3, "Qwen3"))
    except ImportError:
        pass
    try:  # Gemma's RMSNorm scales by (1 + weight): groups only
        from transformers.models.gemma import modeling_gemma
        from transformers.models.gemma2 import modeling_gemma2
        out += [_llama_like("gemma", modeling_gemma, "Gemma", norm=False),
                _llama_like("gemma2", modeling_gemma2, "Gemma2", norm=False)]
    except ImportError:
        pass
    try:  # Phi-3 has fused qkv_proj and gate_up_proj (nothing to group), and the Llama RMSNorm
        from transformers.models.phi3 import modeling_phi3
        out.append(Family("phi3", {}, {modeling_phi3.Phi3RMSNorm: rms_norm_forward}))
    except ImportError:
        pass
    return out


_EXTRA_PRODUCERS: dict[type, Callable] = {}


def register_producer(cls: type, forward: Callable[[nn.Module, FastState, Tensor], Tensor]) -> None:
    """Make modules of class `cls` producers for `fuse`: `forward(module, state, x)` must compute exactly
    what `cls.forward(module, x)` computes and may call `state.mark(out, fn, *tensors)` (see
    `rms_norm_forward`, `gated_mlp_forward`)."""
    _EXTRA_PRODUCERS[cls] = forward


def producers() -> dict[type, Callable]:
    """Producer class -> forward, from the family table and `register_producer`."""
    table: dict[type, Callable] = {}
    for fam in families():
        table.update(fam.producers)
    table.update(_EXTRA_PRODUCERS)
    return table


class _ProducerForward:
    """The instance forward `fuse` gives a producer module; undone by deleting it, or by putting back the
    instance forward it replaced (`replaced`, with fuse(..., replace_instance_forwards=True))."""

    def __init__(self, fn: Callable, module: nn.Module, state: FastState, replaced: Callable | None = None) -> None:
        self.fn, self.module, self.state, self.replaced = fn, module, state, replaced

    def restore(self) -> None:
        del self.module.forward
        if self.replaced is not None:
            self.module.forward = self.replaced

    def __call__(self, *args, **kwargs):
        return self.fn(self.module, self.state, *args, **kwargs)


# -- sibling groups -------------------------------------------------------------------------------------
class SiblingGroup:
    """Adapted linears of one parent that read one input (q/k/v, gate/up): one fused call in training."""

    def __init__(self, name: str, members: list[nn.Module]) -> None:
        self.name = name
        self.members = members
        self._pending: tuple[weakref.ref, int, dict[int, Tensor]] | None = None  # (x, x._version, outputs)

    def __repr__(self) -> str:
        return f"SiblingGroup({self.name}: {len(self.members)} members)"

    def forward(self, member: nn.Module, x: Tensor, state: FastState) -> Tensor | None:
        """member's output, made now with its siblings' or picked up; None: compute it alone."""
        i = self.members.index(member)
        pending = self._pending
        if pending is not None:
            self._pending = None
            ref, version, outs = pending
            if ref() is x and x._version == version and i in outs:
                y = outs.pop(i)
                if outs:
                    self._pending = pending
                return y
        ys = self._run(x, state)
        if ys is None:
            return None
        outs = dict(enumerate(ys))
        y = outs.pop(i)
        self._pending = (weakref.ref(x), x._version, outs)
        return y

    def _run(self, x: Tensor, state: FastState) -> tuple[Tensor, ...] | None:
        """Every member's output in one fused call, or None when their states differ."""
        adapters = []
        for layer in self.members:
            if layer.disabled or layer.routing is not None:
                return None
            active = layer._unmerged_active()
            if len(active) != 1:
                return None
            adapters.append(active[0])
        p, training = adapters[0].dropout_p, self.members[0].training
        if any(a.dropout_p != p for a in adapters) or any(m.training != training for m in self.members):
            return None
        dora = [a.dora for a in adapters]
        if any(dora) and training and p > 0:
            return None  # DoRA's dropout needs the base GEMM on the dropped x: the reference path
        from .ops import dora_output, lora_linear_group

        ys = lora_linear_group(x, [m.weight_out_in() for m in self.members],
                               [None if d else m.bias for m, d in zip(self.members, dora)],
                               [a.lora_A for a in adapters], [a.full_B() for a in adapters],
                               [a.scale for a in adapters], p, training, recompute=state.recipe(x))
        # a DoRA member's output x @ (W + s*B@A).T is scaled by m / ||W + s*B@A|| per output, then its bias added
        return tuple(dora_output(y, a.lora_magnitude_vector, a.weight_norm(m.weight_out_in()), m.bias) if d else y
                     for y, a, m, d in zip(ys, adapters, self.members, dora))

    def __getstate__(self):
        return {"name": self.name, "members": self.members, "_pending": None}


# -- the handle -----------------------------------------------------------------------------------------
@dataclass
class FusionHandle:
    """What `fuse` set up on one model, and how to undo it. `str(handle)` is `report()`."""

    model: nn.Module
    groups: list[SiblingGroup] = field(default_factory=list)
    producers: list[tuple[str, str]] = field(default_factory=list)   # (module name, class name)
    skipped: list[tuple[str, str]] = field(default_factory=list)     # (module name, why)
    active: bool = True

    def report(self) -> str:
        """A few lines: the groups and producers set up, what was skipped and why, and the fast-path mode."""
        names = {id(m): n for n, m in self.model.named_modules()}
        lines = [f"lorakit fusion: {len(self.groups)} sibling groups, {len(self.producers)} producers "
                 f"(fast path mode {fast_path_mode()!r}){'' if self.active else ', undone'}"]
        for g in self.groups:
            lines.append(f"  group    {g.name}: " + ", ".join(names.get(id(m), "?").rsplit(".", 1)[-1]
                                                            for m in g.members))
        for name, cls in self.producers:
            lines.append(f"  producer {name} ({cls})")
        for name, why in self.skipped:
            lines.append(f"  skipped  {name}: {why}")
        return "\n".join(lines)

    __str__ = report

    def undo(self) -> None:
        """Put back every forward `fuse` replaced and drop the groups. Idempotent."""
        if not self.active:
            return
        for m in self.model.modules():
            forward = m.__dict__.get("forward")
            if isinstance(forward, _ProducerForward):
                forward.restore()
        state = model_state(self.model)
        state.groups.clear()
        state.recipes.clear()
        state.handle = None
        self.active = False


def fuse(model: nn.Module, groups: dict[type, Iterable[tuple[str, ...]]] | None = None, *,
         replace_instance_forwards: bool = False) -> FusionHandle:
    """Fuse what the fast path can compute across modules of `model` (see this module's docstring).

    Sibling groups come from the family table (`families()`) plus `groups` (module class -> tuples of child
    names that read one input); producers from `producers()`. Call it after `lk.inject` (and again after
    adapting other modules). Calling it on a model already fused returns the handle in place.

    A producer module that already has an instance forward of its own (Liger's kernels, patched into a built
    model's modules by `Trainer(use_liger_kernel=True)`, are such) is left as it is, and the report says so,
    unless `replace_instance_forwards`: then lorakit's forward for its class (the same function: RMSNorm, the
    gated MLP) takes its place, so that the LoRA inputs it produces are rebuilt in backward instead of kept,
    and `undo` puts the instance forward back. The report lists each one replaced.

    Returns:
        The `FusionHandle`: `report()` lists what changed, `undo()` restores every forward.

    Raises:
        StateError: the model has no adapted linear yet (nothing changed).
    """
    from ..errors import StateError
    from ..layers import LoraLinear

    if not any(isinstance(m, LoraLinear) for m in model.modules()):
        raise StateError(f"lk.fuse: {type(model).__name__} has no adapted linear layer; call lk.inject(model, cfg) "
                         "first, then lk.fuse(model).")
    state = model_state(model)
    if state.handle is not None and state.handle.active:
        return state.handle

    table: dict[type, list[tuple[str, ...]]] = {}
    for fam in families():
        for cls, tuples in fam.groups.items():
            table.setdefault(cls, []).extend(tuples)
    for cls, tuples in (groups or {}).items():
        table.setdefault(cls, []).extend(tuple(t) for t in tuples)
    makers = producers()
    handle = FusionHandle(model)
    for name, module in model.named_modules():
        for names in table.get(type(module), ()):
            children = [getattr(module, n, None) for n in names]
            members = [c for c in children if isinstance(c, LoraLinear)]
            if len(members) < 2:
                if members:
                    adapted = [n for n, c in zip(names, children) if c in members]
                    handle.skipped.append((name, f"group ({', '.join(names)}): only {adapted} adapted; "
                                                 "a group needs 2"))
                continue
            if any(m.quantized for m in members):  # they take the reference path (lorakit.quant)
                handle.skipped.append((name, f"group ({', '.join(names)}): quantized base"))
                continue
            if len({m.in_features for m in members}) != 1:
                handle.skipped.append((name, f"group ({', '.join(names)}): input sizes differ"))
                continue
            group = SiblingGroup(name, members)
            handle.groups.append(group)
            for m in members:
                state.groups[m] = group
        fn = makers.get(type(module))
        if fn is not None:
            own = module.__dict__.get("forward")
            if own is not None and not replace_instance_forwards:
                handle.skipped.append((name, "has an instance forward of its own; left as it is (fuse(..., "
                                             "replace_instance_forwards=True) replaces it, and undo puts it back)"))
                continue
            module.forward = _ProducerForward(fn, module, state, replaced=own)
            handle.producers.append((name, type(module).__name__ + (", its instance forward replaced" if own
                                                                    is not None else "")))
    state.handle = handle
    return handle


def unfuse(model: nn.Module) -> None:
    """Undo `fuse(model)` if it was fused; idempotent."""
    from ..layers import LoraLinear

    for m in model.modules():
        if isinstance(m, LoraLinear):
            state = m.__dict__.get("fast_state")
            if state is not None and state.handle is not None:
                state.handle.undo()
                return
    for m in model.modules():  # producers of a fused model whose adapted linears are gone (ejected)
        forward = m.__dict__.get("forward")
        if isinstance(forward, _ProducerForward):
            forward.restore()
