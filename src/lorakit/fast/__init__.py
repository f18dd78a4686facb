"""lorakit's fast path: the same function as `lorakit.functional`, computed with fewer passes over memory.

    lk.set_fast_path("auto" | "on" | "off", triton=...)   the one switch (state.py)
    lk.explain(layer, x)                                     which path a call takes (dispatch.py)
    handle = lk.fuse(model); print(handle); handle.undo()    fusion across modules (fusion.py)

Modules:
    state.py     the mode and `FastState`, everything the fast path keeps for one model
    dispatch.py  the table of paths of an adapted linear (`PATHS`), `choose` and `explain`
    fusion.py    sibling groups and producers, set up only by `fuse`
    ops.py       the entry points and their autograd Functions: one linear (`lora_linear`), several
                 adapters on one linear (`lora_linear_multi`), linears sharing an input (`lora_linear_group`)
    routed.py    per-example adapters (`lora_linear_routed`)
    triton/      the Triton kernels by family (CUDA, or CPU under TRITON_INTERPRET=1)
    graphs.py    `lk.graphed_step` / `lk.graphed_update`: a training step as CUDA graphs
    decode.py    `lk.Decoder` / `lk.greedy_decode`: the static-cache decoder, a CUDA graph per token

This package imports torch only; ops.py, routed.py and triton/ (Triton) load on the first fast-path call,
graphs.py and decode.py on first use of their names.
"""

from .dispatch import explain
from .dispatch import forward as linear_forward
from .fusion import FusionHandle, fuse, register_producer, unfuse
from .state import FastState, enabled_for, fast_path_mode, set_fast_path, state_of


def release_route(layer) -> None:
    """Drop what the fast path stacked for `layer` while a route was active (called when the route ends)."""
    state = layer.__dict__.get("fast_state")
    if state is not None:
        state.stacks.pop(layer, None)
        state.scales.pop(layer, None)


__all__ = ["FastState", "FusionHandle", "enabled_for", "explain", "fast_path_mode", "fuse", "linear_forward",
           "register_producer", "release_route", "set_fast_path", "state_of", "unfuse"]
