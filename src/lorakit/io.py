"""Adapter files: save and load in Hugging Face PEFT's layout, and import loralib checkpoints.

A saved adapter is a directory with `adapter_config.json` and `adapter_model.safetensors`,
tensor keys `base_model.model.<module path>.lora_A.weight` / `.lora_B.weight` (embeddings:
`lora_embedding_A` / `lora_embedding_B`), exactly as PEFT writes them, so PEFT, vLLM and
friends read lorakit's adapters and lorakit reads theirs. lorakit adds one field to the
entry to the safetensors header's metadata, "lorakit", with a fingerprint of the base (adapted
module paths and weight shapes) and the slice masks of fused projections; PEFT ignores it.

Nothing is unpickled: safetensors files are plain data, and `.bin`/`.pt` files go through
`torch.load(weights_only=True)`, which refuses to run code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .config import LoraConfig
from .errors import AdapterFileError, ConfigError, LoraError, ShapeMismatchError
from .inject import _require, configs, inject, lora_layers, saved_module_paths
from .layers import LoraEmbedding, LoraLayer

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
FORMAT_VERSION = 1


# -- save ---------------------------------------------------------------------------------------------
def adapter_state_dict(model: nn.Module, name: str = "default", pissa_as_lora: bool = True
                       ) -> tuple[dict[str, Tensor], dict[str, Any], dict[str, Any]]:
    """The tensors of adapter `name` under PEFT's keys, the adapter_config.json dict, and lorakit's
    own metadata (base fingerprint, slice masks, the LoraConfig), which goes into the safetensors header.

    Sliced adapters (fused projections) are written as an equivalent full-width adapter of rank
    k*r whose B has zero rows for the slices left out, with rank/alpha patterns that keep the scale.

    A PiSSA adapter (init="pissa") acts on the residual W - s*B0@A0; with `pissa_as_lora` (the
    default) it is written as the plain LoRA of rank 2r that gives the same weights on the original
    W, as PEFT's `path_initial_model_for_weight_conversion` does: s*(B@A - B0@A0) = s*[B | -B0] @ [A ; A0],
    with r and alpha doubled (alpha * sqrt(2) with rslora) so that the scale stays s. Without it the
    trained factors are written as they are, with init_lora_weights "pissa": such a file is for
    loading onto the original base, which redoes the PiSSA initialization (lorakit and PEFT both do).
    """
    _require(model, [name])
    cfg = configs(model)[name]
    # PiSSA as LoRA: rank 2r; alpha grows so that alpha / r (alpha / sqrt(r) with rslora) is kept
    convert = pissa_as_lora and cfg.init == "pissa"
    grow_r, grow_alpha = (2, math.sqrt(2) if cfg.rslora else 2) if convert else (1, 1)
    tensors: dict[str, Tensor] = {}
    fingerprint: dict[str, list[int]] = {}
    rank_pattern = {}
    alpha_pattern = {}
    slices = {}
    paths = []
    for path, layer in lora_layers(model):
        if name not in layer.adapters:
            continue
        a = layer.adapters[name]
        paths.append(path)
        fingerprint[path] = list(layer.weight.shape)
        A, B = a.lora_A, a.full_B()
        if convert:
            A, B = torch.cat([A, a.pissa_A0]), torch.cat([B, -a.pissa_B0], dim=1)  # (2r, in), (out, 2r)
        if isinstance(layer, LoraEmbedding):
            tensors[f"{PREFIX}{path}.lora_embedding_A"] = A
            tensors[f"{PREFIX}{path}.lora_embedding_B"] = B
        else:
            tensors[f"{PREFIX}{path}.lora_A.weight"] = A
            tensors[f"{PREFIX}{path}.lora_B.weight"] = B
        rank = A.shape[0]
        if rank != cfg.r * grow_r or a.alpha != cfg.alpha:
            # Per-module overrides; an exact, escaped path wins over the user's patterns.
            key = re.escape(path)
            rank_pattern[key] = rank
            # keep scale: alpha' / f(rank) == alpha / f(r)
            f = math.sqrt if a.rslora else float
            alpha_pattern[key] = a.scale * f(rank)
        if a.slices is not None:
            slices[path] = a.slices
        if cfg.bias == "lora_only" and layer.bias is not None:
            tensors[f"{PREFIX}{path}.bias"] = layer.bias
    if cfg.bias == "all":
        for pname, p in model.named_parameters():
            if pname.endswith("bias") and "adapters." not in pname:
                tensors[f"{PREFIX}{pname}"] = p
    for mpath in saved_module_paths(model, cfg):
        for pname, p in model.get_submodule(mpath).named_parameters():
            tensors[f"{PREFIX}{mpath}.{pname}"] = p
    for key, value in cfg.rank_pattern.items():
        rank_pattern.setdefault(key, value * grow_r)
    for key, value in cfg.alpha_pattern.items():
        alpha_pattern.setdefault(key, value * grow_alpha)
    base_name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    peft_config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_name,
        "r": cfg.r * grow_r,
        "lora_alpha": cfg.alpha * grow_alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": paths,
        "exclude_modules": None,
        "bias": cfg.bias,
        "use_rslora": cfg.rslora,
        "fan_in_fan_out": False,
        "init_lora_weights": "pissa" if cfg.init == "pissa" and not convert else True,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "modules_to_save": list(cfg.modules_to_save) if cfg.modules_to_save else None,
        "inference_mode": True,
        "use_dora": False,
    }
    meta = {
        "format_version": FORMAT_VERSION,
        "config": (dataclasses.replace(cfg, r=cfg.r * grow_r, alpha=cfg.alpha * grow_alpha, init="kaiming",
                                       rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
                   if convert else cfg).to_dict(),
        "base_fingerprint": {"model_class": type(model).__name__, "modules": fingerprint},
        "slices": slices,
    }
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}, peft_config, meta


def save_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default", *,
                 pissa_as_lora: bool = True) -> Path:
    """Write adapter `name` to directory `path` (created if needed) in PEFT's layout. Returns the path.

    A PiSSA adapter is written by default as the rank-2r LoRA for the original base weights, so the
    file loads like any other (see `adapter_state_dict`); `pissa_as_lora=False` writes the rank-r
    factors as trained, marked init_lora_weights "pissa".

    Each file is written to a temporary file in the same directory and renamed into place, so an
    interrupted save never leaves a half-written adapter behind: the old file, or the new one.

    Raises:
        AdapterNotFoundError: the model has no adapter `name`.
        AdapterFileError: the directory cannot be created or written.
    """
    from safetensors.torch import save_file

    tensors, peft_config, meta = adapter_state_dict(model, name, pissa_as_lora)
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        # Shared storage (tied weights) is not allowed by safetensors: give each tensor its own.
        seen: set[int] = set()
        for key, t in tensors.items():
            if t.untyped_storage().data_ptr() in seen:
                tensors[key] = t.clone()
            seen.add(tensors[key].untyped_storage().data_ptr())
        atomic_write(out / WEIGHTS_NAME, lambda f: save_file(tensors, f, metadata={"format": "pt", "lorakit": json.dumps(meta)}))
        text = json.dumps(peft_config, indent=2, sort_keys=True) + "\n"
        atomic_write(out / CONFIG_NAME, lambda f: Path(f).write_text(text))
    except OSError as exc:
        raise AdapterFileError(f"Could not write the adapter to {out}: {exc}. Pick a writable directory.") from exc
    return out


def atomic_write(target: Path, write) -> None:
    """Call write(tmp_path) on a temp file beside `target`, fsync it, then rename it over `target`."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# -- load ---------------------------------------------------------------------------------------------
