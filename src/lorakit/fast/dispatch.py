"""The fast path of an adapted linear: one table of paths, one function that picks, and `explain`.

`LoraLinear.forward` calls `forward(layer, x)` when the fast path is on for x (`state.enabled_for`).
`choose(layer, x)` names the path from the layer's state and the call (grad mode, route, adapters);
`PATHS[name]` computes it; `explain(layer, x)` says which path and which backend a call would take.
Every path computes the function of `lorakit.functional` (tests/test_kernels.py, test_fast_path.py).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .state import FastState, state_of

# lorakit.fast.ops and .routed (which import Triton), imported on the first fast-path call
_ops = _routed_ops = None


def _import_ops():
    global _ops, _routed_ops
    from . import ops, routed

    _ops, _routed_ops = ops, routed
    return ops


def _param(module, name: str) -> Tensor | None:
    # Decode runs every adapted linear once per token, and there the Python around the kernel launch is
    # the cost: a registered parameter is read from the module's own dict, without nn.Module.__getattr__.
    params = module._parameters
    return params[name] if name in params else getattr(module, name)


def _has_dora(layer) -> bool:
    """Whether any adapter of `layer` is a DoRA adapter (read from the modules' own dicts, see `_param`)."""
    for a in layer._modules["adapters"]._modules.values():
        if a._parameters.get("lora_magnitude_vector") is not None:
            return True
    return False


def _dora_path(layer) -> str | None:
    """"dora" or "reference" when a DoRA adapter acts in this call, else None (the LoRA paths apply)."""
    if layer.routing is not None:
        return "reference"  # a routed DoRA adapter: its per-row magnitudes on the reference path
    active = layer._unmerged_active()
    if not any(a.dora for a in active):
        return None
    if len(active) == 1 and not (layer.training and active[0].dropout_p > 0):
        return "dora"
    return "reference"  # several adapters, or DoRA's dropout (which needs the base GEMM on dropped x)


def choose(layer, x: Tensor) -> str:
    """The name of the path (a key of `PATHS`) that `layer(x)` takes on the fast path."""
    if _has_dora(layer):
        path = _dora_path(layer)
        if path == "dora" and torch.is_grad_enabled() and layer in state_of(layer).groups \
                and not torch.compiler.is_compiling():
            return "group"  # its siblings' call scales its output (`fusion.SiblingGroup`)
        if path is not None:
            return path
    if layer.routing is not None:
        if x.shape[0] != len(layer.routing):
            return "reference"  # which raises the explanatory error
        if not torch.is_grad_enabled() and layer in state_of(layer).pins:
            return "routed-pinned"
        rows, names, routed = layer._route_rows(x.device)
        p = routed[0].dropout_p if routed and layer.training else 0.0
        if not routed or (layer.training and any(a.dropout_p != p for a in routed)):
            return "reference"  # one dropout mask serves the routed adapters only if they share p
        return "routed"
    if not torch.is_grad_enabled():
        return "infer" if len(layer.active) == 1 and not layer.merged else "linear"
    if layer in state_of(layer).groups and not torch.compiler.is_compiling():
        return "group"
    return "linear"


def _reference(layer, x: Tensor) -> Tensor:
    """the layer's reference path (`lorakit.functional` per adapter)"""
    from ..layers import LoraLayer

    return LoraLayer.forward(layer, x)


def _adapters(layer, x: Tensor) -> Tensor:
    """one fused call: the base linear with every unmerged active adapter (`ops.lora_linear[_multi]`)"""
    ops = _ops or _import_ops()
    active = layer._unmerged_active()
    weight, bias = layer.weight_out_in(), layer.bias
    if not active:
        return layer._base_forward(x)
    if len(active) == 1:
        A, B, scale, p = active[0].operands()
        recompute = state_of(layer).recipe(x) if torch.is_grad_enabled() else None
        return ops.lora_linear(x, weight, bias, A, B, scale, p, layer.training, recompute=recompute)
    return ops.lora_linear_multi(x, weight, bias, [a.lora_A for a in active], [a.full_B() for a in active],
                                 [a.scale for a in active], [a.dropout_p for a in active], layer.training)


def _dora(layer, x: Tensor) -> Tensor:
    """one DoRA adapter, no dropout: the fused LoRA linear (`ops.lora_linear`) times m / ||W + s*B@A||, plus bias"""
    # the norm is made once per version of W, A and B (`LoraAdapter.weight_norm`)
    ops = _ops or _import_ops()
    a = layer._unmerged_active()[0]
    A, B, scale, _ = a.operands()
    weight, bias = layer.weight_out_in(), layer.bias
    recompute = state_of(layer).recipe(x) if torch.is_grad_enabled() else None
    z = ops.lora_linear(x, weight, None, A, B, scale, recompute=recompute)  # x @ (W + s*B@A).T: (..., out)
    return ops.dora_output(z, _param(a, "lora_magnitude_vector"), a.weight_norm(weight), bias)


def _group(layer, x: Tensor) -> Tensor:
    """one fused call for the layer's sibling group (`lk.fuse`), the output picked up by the others"""
    state = state_of(layer)
    y = state.groups[layer].forward(layer, x, state)
    if y is not None:
        return y
    return _dora(layer, x) if _has_dora(layer) else _adapters(layer, x)


def _infer(layer, x: Tensor) -> Tensor:
    """inference with one adapter: one Triton launch for few rows (repeated from a plan), else the fused call"""
    ops = _ops or _import_ops()
    a = layer._modules["adapters"]._modules.get(layer.active[0])
    if a is None:
        return _adapters(layer, x)
    A, B, scale, p = a.operands()
    if layer.fan_in_fan_out or (p > 0 and layer.training) or not x.is_cuda or torch.compiler.is_compiling():
        return ops.lora_linear(x, layer.weight_out_in(), layer.bias, A, B, scale, p, layer.training)
    weight, bias = _param(layer, "weight"), _param(layer, "bias")
    plans = state_of(layer).plans
    plan = plans.get(layer)
    y = plan(x, weight, bias, A, B, scale) if plan is not None else None
    if y is None:
        y = ops.lora_linear(x, weight, bias, A, B, scale)
        plans[layer] = ops.decode_plan(x, weight, bias, A, B, scale)
    return y


def _routed(layer, x: Tensor) -> Tensor:
    """per-example adapters (`lk.route`): stacked adapters, one fused call (`routed.lora_linear_routed`)"""
    _ops or _import_ops()
    ops = _routed_ops
    rows, _, routed = layer._route_rows(x.device)
    weight, bias = layer.weight_out_in(), layer.bias
    state = state_of(layer)
    stacks = _served_stacks(layer, routed, state)
    if stacks is not None and not (layer.training and routed[0].dropout_p > 0):
        return ops.routed_prepared(x, weight, bias, *stacks, rows)  # serving: stacks checked once
    p = routed[0].dropout_p if layer.training else 0.0
    A, B = ops.stack_adapters([a.lora_A for a in routed], [a.full_B() for a in routed])
    return ops.lora_linear_routed(x, weight, bias, A, B, _scales(layer, routed, x.device, state), rows,
                                  dropout=p, training=p > 0)


def _routed_pinned(layer, x: Tensor) -> Tensor:
    """a decoder's routed step (`lk.Decoder`): its own stacks and a rows tensor rewritten for each batch"""
    _ops or _import_ops()
    ops = _routed_ops
    rows, stacks = state_of(layer).pins[layer]
    if rows.shape[0] != x.shape[0]:
        return _routed(layer, x)
    return ops.routed_prepared(x, layer.weight_out_in(), layer.bias, *stacks, rows)


PATHS: dict[str, Callable[..., Tensor]] = {
    "reference": _reference,
    "linear": _adapters,
    "group": _group,
    "infer": _infer,
    "routed": _routed,
    "routed-pinned": _routed_pinned,
    "dora": _dora,
}


def forward(layer, x: Tensor) -> Tensor:
    """`layer(x)` on the fast path."""
    return PATHS[choose(layer, x)](layer, x)


def explain(layer, x: Tensor) -> str:
    """Which path `layer(x)` takes under the current mode, and whether the Triton kernels may run for x.

    For example "infer: inference with one adapter: ... [triton]". Nothing is computed.
    """
    from ..experts import LoraExperts
    from ..layers import LoraLinear
    from .state import enabled_for, fast_path_mode

    if isinstance(layer, LoraExperts):  # a module with adapted parameters (`lorakit.experts`)
        return layer.explain(x)
    if not isinstance(layer, LoraLinear) or layer.disabled or not enabled_for(x):
        why = "disabled" if getattr(layer, "disabled", False) else f"fast path mode {fast_path_mode()!r} on {x.device}"
        return f"reference: {_reference.__doc__} ({why})"
    if layer.quantized:
        base = type(layer._base).__name__
        if layer._fused_adapter(x) is not None:
            return (f"quantized: the 4-bit base dequantized inside forward and again inside backward, the adapter "
                    f"term added in the compute dtype, one autograd function ({base}) [torch]")
        return (f"reference: {_reference.__doc__} (quantized base {base}: its own forward plus the adapters; the "
                "fused path takes 4-bit bases with one unmerged, unrouted adapter)")
    name = choose(layer, x)
    from . import triton as _triton

    backend = "triton" if _triton.available_for(x) and not torch.compiler.is_compiling() else "torch"
    if name == "reference":  # the fast paths' exceptions, each with its reason
        if _has_dora(layer) and _dora_path(layer) == "reference":
            why = ("DoRA under a per-example route, with several adapters or with dropout in training: the fused "
                   "kernels take one DoRA adapter without dropout")
        else:
            why = ("per-example route: the batch does not match the route, no row goes to an adapter of this layer, "
                   "or the routed adapters' dropout probabilities differ")
        return f"reference: {_reference.__doc__} ({why}) [torch]"
    return f"{name}: {PATHS[name].__doc__} [{backend}]"


def _scales(layer, adapters, device: torch.device, state: FastState) -> Tensor:
    """The adapters' scales as a float32 tensor on `device`, made again only when one changes: a copy from
    the host on every call would stop a training step from being captured as a CUDA graph."""
    key = (device, *(a.scale for a in adapters))
    cache = state.scales.get(layer)
    if cache is None or cache[0] != key:
        cache = state.scales[layer] = (key, torch.tensor(key[1:], dtype=torch.float32, device=device))
    return cache[1]


def _served_stacks(layer, routed, state: FastState) -> tuple[Tensor, Tensor, Tensor] | None:
    """(A_stack, B_stack, scales) for serving (no autograd): stacked once per route and reused while every
    adapter tensor keeps its version. None when autograd needs the adapters: then they are stacked on
    every call, so that gradients reach each of them."""
    if torch.is_grad_enabled() and any(a.lora_A.requires_grad or a.lora_B.requires_grad for a in routed):
        return None
    tensors = [t for a in routed for t in (a.lora_A, a.lora_B)]
    key = ([id(t) for t in tensors], [t._version for t in tensors], [a.scale for a in routed])
    cache = state.stacks.get(layer)
    if cache is not None and cache[0] == key:
        return cache[1]
    stacks = stack(layer, routed)
    state.stacks[layer] = (key, stacks, tensors)  # the tensors are held so that their ids stay theirs
    return stacks


def stack(layer, adapters) -> tuple[Tensor, Tensor, Tensor]:
    """(A_stack, B_stack, scales) of these adapters for the routed kernels, in the weight's dtype (a copy,
    no autograd)."""
    _ops or _import_ops()
    ops = _routed_ops
    with torch.no_grad():
        A, B = ops.stack_adapters([a.lora_A for a in adapters], [a.full_B() for a in adapters])
        return (A.to(layer.weight.dtype).contiguous(), B.to(layer.weight.dtype).contiguous(),
                torch.tensor([a.scale for a in adapters], dtype=torch.float32, device=layer.weight.device))
