"""Put adapters into a model and control them: inject, set_adapter, disabled, route, merge, unmerge, eject.

Every function works in place on any torch model and returns what it names. The model keeps
its class and its base `state_dict` keys; adapted modules become `LoraLayer` wrappers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import threading
from collections.abc import Iterator

from torch import nn

from . import experts, fast, quant
from . import hf  # transformers' Trainer hooks: attach() in inject, detach() in eject
from .config import LoraConfig, name_matches, pattern_key
from .errors import AdapterNotFoundError, ConfigError, MergeError, StateError, TargetError
from .layers import LoraLayer, is_linear_like, new_adapter, supported, wrap

_NAME_RE = re.compile(r"^[A-Za-z0-9_\-]+$")


# -- looking around a model ------------------------------------------------------------------------
def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    """(module path, wrapper) for every adapted module of `model`."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def configs(model: nn.Module) -> dict[str, LoraConfig]:
    """The LoraConfig of every adapter injected into `model`, by adapter name."""
    return model.__dict__.setdefault("_lorakit_configs", {})


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters the model carries, in the order they were added."""
    return list(configs(model))


def active_adapters(model: nn.Module) -> list[str]:
    """The adapters that forward() applies (merged ones included)."""
    return list(model.__dict__.get("_lorakit_active", []))


def _require(model: nn.Module, names: list[str]) -> None:
    known = adapter_names(model)
    for n in names:
        if n not in known:
            hint = f"it has {known}" if known else "it has none yet: call lk.inject(model, cfg, name=...) first"
            raise AdapterNotFoundError(f"The model has no adapter {n!r}; {hint}.")


def _candidates(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Modules that could be adapted: everything except what lives inside a LoRA wrapper."""
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(module, LoraLayer):
            inside.append(name)
        if name:
            yield name, module


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    try:
        return get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        return None


def _check_patterns(cfg: LoraConfig, names: list[str]) -> None:
    """Refuse rank_pattern / alpha_pattern / slices keys that match none of the modules (or parameters) being
    adapted: such a key would silently change nothing.

    Raises:
        ConfigError: names the keys, the field and what they could match.
    """
    for field in ("rank_pattern", "alpha_pattern", "slices"):
        unused = [k for k in getattr(cfg, field) if not any(pattern_key({k: None}, n) for n in names)]
        if unused:
            shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
            raise ConfigError(
                f"{field} key{'s' if len(unused) > 1 else ''} {', '.join(map(repr, unused))} match"
                f"{'' if len(unused) > 1 else 'es'} none of the {len(names)} modules this adapter adapts ({shown}). "
                "A key matches a module whose name ends with it (e.g. 'down_proj' or 'layers.0.mlp.down_proj'); "
                "fix the key, add its module to the targets, or drop it.")


