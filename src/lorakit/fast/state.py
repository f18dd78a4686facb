"""Which path adapted linears take, and what the fast path keeps between calls of one model.

The mode is one visible switch (`set_fast_path`); everything the fast path remembers about a model
(decode launch plans, stacked adapters of a route, a decoder's pinned stacks, the fusion's sibling
groups and the inputs its producers can rebuild) lives in one `FastState` per model, reached from
each adapted linear's `fast_state` field. Nothing is stored on activation tensors.

Torch only: Triton is imported on the first fast-path call (`lorakit.fast.ops`).
"""

from __future__ import annotations

import copy
import os
from typing import Callable

import torch
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from ..errors import ConfigError

# The one debug variable: LORAKIT_FAST_PATH=auto|on|off sets the mode a process starts in.
_MODE = {"mode": os.environ.get("LORAKIT_FAST_PATH", "auto")}
_MODES = ("auto", "on", "off")


def set_fast_path(mode: str, *, triton: bool | None = None) -> None:
    """Choose how LoRA linears compute: "auto" (the fused path on CUDA), "on" (fused everywhere) or "off".

    Both paths compute the same function (tests/test_contract.py runs the contract table with each).
    `triton=False` keeps the fused autograd Functions but runs each of their steps with PyTorch ops;
    `triton=True` lets the Triton kernels run again where they apply. The process starts in the mode
    of the environment variable LORAKIT_FAST_PATH (default "auto").

    Raises:
        ConfigError: an unknown mode.
    """
    if mode not in _MODES:
        raise ConfigError(f"fast path mode must be 'auto', 'on' or 'off', got {mode!r}.")
    _MODE["mode"] = mode
    if triton is not None:
        from . import triton as _triton

        _triton.ENABLED["on"] = bool(triton) and _triton.triton is not None


def fast_path_mode() -> str:
    """The current mode: "auto", "on" or "off"."""
    return _MODE["mode"]


def enabled_for(x: Tensor) -> bool:
    """Whether the fast path handles input x under the current mode."""
    mode = _MODE["mode"]
    return mode == "on" or (mode == "auto" and x.is_cuda)


class FastState:
    """Everything the fast path keeps for one model between calls; rebuilt on demand, never required.

    Per adapted linear (keyed by the layer object): `plans` (a decode launch repeated from its
    first call), `scales` (a route's scales as a device tensor), `stacks` (a route's stacked adapters
    while serving), `pins` (a decoder's stacks and rows tensor). Set by `lk.fuse`: `groups` (the
    sibling group of each member) and `handle`. `recipes`: for an input a fused producer made, how to
    rebuild it in backward (fn, tensors, version of the input), keyed weakly by the input tensor.
    """

    def __init__(self) -> None:
        # Plain dicts keyed by layer: the state is reachable only from the model's own layers, so the
        # model, its layers and this state are collected together.
        self.plans: dict[nn.Module, object] = {}
        self.scales: dict[nn.Module, tuple] = {}
        self.stacks: dict[nn.Module, tuple] = {}
        self.pins: dict[nn.Module, tuple] = {}
        self.groups: dict[nn.Module, object] = {}
        self.recipes = WeakIdKeyDictionary()  # tensor -> (fn, tensors, version); gone with the tensor
        self.handle = None

    def mark(self, x: Tensor, fn: Callable, *tensors: Tensor) -> None:
        """Note that x == fn(*tensors) exactly, so that backward may rebuild x instead of keeping it.
        x must not change in place afterwards (a changed version drops the note)."""
        self.recipes[x] = (fn, tensors, x._version)

    def recipe(self, x: Tensor) -> tuple[Callable, tuple[Tensor, ...]] | None:
        """The (fn, tensors) noted for x, or None (also once x was changed in place, and under torch.compile
        tracing, where the compiler plans memory itself)."""
        if torch.compiler.is_compiling() or not self.recipes:
            return None
        entry = self.recipes.get(x)
        if entry is None or entry[2] != x._version:
            return None
        return entry[0], entry[1]

    def clear_caches(self) -> None:
        """Drop what only speeds calls up (plans, stacks, scales); fusion and pins stay."""
        self.plans.clear()
        self.scales.clear()
        self.stacks.clear()

    def __deepcopy__(self, memo) -> FastState:
        # A copied model gets its own state: the fusion's groups point at the copied layers, caches start empty.
        new = FastState()
        memo[id(self)] = new
        for layer, group in self.groups.items():
            new.groups[copy.deepcopy(layer, memo)] = copy.deepcopy(group, memo)
        new.handle = copy.deepcopy(self.handle, memo)
        return new

    def __getstate__(self):
        return {}  # caches and fusion do not travel with a pickled model; `lk.fuse` it again

    def __setstate__(self, state) -> None:
        self.__init__()


def state_of(layer: nn.Module) -> FastState:
    """The FastState of the model `layer` belongs to (one of its own until `model_state` joins it)."""
    state = layer.__dict__.get("fast_state")
    if state is None:
        state = layer.__dict__["fast_state"] = FastState()
    return state


def model_state(model: nn.Module) -> FastState:
    """The one FastState of `model`'s adapted linears, made or joined now (layers of another state
    join this one and leave their caches behind)."""
    from ..layers import LoraLinear

    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    states = {id(s): s for s in (m.__dict__.get("fast_state") for m in layers) if s is not None}
    shared = next((s for s in states.values() if s.handle is not None), None) \
        or next(iter(states.values()), None) or FastState()
    for m in layers:
        m.__dict__["fast_state"] = shared
    return shared
