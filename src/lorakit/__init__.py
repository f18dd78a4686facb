"""lorakit: LoRA (Hu et al. 2022) for any PyTorch model.

    import lorakit as lk
    lk.inject(model, lk.LoraConfig(r=8, alpha=16, targets=["q_proj", "v_proj"]))

`import lorakit` needs torch and safetensors only. The CUDA-graphed training step and the static-cache
decoder are imported on first use; training (`lorakit.train`), evaluation (`lorakit.eval`) and the
command line need the extras named in pyproject.toml.
"""

import importlib

from .combine import combine
from .config import LoraConfig
from .errors import (AdapterFileError, AdapterNotFoundError, ConfigError, GraphError, LoraError, MergeError,
                     ShapeMismatchError, StateError, TargetError)
from .inject import (active_adapters, adapter_names, count_parameters, delete_adapter, disabled, eject,
                     inject, lora_layers, merge, route, set_adapter, trainable_parameters, unmerge)
from .io import load_adapter, save_adapter
from .fast import FusionHandle, explain, fuse, set_fast_path, unfuse

__version__ = "0.1.0"

# name -> module that defines it, imported by __getattr__ on first access: these parts of the fast path
# reach for transformers (the decoder's cache) or capture CUDA graphs, which the core does not need.
_LAZY = {
    "Decoder": ".fast.decode",
    "GreedyDecoder": ".fast.decode",
    "greedy_decode": ".fast.decode",
    "graphed_step": ".fast.graphs",
    "graphed_update": ".fast.graphs",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lorakit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "LoraConfig", "inject", "set_adapter", "disabled", "route", "merge", "unmerge", "eject",
    "save_adapter", "load_adapter", "combine", "trainable_parameters", "count_parameters", "delete_adapter",
    "adapter_names", "active_adapters", "lora_layers", "set_fast_path", "explain", "fuse", "unfuse", "FusionHandle",
    "graphed_step", "graphed_update",
    "Decoder", "GreedyDecoder", "greedy_decode",
    "LoraError", "ConfigError", "TargetError", "AdapterNotFoundError", "AdapterFileError",
    "ShapeMismatchError", "StateError", "MergeError", "GraphError",
]