def load_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default", *,
                 alpha: float | None = None, slices: list[bool] | None = None,
                 check_base: bool = True) -> nn.Module:
    """Load an adapter into `model` as adapter `name` (added beside any others) and make it active.

    `path` is a directory written by lorakit or PEFT (adapter_config.json +
    adapter_model.safetensors, or PEFT's older adapter_model.bin), or a loralib checkpoint
    file (.pt/.bin/.pth with `*.lora_A` / `*.lora_B` keys). loralib files do not record alpha:
    pass `alpha=` (the lora_alpha used in training). For loralib's fused MergedLinear layers the
    enabled slices are inferred (q and v for three fused projections) or given by `slices=`.

    Raises:
        AdapterFileError: missing, empty, truncated or corrupt files; malformed config.
        ShapeMismatchError: the adapter was made for another base (names the first module that
            differs and both shapes).
        ConfigError: `name` is taken, or alpha is missing for a loralib file.
    """
    p = Path(path)
    if p.is_dir():
        return _load_peft_dir(model, p, name, check_base)
    if p.is_file():
        if p.suffix == ".safetensors":
            return _load_peft_dir(model, p.parent, name, check_base, weights=p)
        return _load_loralib(model, p, name, alpha, slices)
    raise AdapterFileError(f"No adapter at {p}: the path does not exist. Give the directory that holds "
                           f"{CONFIG_NAME} and {WEIGHTS_NAME}, or a loralib .pt/.bin file.")