def match_targets(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Module paths that `cfg.targets` / `cfg.exclude` select, in model order.

    Raises:
        TargetError: nothing matched (the message lists module names that exist), or a matched
            module is of a type LoRA cannot adapt.
    """
    head = _output_head(model)
    keep = cfg.modules_to_save or []
    chosen, unsupported = [], []
    for name, module in _candidates(model):
        if keep and name_matches(keep, name):
            continue
        if cfg.exclude is not None and name_matches(cfg.exclude, name):
            continue
        if cfg.targets == "all-linear":
            base = module._base if isinstance(module, LoraLayer) else module
            if quant.is_quantized(module) and module is not head:
                quant.check_supported(module, name)
            if is_linear_like(base) and module is not head:
                chosen.append(name)
            continue
        if not name_matches(cfg.targets, name):
            continue
        quant.check_supported(module, name)
        if isinstance(module, LoraLayer) or supported(module):
            chosen.append(name)
        elif not any(c.startswith(name + ".") for c in chosen):
            unsupported.append((name, module))
    if unsupported and not chosen:
        name, module = unsupported[0]
        raise TargetError(
            f"targets={cfg.targets!r} matched {name!r}, a {type(module).__name__}, which LoRA cannot adapt "
            "(supported: nn.Linear, Conv1D, nn.Embedding, nn.Conv1d/2d/3d). Target its linear sublayers instead."
        )
    if not chosen:
        leaves = sorted({n.split(".")[-1] for n, m in _candidates(model) if supported(m) or isinstance(m, LoraLayer)})
        raise TargetError(
            f"targets={cfg.targets!r} matched no module of {type(model).__name__}. Adaptable module names "
            f"in this model include: {', '.join(leaves[:20])}{' ...' if len(leaves) > 20 else ''}. "
            "Pass some of those, a regex matching full module paths, or 'all-linear'."
        )
    return chosen


# -- inject ------------------------------------------------------------------------------------------
def inject(model: nn.Module, cfg: LoraConfig, name: str = "default") -> nn.Module:
    """Add adapter `name` to `model` in place, freeze the base, make `name` the active adapter.

    Calling it again with another name adds a second adapter (to the same or other modules);
    earlier adapters keep their weights. Adapters merged into the weights stay active beside
    `name` (they are part of the weights until `unmerge`). Returns `model`.

    On a transformers `PreTrainedModel` it also makes Trainer and TRL save adapters, not the base
    (`lorakit.hf.attach`): an instance attribute `save_pretrained` that writes the adapters in PEFT's
    format, a `load_state_dict` post-hook that does not report frozen weights missing from such a save,
    a one-shot check on the first training forward, and on a quantized base transformers' mark
    `_hf_peft_config_loaded` (Trainer trains a quantized model only with it). `eject` removes them all.

    Raises:
        ConfigError: `name` is taken or not a plain identifier.
        TargetError: the targets match nothing, or match a module LoRA cannot adapt; target_parameters
            match nothing, or a parameter that is not a 2-D or 3-D floating-point weight.
        StateError: init='pissa' while an adapter is merged, or on a module PiSSA does not support;
            the model is left as it was.
    """
    if not isinstance(cfg, LoraConfig):
        raise ConfigError(f"inject expects a lorakit.LoraConfig, got {type(cfg).__name__}.")
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ConfigError(f"Adapter name {name!r} must be letters, digits, '_' or '-' (it is used in file keys).")
    if name in configs(model):
        raise ConfigError(f"The model already has an adapter named {name!r}; pick another name, or "
                          f"lk.delete_adapter(model, {name!r}) first.")
    if any(layer.merged for _, layer in lora_layers(model)) and cfg.init == "pissa":
        raise StateError("Unmerge every adapter before adding a pissa adapter (it rewrites base weights).")
    if cfg.targets is None:  # the model family's usual targets, recorded in the adapter's config
        from .models import default_targets  # (models imports io, which imports this module)
        cfg = dataclasses.replace(cfg, targets=default_targets(model))
    paths = match_targets(model, cfg) if cfg.targets else []
    params = experts.match_parameters(model, cfg) if cfg.target_parameters else []
    _check_patterns(cfg, [*paths, *params])
    done: list[tuple[str, LoraLayer, nn.Module | None]] = []  # (path, wrapper, base module it replaced here)
    done_params: list[tuple[str, LoraLayer, nn.Module | None, bool]] = []  # (parameter, layer, wrapped, created)
    try:
        for key in params:
            layer, wrapped, created = experts.param_layer(model, key)
            done_params.append((key, layer, wrapped, created))
            layer.adapters[name] = experts.new_param_adapter(
                layer, cfg.rank_for(key), cfg.alpha_for(key), cfg.rslora, cfg.init, key)
        for path in paths:
            module = model.get_submodule(path)
            replaced = None
            if not isinstance(module, LoraLayer):
                replaced, module = module, wrap(module)
                module.train(replaced.training)
                _set_submodule(model, path, module)
            done.append((path, module, replaced))
            module.adapters[name] = new_adapter(
                module, path, cfg.rank_for(path), cfg.alpha_for(path), cfg.rslora, cfg.dropout, cfg.init,
                cfg.slices_for(path), name, dora=cfg.dora)
    except BaseException:
        for path, module, replaced in reversed(done):  # leave the model as it was
            if name in module.residuals:
                module.rewrite(drop_residuals=[name], module_name=path)
            if name in module.adapters:
                del module.adapters[name]
            if replaced is not None:
                _set_submodule(model, path, module.unwrap())
        for key, layer, wrapped, created in reversed(done_params):
            if name in layer.adapters:
                del layer.adapters[name]
            experts.release(model, key, wrapped, created)
        raise
    configs(model)[name] = cfg
    _freeze_base(model, cfg, paths)
    merged = {n for _, layer in lora_layers(model) for n in layer.merged}
    set_adapter(model, [n for n in active_adapters(model) if n in merged] + [name])
    hf.attach(model)
    return model


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, module)


def _freeze_base(model: nn.Module, cfg: LoraConfig, paths: list[str]) -> None:
    """Base weights stop training; adapters train; biases and modules_to_save as the config says."""
    lora_params = {id(p) for _, layer in lora_layers(model) for p in layer.adapters.parameters()}
    for p in model.parameters():
        if id(p) not in lora_params:
            p.requires_grad_(False)
    if cfg.bias == "all":
        for pname, p in model.named_parameters():
            if pname.endswith("bias") and id(p) not in lora_params:
                p.requires_grad_(True)
    elif cfg.bias == "lora_only":
        for path in paths:
            bias = model.get_submodule(path).bias
            if bias is not None:
                bias.requires_grad_(True)
    for path in saved_module_paths(model, cfg):
        for p in model.get_submodule(path).parameters():
            p.requires_grad_(True)


def saved_module_paths(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Paths of the modules that `cfg.modules_to_save` selects (outermost matches only)."""
    if not cfg.modules_to_save:
        return []
    found: list[str] = []
    for name, _ in _candidates(model):
        if name_matches(cfg.modules_to_save, name) and not any(name.startswith(f + ".") for f in found):
            found.append(name)
    if not found:
        raise TargetError(f"modules_to_save={cfg.modules_to_save!r} matched no module of {type(model).__name__}.")
    return found


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name`, unmerging it first if it is merged, and give back what PiSSA took out of
    the weights for it. Every weight becomes what the remaining changes alone make of the original.

    Raises:
        AdapterNotFoundError: an unknown name.
        StateError: an active `route` sends rows to it.
        MergeError: re-merging adapters merged after it would overflow a weight's dtype.
    Nothing is changed when it raises.
    """
    _require(model, [name])
    _refuse_routed(model, name)
    layers = list(lora_layers(model))
    for path, layer in layers:  # check every layer before changing one
        layer.rewrite(drop=[name], drop_residuals=[name], module_name=path, dry_run=True)
    for path, layer in layers:
        layer.rewrite(drop=[name], drop_residuals=[name], module_name=path)
        if name in layer.adapters:
            del layer.adapters[name]
        layer.active = [n for n in layer.active if n != name]
    del configs(model)[name]
    model.__dict__["_lorakit_active"] = [n for n in active_adapters(model) if n != name]
    from .io import restore_replaced  # io imports this module
    restore_replaced(model, name)  # base parameters that loading `name` replaced (saved modules, biases)


# -- which adapters act ------------------------------------------------------------------------------
def set_adapter(model: nn.Module, names: str | list[str] | None) -> None:
    """Choose the adapters forward() applies: one name, a list (their updates are summed), or None.

    Merged adapters are part of the weights and stay applied until `unmerge`, so they must stay
    in the active set.

    Raises:
        AdapterNotFoundError: a name the model does not have.
        StateError: the new set would leave out a merged adapter.
    """
    chosen = [] if names is None else [names] if isinstance(names, str) else list(names)
    _require(model, chosen)
    merged = {n for _, layer in lora_layers(model) for n in layer.merged}
    left_out = sorted(merged - set(chosen))
    if left_out:
        raise StateError(f"Adapter(s) {left_out} are merged into the weights; lk.unmerge(model) before "
                         f"switching to {chosen or 'no adapter'}.")
    for _, layer in lora_layers(model):
        layer.active = [n for n in chosen if n in layer.adapters]
    model.__dict__["_lorakit_active"] = chosen


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model behaves as its base model (no adapter acts).

    Raises:
        StateError: an adapter is merged (the base weights are not at hand); unmerge first. Or a PiSSA
            adapter holds part of the base weights (they hold the residual W - s*B0@A0).
    """
    layers = [layer for _, layer in lora_layers(model)]
    merged = sorted({n for layer in layers for n in layer.merged})
    if merged:
        raise StateError(f"Adapter(s) {merged} are merged into the weights, so the base model is not available; "
                         "call lk.unmerge(model) first.")
    pissa = sorted({n for layer in layers for n in layer.residuals})
    if pissa:
        raise StateError(f"PiSSA adapter(s) {pissa} took their initial part out of the base weights, so the base "
                         "model is not available; lk.delete_adapter(model, name) gives the original weights back.")
    before = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, was in zip(layers, before):
            layer.disabled = was


_route_lock = threading.Lock()  # makes "is a route held by another thread?" and taking it one step


@contextlib.contextmanager
def route(model: nn.Module, names: list[str | None]) -> Iterator[nn.Module]:
    """Inside the block, batch row b of every forward pass goes through adapter names[b] (None = base).

    Works in forward and backward, so one batch can train several adapters at once (on the fast
    path, adapters of one dropout probability draw one mask for the whole batch: each example
    still gets a mask of its own). Every input of an adapted module must have the batch as its
    first dimension, with len(names) rows; another number of rows raises StateError.

    Routes nest: an inner `route` replaces the outer one for its block and gives it back on exit.
    A route is state of the model, not of the thread: every forward of the model inside the block,
    from any thread, is routed (autograd's backward threads included, as gradient checkpointing
    needs). So one model serves one routed batch at a time: a `route` on a model whose route
    another thread holds raises StateError; threads that serve at once need a model each.
    Deleting an adapter that the route uses raises StateError inside the block. Rows routed to None
    see the layers' weights, which for a layer with a PiSSA adapter hold its residual, not the base.

    Raises:
        AdapterNotFoundError: an unknown name.
        StateError: an adapter is merged (routing needs clean base weights), or another thread
            holds a route on this model.
    """
    names = list(names)
    _require(model, sorted({n for n in names if n is not None}))
    layers = [(path, layer) for path, layer in lora_layers(model)]
    for path, layer in layers:
        if layer.merged:
            raise StateError(f"Adapter(s) {list(layer.merged)} are merged into {path}; lk.unmerge(model) "
                             "before routing per example.")
    me = threading.get_ident()
    with _route_lock:
        for path, layer in layers:
            owner = layer.__dict__.get("_route_owner")
            if layer.routing is not None and owner is not None and owner != me:
                raise StateError(
                    f"Another thread holds a route on this model ({path} is routed to {layer.routing}); a model "
                    "serves one routed batch at a time. Give each thread its own model, or serialize the calls.")
        outer = [(layer.routing, layer.__dict__.get("_route_owner")) for _, layer in layers]
        for _, layer in layers:
            layer.routing, layer._rows_cache, layer._route_owner = names, None, me
            fast.release_route(layer)
    try:
        yield model
    finally:
        with _route_lock:
            for (_, layer), (routing, owner) in zip(layers, outer):
                layer.routing, layer._rows_cache, layer._route_owner = routing, None, owner
                fast.release_route(layer)  # the stacked adapters live as long as the route


def _refuse_routed(model: nn.Module, name: str) -> None:
    for path, layer in lora_layers(model):
        if layer.routing is not None and name in layer.routing:
            raise StateError(f"Adapter {name!r} is in use by an active route on {path} (rows routed to "
                             f"{layer.routing}); leave the `route(...)` block before deleting it.")


# -- merge / unmerge / eject ------------------------------------------------------------------------
def merge(model: nn.Module, names: str | list[str] | None = None) -> nn.Module:
    """Fold adapters (default: the active ones) into the base weights, for zero-latency inference.

    The update is computed in float32 and rounded once into each weight's dtype. Merging an
    already merged adapter does nothing. Merged adapters join the active set.

    Raises:
        AdapterNotFoundError: an unknown name.
        StateError: a per-example route is active.
        MergeError: an update is NaN/inf, or a merged weight would overflow its dtype (float16 beyond
            65504), or an adapter acts on a quantized layer (`lorakit.quant`: eject(merge=True) writes a
            16-bit model instead); the message names the module, and nothing is changed.
    """
    chosen = active_adapters(model) if names is None else [names] if isinstance(names, str) else list(names)
    _require(model, chosen)
    layers = list(lora_layers(model))
    for path, layer in layers:
        if layer.routing is not None:
            raise StateError(f"Cannot merge while a per-example route is active ({path}); leave the route block.")
        for name in chosen:
            if layer.quantized and name in layer.adapters and name not in layer.merged:
                raise quant.merge_refused(path, name)
    _refuse_tied(model, [(path, layer) for path, layer in layers if any(n in layer.adapters for n in chosen)])
    # Check every update first so that a broken adapter leaves the model untouched.
    for name in chosen:
        for path, layer in layers:
            if name in layer.adapters and name not in layer.merged:
                layer.check_finite(name, path)
    done: list[tuple[LoraLayer, str]] = []
    try:
        for name in chosen:
            for path, layer in layers:
                if name in layer.adapters and name not in layer.merged:
                    layer.merge(name, path)
                    done.append((layer, name))
    except MergeError:  # an overflow: take back the merges made so far, each the last change of its layer
        for layer, name in reversed(done):
            layer.unmerge([name])
        raise
    active = active_adapters(model)
    set_adapter(model, active + [n for n in chosen if n not in active])
    return model


_merge_active = merge  # eject's `merge` flag shadows the function inside eject


def _refuse_tied(model: nn.Module, layers: list[tuple[str, LoraLayer]]) -> None:
    """Merging into a weight that another module shares (tied input/output embeddings) would change both."""
    owners: dict[int, list[str]] = {}
    for mpath, module in model.named_modules(remove_duplicate=False):
        for pname, p in module.named_parameters(recurse=False, remove_duplicate=False):
            owners.setdefault(id(p), []).append(f"{mpath}.{pname}" if mpath else pname)
    for path, layer in layers:
        own = experts.parameter_path(path) if isinstance(layer, experts.LoraParam) else f"{path}.weight"
        others = [o for o in owners.get(id(layer.weight), []) if o != own]
        if others:
            raise StateError(
                f"{path}.weight is shared with {others[0]} (tied weights), so merging an adapter into it would also "
                "change that module. Keep the adapter unmerged, or untie the weights first "
                "(e.g. tie_word_embeddings=False and a copy of the weight).")


def unmerge(model: nn.Module, names: str | list[str] | None = None) -> nn.Module:
    """Take merged adapters (default: all) out of the weights, in any order.

    Every weight becomes bit for bit what merging only the adapters that stay merged onto the
    base weights, in their merge order, gives; unmerging all of them gives the base weights back.

    Raises:
        AdapterNotFoundError: an unknown name.
        MergeError: re-merging the adapters merged after an unmerged one would overflow a weight's
            dtype; nothing is changed.
    """
    chosen = None if names is None else [names] if isinstance(names, str) else list(names)
    if chosen is not None:
        _require(model, chosen)
    layers = list(lora_layers(model))
    for path, layer in layers:
        drop = [n for n in layer.merged if chosen is None or n in chosen]
        layer.rewrite(drop=drop, module_name=path, dry_run=True)
    for path, layer in layers:
        layer.unmerge(chosen, path)
    return model


def eject(model: nn.Module, merge: bool = True) -> nn.Module:
    """Remove every wrapper and return the plain torch model (in place).

    With merge=True the active adapters are merged first (what deployment wants, PEFT's
    merge_and_unload); with merge=False merged adapters are unmerged and the base comes back.
    Either way, what PiSSA took out of a weight for an adapter that is not merged goes back in:
    a weight ends as the original one plus the merged adapters' updates.

    A quantized layer (`lorakit.quant`) comes back as it was with merge=False; with merge=True it
    becomes an nn.Linear whose weight is dequantize(Wq) + scale * B @ A (float32, rounded once into
    the dequantized dtype) for the active adapters on it.

    What `inject` attached for transformers' Trainer (`lorakit.hf.attach`) is removed too.

    Raises:
        MergeError: an update is NaN/inf or would overflow a weight's dtype; nothing is changed.
    """
    active = active_adapters(model) if merge else []
    layers = list(lora_layers(model))
    # with merge, a quantized layer is replaced by a 16-bit twin holding its dequantized weight, once every
    # end state has been checked; the twins are then merged and unwrapped like any layer
    twins = {path: layer.dequantized_twin() for path, layer in layers if merge and layer.quantized}
    layers = [(path, twins.get(path, layer)) for path, layer in layers]
    plan = [(path, layer, [] if merge else list(layer.merged), [n for n in layer.residuals if n not in active])
            for path, layer in layers]
    for path, layer, drop, gone in plan:  # the end state of every weight, checked before anything changes
        add = [n for n in active if n in layer.adapters]
        layer.rewrite(drop=drop, drop_residuals=gone, add=add, module_name=path, dry_run=True)
    from .io import restore_replaced  # io imports this module
    for path, twin in twins.items():
        _set_submodule(model, path, twin)
    if merge:
        _merge_active(model)
        model.__dict__.pop("_lorakit_replaced", None)  # the adapters' saved modules and biases stay
    for path, layer, drop, gone in plan:
        layer.rewrite(drop=drop, drop_residuals=gone, module_name=path)
    if not merge:
        restore_replaced(model)
    fast.unfuse(model)
    for path, layer in list(lora_layers(model)):
        if isinstance(layer, experts.LoraParam):
            continue  # its owner, a LoraExperts, is unwrapped below
        base = layer.unwrap()
        base.train(layer.training)
        _set_submodule(model, path, base)
    experts.unwrap_all(model)
    model.__dict__.pop("_lorakit_configs", None)
    model.__dict__.pop("_lorakit_active", None)
    hf.detach(model)
    return model


def trainable_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """The parameters that train: adapter A/B, plus biases and saved modules if the config says so."""
    return (p for p in model.parameters() if p.requires_grad)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared (tied) parameters are counted once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total

