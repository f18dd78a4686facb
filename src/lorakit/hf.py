"""transformers' Trainer and TRL's trainers on a model adapted by `lk.inject`, with no subclass and no argument.

`lk.inject` calls `attach` on a transformers `PreTrainedModel`; `lk.eject` calls `detach`, which takes back
everything `attach` did. While attached, the model carries these things of its own:

- an instance attribute `save_pretrained` that writes the adapters in PEFT's format (`lk.save_adapter`:
  adapter_config.json + adapter_model.safetensors + model card; adapter "default" at the top, any other
  in a subfolder of its name, as PEFT lays them out) and `model.safetensors` holding only the parameters
  that train, under the model's own state_dict keys, never the frozen base. Trainer's checkpoints and
  `save_model` go through it. The second file is there because Trainer reloads a model that is not a
  `peft.PeftModel` from `model.safetensors` only (on `resume_from_checkpoint` and for
  `load_best_model_at_end`), through `model.load_state_dict(state, strict=False)`.
- a `load_state_dict` post-hook: when every key loaded names a parameter that trains, the frozen base
  weights are not reported as missing (they were never saved), so Trainer does not warn about them.
- a forward pre-hook on the input embeddings (on the model itself where it has none) that checks the
  model on its first forward in training mode with gradients on, before any optimizer step, and then
  removes itself: the model must have something to train, and no PEFT adapter beside lorakit's (PEFT's
  `save_pretrained` would write only its own). It raises `lk.LoraError`s that say what to do.
- on a quantized base (bitsandbytes through `BitsAndBytesConfig`), transformers' own mark of a model with
  adapters attached, `_hf_peft_config_loaded = True`, without which Trainer refuses to train a quantized model.

`reference_model(model)` is TRL's DPO reference for an adapted model: the same weights with the
adapters off (`lk.disabled`), as TRL uses a PEFT model with its adapter disabled.

This module imports torch and the standard library only; transformers is looked up where it is needed.
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, StateError

STATE = "_lorakit_hf"
"""model.__dict__ key of a model that `attach` set up, with what `detach` must undo (deep copies keep it)."""
TRAINABLE_NAME = "model.safetensors"
"""The file of the parameters that train, the one name Trainer reloads a model from."""


def _is_pretrained_model(model: nn.Module) -> bool:
    modeling = sys.modules.get("transformers.modeling_utils")  # loaded wherever a PreTrainedModel exists
    return modeling is not None and isinstance(model, modeling.PreTrainedModel)


class _FirstTrainingForward:
    """Forward pre-hook: `check(model)` on the first forward in training mode with gradients on, then gone.

    An object rather than a closure, so that a deep copy of the model gets a hook on the copy."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, module: nn.Module, args: Any) -> None:
        # the condition first: torch.compile traces it (no graph break for inference), then skips the check
        if self.model.training and torch.is_grad_enabled():
            _run_check(self.model)


def _check_and_remove(model: nn.Module) -> None:
    check(model)
    _remove_checks(model)


_run_check = _check_and_remove
"""What the hook calls; `attach` makes it `torch.compiler.disable(_check_and_remove)`, so that under torch.compile
the check (Python over the module tree) runs as Python, outside the graph (wrapped there, not here, because
importing torch's compiler is for models that Trainer may compile, not for every `import lorakit`)."""


def _remove_checks(model: nn.Module) -> None:
    for module in model.modules():
        hooks = module._forward_pre_hooks
        for key in [k for k, h in hooks.items() if isinstance(h, _FirstTrainingForward) and h.model is model]:
            del hooks[key]