def read_config(directory: Path) -> dict[str, Any]:
    """adapter_config.json as a dict, checked for the fields lorakit needs."""
    cfg_path = directory / CONFIG_NAME
    if not cfg_path.is_file():
        listing = sorted(x.name for x in directory.iterdir())[:10]
        raise AdapterFileError(
            f"{directory} holds no {CONFIG_NAME} (it contains: {listing or 'nothing'}). "
            "Point load_adapter at the directory that save_adapter / PEFT's save_pretrained wrote.")
    try:
        data = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterFileError(f"{cfg_path} is not valid JSON ({exc}); the file is damaged. "
                               "Re-save the adapter.") from exc
    if not isinstance(data, dict):
        raise AdapterFileError(f"{cfg_path} must hold a JSON object, found {type(data).__name__}.")
    if data.get("peft_type", "LORA") != "LORA":
        raise AdapterFileError(f"{cfg_path} describes a {data.get('peft_type')} adapter; lorakit loads LoRA only.")
    for key in ("r", "lora_alpha"):
        value = data.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise AdapterFileError(f"{cfg_path}: field {key!r} must be a positive number, found {value!r}.")
    if data.get("use_dora"):
        raise AdapterFileError(f"{cfg_path} is a DoRA adapter (use_dora=true); lorakit does not load DoRA yet.")
    if data.get("lora_bias"):
        raise AdapterFileError(f"{cfg_path} has lora_bias=true (a bias on B); lorakit does not support that yet.")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(data.get(key) or {}, dict):
            raise AdapterFileError(f"{cfg_path}: field {key!r} must be an object, found {data.get(key)!r}.")
    return data


