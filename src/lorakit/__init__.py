"""lorakit: LoRA (Hu et al. 2022) for any PyTorch model.

    import lorakit as lk
    lk.inject(model, lk.LoraConfig(r=8, alpha=16, targets=["q_proj", "v_proj"]))
"""

from .config import LoraConfig
from .errors import (AdapterFileError, AdapterNotFoundError, ConfigError, GraphError, LoraError, MergeError,
                     ShapeMismatchError, StateError, TargetError)
from .inject import (active_adapters, adapter_names, count_parameters, delete_adapter, disabled, eject,
                     inject, lora_layers, merge, route, set_adapter, trainable_parameters, unmerge)
from .decode import Decoder, GreedyDecoder, greedy_decode
from .graphs import graphed_step, graphed_update
from .io import load_adapter, save_adapter
from .fast import FusionHandle, explain, fuse, set_fast_path, unfuse

__version__ = "0.1.0"

__all__ = [
    "LoraConfig", "inject", "set_adapter", "disabled", "route", "merge", "unmerge", "eject",
    "save_adapter", "load_adapter", "trainable_parameters", "count_parameters", "delete_adapter",
    "adapter_names", "active_adapters", "lora_layers", "set_fast_path", "explain", "fuse", "unfuse", "FusionHandle",
    "graphed_step", "graphed_update",
    "Decoder", "GreedyDecoder", "greedy_decode",
    "LoraError", "ConfigError", "TargetError", "AdapterNotFoundError", "AdapterFileError",
    "ShapeMismatchError", "StateError", "MergeError", "GraphError",
]