def attach(model: nn.Module) -> None:
    """Make `model` save and reload its adapters under transformers' Trainer (see the module docstring).

    Does nothing unless `model` is a transformers `PreTrainedModel`. Calling it again (another
    `inject`) re-arms the first-training-forward check on the current input embeddings.
    """
    if not _is_pretrained_model(model):
        return
    global _run_check
    if _run_check is _check_and_remove:
        _run_check = torch.compiler.disable(_check_and_remove)
    if not model.__dict__.get(STATE):
        model.register_load_state_dict_post_hook(_quiet_frozen_missing_keys)
        model.__dict__["save_pretrained"] = types.MethodType(save_pretrained, model)
        # transformers' mark of a model with adapters attached, without which Trainer refuses a quantized base
        # ("purely quantized models"); set only there, and only where it was not set already
        marked = bool(getattr(model, "is_quantized", False)) and not getattr(model, "_hf_peft_config_loaded", False)
        if marked:
            model.__dict__["_hf_peft_config_loaded"] = True
        model.__dict__[STATE] = {"marked_adapters_loaded": marked}
    _remove_checks(model)
    try:
        site = model.get_input_embeddings()
    except (NotImplementedError, AttributeError):
        site = None
    (site if isinstance(site, nn.Module) else model).register_forward_pre_hook(_FirstTrainingForward(model))


def detach(model: nn.Module) -> None:
    """Take back everything `attach` put on `model`; a model it never touched is left alone."""
    state = model.__dict__.pop(STATE, None)
    if not state:
        return
    if state.get("marked_adapters_loaded"):
        model.__dict__.pop("_hf_peft_config_loaded", None)
    hooks = model._load_state_dict_post_hooks
    for key in [k for k, h in hooks.items() if h is _quiet_frozen_missing_keys]:
        del hooks[key]
    _remove_checks(model)
    model.__dict__.pop("save_pretrained", None)


# -- saving ------------------------------------------------------------------------------------------
def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters of `model` that train, by state_dict key, detached (shared storage cloned apart)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in model.state_dict(keep_vars=True).items():
        if isinstance(value, nn.Parameter) and value.requires_grad:
            t = value.detach().contiguous()
            ptr = t.untyped_storage().data_ptr()
            out[key] = t.clone() if ptr in seen else t
            seen.add(ptr)
    return out


def save_pretrained(model: nn.Module, save_directory: str | os.PathLike, is_main_process: bool = True,
                    state_dict: dict[str, Any] | None = None, **kwargs: Any) -> None:
    """`model.save_pretrained` while lorakit is attached: the adapters and the parameters that train.

    Writes adapter "default" to `save_directory` and every other adapter to `save_directory/<name>` with
    `lk.save_adapter` (PEFT's layout), and `model.safetensors` with the parameters that train under the
    model's state_dict keys. Nothing is written when `is_main_process` is false. The tensors are read
    from the model: `state_dict` and the other keyword arguments of `PreTrainedModel.save_pretrained`
    (sharding, hub upload) are ignored. A model whose adapters were all deleted saves as a plain model.

    Raises:
        AdapterFileError: a file cannot be written.
    """
    from safetensors.torch import save_file

    from .inject import adapter_names
    from .io import save_adapter

    names = adapter_names(model)
    if not names:
        return type(model).save_pretrained(model, save_directory, is_main_process=is_main_process,
                                           state_dict=state_dict, **kwargs)
    if not is_main_process:
        return None
    out = Path(save_directory)
    for name in names:
        save_adapter(model, out if name == "default" else out / name, name=name)
    tensors = {k: v.cpu() for k, v in trainable_state_dict(model).items()}
    save_file(tensors, str(out / TRAINABLE_NAME), metadata={"format": "pt", "lorakit": "parameters that train"})
    return None


# -- loading -----------------------------------------------------------------------------------------
def _quiet_frozen_missing_keys(model: nn.Module, incompatible: Any) -> None:
    """load_state_dict post-hook: a state dict of only parameters that train leaves the frozen ones as they
    are, so they are not reported missing (Trainer would warn about each base weight)."""
    trainable = {k for k, v in model.state_dict(keep_vars=True).items()
                 if isinstance(v, nn.Parameter) and v.requires_grad}
    missing = set(incompatible.missing_keys)
    loaded = set(model.state_dict(keep_vars=True)) - missing
    if loaded and loaded <= trainable:
        incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if k in trainable]