def read_weights(file: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Tensors of an adapter weights file (safetensors, or PEFT's old .bin read without pickle code),
    and lorakit's metadata from the safetensors header ({} when absent)."""
    if not file.is_file():
        raise AdapterFileError(f"{file} is missing: the adapter directory has a config but no weights.")
    if file.suffix != ".safetensors":
        return _torch_load_safely(file), {}
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(file), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterFileError(
            f"{file} is truncated or corrupt ({exc}). Re-save or re-download the adapter.") from exc
    try:
        meta = json.loads(header.get("lorakit", "{}"))
    except json.JSONDecodeError:
        meta = {}
    return tensors, meta if isinstance(meta, dict) else {}


def _torch_load_safely(file: Path) -> dict[str, Tensor]:
    try:
        data = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError, EOFError, zip errors ...
        raise AdapterFileError(
            f"{file} could not be read as plain tensors ({type(exc).__name__}: {str(exc)[:200]}). lorakit "
            "never runs pickled code from a file; if it is a checkpoint you trust, convert it to safetensors.") from exc
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
    if not isinstance(data, dict) or not all(isinstance(v, Tensor) for v in data.values()):
        raise AdapterFileError(f"{file} does not hold a dict of tensors.")
    return dict(data)


def _load_peft_dir(model: nn.Module, directory: Path, name: str, check_base: bool,
                   weights: Path | None = None) -> nn.Module:
    data = read_config(directory)
    if weights is None:
        weights = directory / WEIGHTS_NAME
        if not weights.exists() and (directory / "adapter_model.bin").exists():
            weights = directory / "adapter_model.bin"
    tensors, meta = read_weights(weights)
    if check_base and meta.get("base_fingerprint"):
        check_fingerprint(model, meta["base_fingerprint"], directory)
    pairs, extra = _split_keys(tensors, weights)
    if not pairs:
        raise AdapterFileError(f"{weights} holds no LoRA tensors (no *.lora_A / *.lora_B keys).")
    rslora = bool(data.get("use_rslora", False))
    rank_pattern, alpha_pattern = data.get("rank_pattern") or {}, data.get("alpha_pattern") or {}
    file_cfg = LoraConfig(r=int(data["r"]), alpha=float(data["lora_alpha"]), rslora=rslora,
                          rank_pattern={k: int(v) for k, v in rank_pattern.items()},
                          alpha_pattern={k: float(v) for k, v in alpha_pattern.items()}, targets=["_"])
    alphas = {p: file_cfg.alpha_for(p) for p in pairs}
    dropout = float(data.get("lora_dropout") or 0.0)
    saved_slices = meta.get("slices") or {}
    modules_to_save = data.get("modules_to_save") or None
    bias = data.get("bias", "none") if data.get("bias") in ("none", "all", "lora_only") else "none"
    # PiSSA factors as trained (save_adapter(pissa_as_lora=False), PEFT's default): the loaded base is the
    # original one, so the PiSSA initialization is done again to make its residual, and then the factors loaded
    init = "pissa" if str(data.get("init_lora_weights")).lower().startswith("pissa") else "zeros"
    return _install(model, name, pairs, alphas, rslora, dropout, saved_slices, extra, bias,
                    modules_to_save, str(weights), init)


def _split_keys(tensors: dict[str, Tensor], file: Path) -> tuple[dict[str, dict[str, Tensor]], dict[str, Tensor]]:
    """{module path: {"A": A, "B": B, "embedding": bool}} and the other tensors (biases, saved modules)."""
    pairs: dict[str, dict[str, Any]] = {}
    extra: dict[str, Tensor] = {}
    pattern = re.compile(r"^(?P<path>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
                         r"(?:\.[A-Za-z0-9_\-]+)?(?:\.weight)?$")
    for key, t in tensors.items():
        k = key[len(PREFIX):] if key.startswith(PREFIX) else key
        if "lora_magnitude_vector" in k:
            raise AdapterFileError(f"{file} holds DoRA magnitudes ({key}); lorakit does not load DoRA yet.")
        m = pattern.match(k)
        if m is None:
            extra[k.replace(".modules_to_save.", ".")] = t
            continue
        entry = pairs.setdefault(m["path"], {"embedding": False})
        entry["embedding"] |= "embedding" in m["kind"]
        entry[m["kind"][-1]] = t
    for path, entry in pairs.items():
        if "A" not in entry or "B" not in entry:
            missing = "lora_B" if "A" in entry else "lora_A"
            raise AdapterFileError(f"{file}: module {path} has no {missing} tensor; the file is incomplete.")
    return pairs, extra


def check_fingerprint(model: nn.Module, fingerprint: dict[str, Any], source: Path | str) -> None:
    """Raise ShapeMismatchError naming the first adapted module whose base weight differs."""
    modules = fingerprint.get("modules") or {}
    for path, shape in modules.items():
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise ShapeMismatchError(
                f"The adapter at {source} was made for a base with a module {path!r} (weight {tuple(shape)}), "
                f"which this {type(model).__name__} does not have. It belongs to another architecture "
                f"({fingerprint.get('model_class', 'unknown')}); load it into that base model.") from None
        weight = getattr(module, "weight", None)
        if weight is None or list(weight.shape) != list(shape):
            got = tuple(weight.shape) if weight is not None else None
            raise ShapeMismatchError(
                f"The adapter at {source} does not fit this model: module {path!r} has weight shape {got} here "
                f"but {tuple(shape)} in the base the adapter was trained on. Load it into the same base model "
                "(same size and architecture).")


def _install(model: nn.Module, name: str, pairs: dict[str, dict[str, Any]], alphas: dict[str, float],
             rslora: bool, dropout: float, saved_slices: dict[str, list[bool]], extra: dict[str, Tensor],
             bias: str, modules_to_save: list[str] | None, source: str, init: str = "zeros") -> nn.Module:
    """Create adapter `name` on exactly the modules in `pairs` and copy the tensors in."""
    if name in configs(model):
        raise ConfigError(f"The model already has an adapter named {name!r}; load under another name=.")
    plan = {}
    for path, entry in pairs.items():
        A, B = entry["A"], entry["B"]
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise ShapeMismatchError(
                f"{source} adapts module {path!r}, which this {type(model).__name__} does not have; the adapter "
                "was trained on another architecture.") from None
        sl = saved_slices.get(path)
        r = A.shape[0] // sum(sl) if sl else A.shape[0]
        _check_shapes(module, path, A, B, entry["embedding"], sl, source)
        plan[path] = (r, sl)
    ranks = {re.escape(p): r for p, (r, _) in plan.items()}
    alpha_map = {re.escape(p): alphas[p] * (1 if not plan[p][1] else _slice_alpha_factor(plan[p], rslora))
                 for p in plan}
    sl_map = {re.escape(p): sl for p, (_, sl) in plan.items() if sl}
    first = next(iter(plan))
    cfg = LoraConfig(
        r=plan[first][0], alpha=alpha_map[re.escape(first)], dropout=dropout,
        targets="|".join(re.escape(p) for p in plan), init=init, rslora=rslora, bias=bias,
        rank_pattern=ranks, alpha_pattern=alpha_map, slices=sl_map, modules_to_save=modules_to_save)
    inject(model, cfg, name)
    with torch.no_grad():
        for path, entry in pairs.items():
            layer = model.get_submodule(path)
            a = layer.adapters[name]
            A, B = entry["A"], entry["B"]
            if a.slices is not None:
                B = _unslice_B(B, a.slices, a.r)
            a.lora_A.copy_(A.reshape(a.lora_A.shape))
            a.lora_B.copy_(B.reshape(a.lora_B.shape))
        _load_extra(model, extra, source)
    return model


def _slice_alpha_factor(plan_entry: tuple[int, list[bool]], rslora: bool) -> float:
    """The file stores a sliced adapter as rank k*r with alpha' chosen to keep the scale: undo that."""
    r, sl = plan_entry
    k = sum(sl)
    return 1 / math.sqrt(k) if rslora else 1 / k


def _unslice_B(B_full: Tensor, mask: list[bool], r: int) -> Tensor:
    """(out, k*r) block matrix -> (k*out/n, r): the enabled slices' blocks stacked."""
    out_slice = B_full.shape[0] // len(mask)
    blocks = []
    for j, i in enumerate(i for i, on in enumerate(mask) if on):
        blocks.append(B_full[i * out_slice:(i + 1) * out_slice, j * r:(j + 1) * r])
    return torch.cat(blocks, 0)


def _check_shapes(module: nn.Module, path: str, A: Tensor, B: Tensor, embedding: bool,
                  sl: list[bool] | None, source: str) -> None:
    base = module._base if isinstance(module, LoraLayer) else module
    w = module.weight
    if type(base).__name__ == "Conv1D":
        n_in, n_out = w.shape[0], w.shape[1]
    elif isinstance(base, nn.Embedding):
        n_in, n_out = w.shape
    else:
        n_out, n_in = w.shape[0], w.shape[1]
    if embedding != isinstance(base, nn.Embedding):
        raise ShapeMismatchError(f"{source}: module {path!r} is a {type(base).__name__} here but the adapter "
                                 f"holds {'embedding' if embedding else 'linear'} LoRA tensors for it.")
    if A.shape[1] != n_in or B.shape[0] != n_out or A.shape[0] != B.shape[1]:
        raise ShapeMismatchError(
            f"{source}: module {path!r} has weight shape {tuple(w.shape)} (in={n_in}, out={n_out}) here, but the "
            f"adapter's lora_A is {tuple(A.shape)} and lora_B is {tuple(B.shape)}; they need A (r, {n_in}) and "
            f"B ({n_out}, r). The adapter belongs to another base model.")


def _load_extra(model: nn.Module, extra: dict[str, Tensor], source: str) -> None:
    """Copy biases and saved modules stored with the adapter into the model's own parameters."""
    params = dict(model.named_parameters())
    for key, t in extra.items():
        p = params.get(key)
        if p is None:
            raise ShapeMismatchError(f"{source} holds tensor {key!r}, which this {type(model).__name__} has no "
                                     "parameter for; the adapter belongs to another architecture.")
        if p.shape != t.shape:
            raise ShapeMismatchError(f"{source}: {key!r} has shape {tuple(t.shape)} in the adapter but "
                                     f"{tuple(p.shape)} here (e.g. another number of labels).")
        p.copy_(t)


# -- loralib ------------------------------------------------------------------------------------------
def _load_loralib(model: nn.Module, file: Path, name: str, alpha: float | None,
                  slices: list[bool] | None) -> nn.Module:
    tensors = _torch_load_safely(file)
    pairs: dict[str, dict[str, Any]] = {}
    extra: dict[str, Tensor] = {}
    for key, t in tensors.items():
        m = re.match(r"^(?P<path>.+)\.lora_(?P<kind>A|B)$", key)
        if m:
            pairs.setdefault(m["path"], {"embedding": False})[m["kind"]] = t
        else:
            extra[key] = t
    if not pairs:
        raise AdapterFileError(f"{file} holds no loralib tensors (keys ending in .lora_A / .lora_B).")
    if alpha is None:
        raise ConfigError(f"{file} is a loralib checkpoint, which does not record lora_alpha. Pass it: "
                          "load_adapter(model, path, alpha=16) (the value used in training; scale = alpha / r).")
    found_slices: dict[str, list[bool]] = {}
    for path, entry in pairs.items():
        if "A" not in entry or "B" not in entry:
            raise AdapterFileError(f"{file}: {path} lacks lora_A or lora_B.")
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise ShapeMismatchError(f"{file} adapts module {path!r}, which this {type(model).__name__} does "
                                     "not have; load it into the model it was trained with.") from None
        base = module._base if isinstance(module, LoraLayer) else module
        if isinstance(base, nn.Embedding):  # loralib Embedding: A (r, num), B (dim, r), as PEFT's
            entry["embedding"] = True
            continue
        w = module.weight
        n_out = w.shape[1] if type(base).__name__ == "Conv1D" else w.shape[0]
        A, B = entry["A"], entry["B"]
        r = B.shape[1]
        if B.shape[0] != n_out and r > 0 and A.shape[0] % r == 0:
            k = A.shape[0] // r
            mask = slices or _infer_slices(k, n_out, B.shape[0])
            if mask is None:
                raise ShapeMismatchError(
                    f"{file}: {path} looks like a loralib MergedLinear (A {tuple(A.shape)}, B {tuple(B.shape)}, "
                    f"output {n_out}) but its enabled slices cannot be inferred; pass slices=[True, False, True] "
                    "or the mask used in training.")
            found_slices[path] = mask
            entry["B"] = _slice_to_full(B, mask, r, n_out)
    params = dict(model.named_parameters())
    extra = {k: v for k, v in extra.items() if k in params}
    alphas = {p: float(alpha) * (sum(found_slices[p]) if p in found_slices else 1) for p in pairs}
    saved = sorted({k.rsplit(".", 1)[0] for k in extra if not k.endswith("bias")}) or None
    return _install(model, name, pairs, alphas, False, 0.0, found_slices, extra, "none", saved, str(file))


def _infer_slices(k: int, n_out: int, b_rows: int) -> list[bool] | None:
    if b_rows % k or n_out % (b_rows // k):
        return None
    n = n_out // (b_rows // k)
    if k == n:
        return [True] * n
    if (k, n) == (2, 3):
        return [True, False, True]  # loralib's GPT-2 examples: q and v of c_attn
    return None


def _slice_to_full(B: Tensor, mask: list[bool], r: int, n_out: int) -> Tensor:
    """loralib MergedLinear B (k*out/n, r) -> PEFT-style full B (out, k*r) with zero rows."""
    n, k = len(mask), sum(mask)
    out_slice = n_out // n
    full = B.new_zeros(n_out, k * r)
    for j, i in enumerate(i for i, on in enumerate(mask) if on):
        full[i * out_slice:(i + 1) * out_slice, j * r:(j + 1) * r] = B[j * out_slice:(j + 1) * out_slice]
    return full


__all__ = ["save_adapter", "load_adapter", "adapter_state_dict", "read_config", "read_weights",
           "check_fingerprint", "atomic_write", "LoraError"]


# -- reading without a model --------------------------------------------------------------------------
def read_adapter_dir(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, dict[str, Any]],
                                                            dict[str, Tensor], Path]:
    """Read a PEFT-layout adapter directory as `load_adapter` reads it, without a model.

    Returns:
        adapter_config.json as checked by `read_config`; {module path: {"A": (r, in) tensor, "B": (out, r)
        tensor, "embedding": bool}} as the file stores the factors (conv factors keep their 4-D shapes);
        the other tensors (biases, modules_to_save copies) by module-relative key; and the weights file
        read (adapter_model.safetensors, else PEFT's older adapter_model.bin, loaded without pickle code).

    Raises:
        AdapterFileError: a file is missing or corrupt, a factor lacks its partner, the file holds DoRA
            tensors, or it holds the factors of several adapters (keys `lora_A.<name>.weight` whose
            names differ).
    """
    directory = Path(directory)
    data = read_config(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.exists() and (directory / "adapter_model.bin").exists():
        weights = directory / "adapter_model.bin"
    tensors, _ = read_weights(weights)
    names = {m[1] for key in tensors
             if (m := re.search(r"\.lora_(?:embedding_)?[AB]\.(?!weight$)([^.]+)(?:\.weight)?$", key))}
    if len(names) > 1:
        raise AdapterFileError(f"{weights} holds the factors of several adapters ({', '.join(sorted(names))}); "
                               "save each adapter to its own directory.")
    pairs, extra = _split_keys(tensors, weights)
    return data, pairs, extra, weights