# -- checks before the first step ----------------------------------------------------------------------
def check(model: nn.Module) -> None:
    """Refuse to train a model whose training would be lost or empty: no PEFT adapters beside lorakit's,
    and at least one parameter that trains.

    Raises:
        StateError: the model also has PEFT adapters, or nothing in it trains.
    """
    from .inject import adapter_names, lora_layers

    peft_layers = [name for name, module in model.named_modules()
                   if any(c.__module__.startswith("peft.tuners") and c.__name__ == "BaseTunerLayer"
                          for c in type(module).__mro__)]
    if peft_layers:
        raise StateError(
            f"{type(model).__name__} has both lorakit adapters and PEFT adapters (e.g. {peft_layers[0]}); a Trainer "
            "would save only PEFT's. Train with one library: drop get_peft_model(...) and keep lk.inject(model, cfg), "
            "or lk.eject(model, merge=False) before wrapping the model with PEFT.")
    if not any(p.requires_grad for p in model.parameters()):
        names = adapter_names(model)
        if not names:
            raise StateError(
                f"{type(model).__name__} has no lorakit adapter left (all were deleted) and its base is frozen, so "
                "nothing would train. Add one with lk.inject(model, cfg), or lk.eject(model, merge=False) and unfreeze "
                "the weights for a full fine-tune.")
        frozen = [path for path, layer in lora_layers(model) if any(n in layer.adapters for n in names)][:1]
        raise StateError(
            f"Nothing in {type(model).__name__} trains: the parameters of adapter(s) {names} (e.g. in {frozen[0]}) "
            "have requires_grad=False. Make them train again with `for n, p in model.named_parameters(): "
            "p.requires_grad_(p.requires_grad or '.adapters.' in n)`, or reload the adapter with lk.load_adapter, "
            "which loads it trainable.")


# -- TRL's DPO reference -----------------------------------------------------------------------------------
class _Disabled(nn.Module):
    """Calls `inner` (a part of `model`) with `model`'s adapters off; holds neither as a submodule."""

    def __init__(self, model: nn.Module, inner: nn.Module) -> None:
        super().__init__()
        self.__dict__["_model"], self.__dict__["_inner"] = model, inner

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        from .inject import disabled

        with disabled(self._model):
            return self._inner(*args, **kwargs)


class Reference(_Disabled):
    """`model` with its adapters off, sharing its weights: the base model a DPO reference stands for.

    Its forward is `model`'s forward inside `lk.disabled(model)`. `config`, `base_model` (the backbone,
    also run with the adapters off) and `get_output_embeddings` are `model`'s, which is what TRL's fused
    log-prob head reads. It owns no parameters, so moving or preparing it changes nothing.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model, model)
        self.__dict__["config"] = getattr(model, "config", None)

    @property
    def base_model(self) -> nn.Module:
        return _Disabled(self._model, self._model.base_model)

    def get_output_embeddings(self) -> nn.Module:
        return self._model.get_output_embeddings()


def reference_model(model: nn.Module) -> Reference:
    """The DPO reference of an adapted model for TRL: `DPOTrainer(model, ref_model=lk.hf.reference_model(model))`.

    TRL's DPO compares the policy with a reference, which for a PEFT model it gets by disabling the
    adapter; this is lorakit's equivalent (see `Reference`), without a second copy of the weights. It is
    the base model, so for an adapter that did not start at zero (loaded, or init="pissa") it is not the
    starting policy.

    Raises:
        ConfigError: `model` has no lorakit adapter.
        StateError: an adapter is merged or is a PiSSA adapter (the base weights are not at hand).
    """
    from .inject import adapter_names, disabled

    if not adapter_names(model):
        raise ConfigError(f"{type(model).__name__} has no lorakit adapter; the reference of a model without one is a "
                          "frozen copy of it (ref_model=None lets TRL make one).")
    with disabled(model):  # raises now, not at the first step, where the base is not at hand
        pass
    return Reference(model)

