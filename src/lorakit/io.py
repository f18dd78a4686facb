"""Adapter files: save and load in Hugging Face PEFT's layout, and import loralib checkpoints.

A saved adapter is a directory with `adapter_config.json` and `adapter_model.safetensors`,
tensor keys `base_model.model.<module path>.lora_A.weight` / `.lora_B.weight` (embeddings:
`lora_embedding_A` / `lora_embedding_B`; DoRA's magnitudes `.lora_magnitude_vector`), exactly as PEFT
writes them, so PEFT, vLLM and
friends read lorakit's adapters and lorakit reads theirs. lorakit adds one entry to the
safetensors header's metadata, "lorakit", with a fingerprint of the base (adapted module paths and
weight shapes), the slice masks of fused projections and a copy of the config fields that decide the
scale (so a config from another save is refused); PEFT ignores it.

Parameter adapters (`target_parameters`, `lorakit.experts`) are written as PEFT writes them: under the
owning module's path, with one ".base_layer" per adapted parameter of that module that comes after it
(PEFT nests one wrapper per parameter), and `target_parameters` in adapter_config.json.

Loading treats files as untrusted data: every value is checked before the model is touched, regex
patterns that could backtrack for ages are refused, and whatever goes wrong becomes an AdapterFileError
naming the file, with the model left as it was.

Nothing is unpickled: safetensors files are plain data, and `.bin`/`.pt` files go through
`torch.load(weights_only=True)`, which refuses to run code.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import glob
import json
import math
import os
import re
import shutil
import stat
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import experts
from .config import LoraConfig, scaling
from .errors import AdapterFileError, ConfigError, LoraError, ShapeMismatchError
from .inject import _NAME_RE, _require, configs, inject, lora_layers, saved_module_paths
from .layers import LoraEmbedding, LoraLayer, is_linear_like, supported
from .quant import is_bnb_linear

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
CARD_NAME = "README.md"
CARD_MARKER = "<!-- written by lorakit's save_adapter and rewritten on every save; delete this line to keep edits -->"
TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "SEQ_2_SEQ_LM", "FEATURE_EXTRACTION")
"""PEFT's task types, for adapter_config.json's `task_type` (which PEFT's AutoPeftModel* classes need)."""
PREFIX = "base_model.model."
FORMAT_VERSION = 1


# -- save ---------------------------------------------------------------------------------------------
def adapter_state_dict(model: nn.Module, name: str = "default", pissa_as_lora: bool = True, *,
                       task_type: str | None = "auto"
                       ) -> tuple[dict[str, Tensor], dict[str, Any], dict[str, Any]]:
    """The tensors of adapter `name` under PEFT's keys, the adapter_config.json dict, and lorakit's
    own metadata (base fingerprint, slice masks, the LoraConfig), which goes into the safetensors header.

    The config's `task_type` is `task_type` unless that is "auto", which infers it from the model's
    class (see `infer_task_type`). `base_model_name_or_path` is the name the base was loaded by: the
    hub id or directory given to `from_pretrained`, or for a bundled model of `lorakit.models` its
    bundled name (its package and version go into the header's metadata, "base_model").

    Raises:
        AdapterNotFoundError: the model has no adapter `name`.
        ConfigError: `task_type` is not "auto", None or one of `TASK_TYPES`.

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
    if task_type == "auto":
        task_type = infer_task_type(model)
    elif task_type is not None and task_type not in TASK_TYPES:
        raise ConfigError(f"task_type={task_type!r} is not one of PEFT's task types; pass one of "
                          f"{', '.join(TASK_TYPES)}, None, or 'auto' to infer it from the model class")
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
    target_parameters = []  # adapted parameters, by their full names (PEFT's target_parameters)
    peft_paths = experts.peft_key_paths(model, name)
    for path, layer in lora_layers(model):
        if name not in layer.adapters:
            continue
        a = layer.adapters[name]
        if isinstance(layer, experts.LoraParam):
            # PEFT's keys: the owner's path, one ".base_layer" per parameter wrapped after this one
            key = experts.parameter_path(path)
            target_parameters.append(key)
            fingerprint[key] = list(layer.weight.shape)
            tensors[f"{PREFIX}{peft_paths[path]}.lora_A.weight"] = a.lora_A
            tensors[f"{PREFIX}{peft_paths[path]}.lora_B.weight"] = a.lora_B
            if a.r != cfg.r or a.alpha != cfg.alpha:
                rank_pattern[re.escape(key)] = a.r
                alpha_pattern[re.escape(key)] = a.alpha
            continue
        paths.append(path)
        fingerprint[path] = _weight_shape(layer)
        A, B = a.lora_A, a.full_B()
        if convert:
            A, B = torch.cat([A, a.pissa_A0]), torch.cat([B, -a.pissa_B0], dim=1)  # (2r, in), (out, 2r)
        if isinstance(layer, LoraEmbedding):
            tensors[f"{PREFIX}{path}.lora_embedding_A"] = A
            tensors[f"{PREFIX}{path}.lora_embedding_B"] = B
        else:
            tensors[f"{PREFIX}{path}.lora_A.weight"] = A
            tensors[f"{PREFIX}{path}.lora_B.weight"] = B
        if a.dora:
            tensors[f"{PREFIX}{path}.lora_magnitude_vector"] = a.lora_magnitude_vector
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
    from .models import BASE_MODEL_ATTR

    bundled = model.__dict__.get(BASE_MODEL_ATTR)
    base_name = (bundled["name"] if bundled else
                 getattr(getattr(model, "config", None), "_name_or_path", None) or None)
    peft_config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_name,
        "r": cfg.r * grow_r,
        "lora_alpha": cfg.alpha * grow_alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": paths,
        "target_parameters": target_parameters or None,
        "exclude_modules": None,
        "bias": cfg.bias,
        "use_rslora": cfg.rslora,
        "fan_in_fan_out": False,
        "init_lora_weights": "pissa" if cfg.init == "pissa" and not convert else True,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "modules_to_save": list(cfg.modules_to_save) if cfg.modules_to_save else None,
        "inference_mode": True,
        "use_dora": cfg.dora,
    }
    meta = {
        "format_version": FORMAT_VERSION,
        "config": (dataclasses.replace(cfg, r=cfg.r * grow_r, alpha=cfg.alpha * grow_alpha, init="kaiming",
                                       rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
                   if convert else cfg).to_dict(),
        "base_fingerprint": {"model_class": type(model).__name__, "modules": fingerprint},
        "slices": slices,
        "adapter_config": {key: peft_config[key] for key in PAIRED_FIELDS},
    }
    if bundled:
        meta["base_model"] = dict(bundled)
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}, peft_config, meta


def infer_task_type(model: nn.Module) -> str | None:
    """PEFT's task type for a transformers model, from its class as transformers' Auto classes list it:
    AutoModelForCausalLM's (e.g. LlamaForCausalLM, GPT2LMHeadModel) -> CAUSAL_LM,
    AutoModelForSequenceClassification's -> SEQ_CLS, AutoModelForTokenClassification's -> TOKEN_CLS,
    AutoModelForQuestionAnswering's -> QUESTION_ANS, AutoModelForSeq2SeqLM's -> SEQ_2_SEQ_LM, AutoModel's
    (a model without a head, e.g. BertModel) -> FEATURE_EXTRACTION. A class transformers does not list
    (e.g. remote code) goes by its name's suffix (*ForCausalLM, ...); anything else (e.g. a plain
    nn.Module) -> None."""
    cls = type(model).__name__
    suffixes = {"CAUSAL_LM": ("ForCausalLM", "LMHeadModel"), "SEQ_CLS": ("ForSequenceClassification",),
                "TOKEN_CLS": ("ForTokenClassification",), "QUESTION_ANS": ("ForQuestionAnswering",)}
    try:
        from transformers import PreTrainedModel
        from transformers.models.auto import modeling_auto as auto
    except ImportError:
        return None
    if not isinstance(model, PreTrainedModel):
        return None
    listed = {"SEQ_2_SEQ_LM": auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
              "CAUSAL_LM": auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
              "SEQ_CLS": auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
              "TOKEN_CLS": auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES,
              "QUESTION_ANS": auto.MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES,
              "FEATURE_EXTRACTION": auto.MODEL_MAPPING_NAMES}
    for task, mapping in listed.items():
        # values are a class name, or a tuple of them for model types with several classes
        if any(cls == v or (isinstance(v, (tuple, list)) and cls in v) for v in mapping.values()):
            return task
    for task, ends in suffixes.items():
        if cls.endswith(ends):
            return task
    if getattr(model.config, "is_encoder_decoder", False) and cls.endswith("ForConditionalGeneration"):
        return "SEQ_2_SEQ_LM"
    return "FEATURE_EXTRACTION" if model.base_model is model else None


def model_card(peft_config: dict[str, Any], meta: dict[str, Any]) -> str:
    """README.md text for a saved adapter, in the layout PEFT writes: a YAML header with the base
    model and library, then the config's main fields. Starts with `CARD_MARKER`."""
    from . import __version__

    base = peft_config["base_model_name_or_path"]
    bundled = meta.get("base_model")
    header = ["---", f"base_model: {json.dumps(base)}" if base else None, "library_name: lorakit",
              "tags:", "- lora", "- peft",
              "pipeline_tag: text-generation" if peft_config["task_type"] == "CAUSAL_LM" else None, "---"]
    where = (f"`{base}`, bundled with lorakit (package {bundled['package']} {bundled['version']}; "
             f"`lorakit.models.load_model({base!r})`)" if bundled else f"`{base}`" if base else "not recorded")
    fields = [("Base model", where), ("Task type", peft_config["task_type"]), ("Rank (r)", peft_config["r"]),
              ("lora_alpha", peft_config["lora_alpha"]), ("lora_dropout", peft_config["lora_dropout"]),
              ("use_rslora", peft_config["use_rslora"]), ("bias", peft_config["bias"]),
              ("Target modules", f"{', '.join(sorted({t.rsplit('.', 1)[-1] for t in peft_config['target_modules']}))}"
                                 f" ({len(peft_config['target_modules'])} modules)"),
              ("modules_to_save", peft_config["modules_to_save"])]
    body = [CARD_MARKER, "", "# LoRA adapter", "",
            "A LoRA adapter in PEFT's format (`adapter_config.json` + `adapter_model.safetensors`), written by "
            "lorakit. Load it with `lorakit.load_adapter(model, path)` or PEFT's `PeftModel.from_pretrained`.",
            "", "## Adapter", "", *(f"- {k}: {v}" for k, v in fields), "",
            "### Framework versions", "", f"- lorakit {__version__}", f"- torch {torch.__version__}", ""]
    return "\n".join(line for line in header if line is not None) + "\n" + "\n".join(body)


def _writes_card(out: Path) -> bool:
    """Whether save_adapter may (re)write the model card in `out`: none is there, or lorakit wrote it."""
    card = out / CARD_NAME
    if card.is_symlink() or (card.exists() and not card.is_file()):
        return False
    if not card.exists():
        return True
    with open(card, encoding="utf-8", errors="replace") as f:
        return any(line.rstrip("\r\n") == CARD_MARKER for line in f)


def save_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default", *,
                 pissa_as_lora: bool = True, task_type: str | None = "auto") -> Path:
    """Write adapter `name` to directory `path` (created if needed) in PEFT's layout, with a model card
    README.md beside it. Returns the path.

    adapter_config.json's `task_type` is inferred from the model class (`infer_task_type`: CAUSAL_LM for
    *ForCausalLM, which PEFT's AutoPeftModelForCausalLM needs, ...) unless `task_type` names one of
    `TASK_TYPES` or is None. `base_model_name_or_path` names the base portably (see `adapter_state_dict`).
    The README.md is written only where none is, or where the one there is lorakit's (it holds
    `CARD_MARKER`); a README of the user's is left as it is. As with an ordinary write, new files and
    folders get the modes of the process umask (0644 / 0755 under umask 022) and existing ones keep theirs.

    A PiSSA adapter is written by default as the rank-2r LoRA for the original base weights, so the
    file loads like any other (see `adapter_state_dict`); `pissa_as_lora=False` writes the rank-r
    factors as trained, marked init_lora_weights "pissa".


    A save killed at any point leaves the old pair of files or the new pair. Where `path` is new or
    holds nothing but an adapter, both files are written and flushed to disk in a fresh hidden directory
    beside it, which then takes its place in one atomic exchange (Linux's renameat2; elsewhere two
    renames, between which `path` is briefly absent and the old adapter sits in `.<name>.old-*`, put back
    by the next save). A directory that holds other files too is updated in place: both files are
    written in full first, then renamed in, weights first; a kill between those two renames leaves the
    new weights beside the old config, and `load_adapter` refuses that mix (the weights' header holds a
    copy of the config fields that decide the scale, PAIRED_FIELDS). The next save into the same place
    removes what killed saves left behind, so two processes must not save to one path at once. The model
    card takes part in the swap; in place it is renamed in last, so a kill can leave only the card stale.

    Raises:
        AdapterNotFoundError: the model has no adapter `name`.
        AdapterFileError: the directory cannot be created or written (e.g. the disk is full).
        ConfigError: `task_type` is not "auto", None or one of `TASK_TYPES`.

    Warns:
        lorakit.compat.VllmWarning: for each of vLLM's loading rules the saved adapter breaks
            (`lorakit.compat.vllm_problems`), with the fix; the files are written all the same.
    """
    from safetensors import SafetensorError
    from safetensors.torch import save

    tensors, peft_config, meta = adapter_state_dict(model, name, pissa_as_lora, task_type=task_type)
    # Shared storage (tied weights) is not allowed by safetensors: give each tensor its own.
    seen: set[int] = set()
    for key, t in tensors.items():
        if t.untyped_storage().data_ptr() in seen:
            tensors[key] = t.clone()
        seen.add(tensors[key].untyped_storage().data_ptr())
    out = Path(path)
    try:
        # Serialized here and written by us: safetensors' save_file would leave temp files of its own when killed.
        files = {WEIGHTS_NAME: save(tensors, metadata={"format": "pt", "lorakit": json.dumps(meta)}),
                 CONFIG_NAME: (json.dumps(peft_config, indent=2, sort_keys=True) + "\n").encode()}
        if _writes_card(out):
            files[CARD_NAME] = model_card(peft_config, meta).encode()
        if out.name in ("", ".", "..") or out.is_symlink() or (out.is_dir() and not _holds_only_an_adapter(out)):
            _save_in_place(out, files)
        else:
            _save_by_swap(out, files)
    except (OSError, SafetensorError) as exc:
        raise AdapterFileError(f"Could not write the adapter to {out}: {exc}. Pick a writable directory with "
                               "free space.") from exc
    from .compat import VllmWarning, vllm_problems
    for problem in vllm_problems(out):
        warnings.warn(f"{out}: {problem}", VllmWarning, stacklevel=2)
    return out


def _holds_only_an_adapter(directory: Path) -> bool:
    return all(f.name in (WEIGHTS_NAME, CONFIG_NAME) or _is_temp_file(f.name)
               or (f.name == CARD_NAME and _writes_card(directory)) for f in directory.iterdir())


def _is_temp_file(name: str) -> bool:
    return any(name.startswith(f".{target}.") and name.endswith(".tmp")
               for target in (WEIGHTS_NAME, CONFIG_NAME, CARD_NAME))


def _kept_mode(path: Path) -> int | None:
    """The permission bits of the existing file or folder `path` (links followed); None if there is none."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return None


def umask_mode(directory: bool = False) -> int:
    """The mode a new file (0o666) or folder (0o777) gets under the process umask, e.g. 0o644 / 0o755
    under umask 022; for temp files and folders, which are created private (0o600 / 0o700)."""
    mask = None
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as f:  # read without changing it (Linux 4.7+)
            mask = next((int(line.split()[1], 8) for line in f if line.startswith("Umask:")), None)
    if mask is None:
        mask = os.umask(0o022)
        os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def _save_in_place(out: Path, files: dict[str, bytes]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(out)
    with contextlib.ExitStack() as stack:
        temps = {name: stack.enter_context(_temp_file(out / name, lambda f, b=data: Path(f).write_bytes(b)))
                 for name, data in files.items()}
        for name, tmp in temps.items():  # weights first: see save_adapter
            os.replace(tmp, out / name)
    fsync_directory(out)


def _save_by_swap(out: Path, files: dict[str, bytes]) -> None:
    parent = out.parent
    parent.mkdir(parents=True, exist_ok=True)
    _clear_swap_leftovers(out)
    new = Path(tempfile.mkdtemp(prefix=f".{out.name}.new-", dir=parent))
    try:
        # mkdtemp makes it 0700; it becomes `out`, so it keeps out's mode (the umask's for a new folder)
        kept = _kept_mode(out)
        os.chmod(new, umask_mode(directory=True) if kept is None else kept)
        for name, data in files.items():
            with open(new / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        fsync_directory(new)
        if not out.exists():
            os.rename(new, out)
        elif not _exchange(new, out):
            old = parent / new.name.replace(".new-", ".old-", 1)
            os.rename(out, old)
            try:
                os.rename(new, out)
            except OSError:
                os.rename(old, out)
                raise
            new = old
        fsync_directory(parent)
    finally:
        shutil.rmtree(new, ignore_errors=True)  # the old adapter after a swap; a partial new one after a failure


def _clear_swap_leftovers(out: Path) -> None:
    """Remove the hidden directories of saves to `out` that were killed; if one was killed while `out`
    was moved aside, put the old adapter back first."""
    stem = glob.escape(f".{out.name}.")
    olds = sorted(out.parent.glob(stem + "old-*"))
    if olds and not out.exists():
        os.rename(olds.pop(), out)
    for leftover in [*olds, *out.parent.glob(stem + "new-*")]:
        shutil.rmtree(leftover, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where that is unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False  # the file system cannot exchange
    raise OSError(err, os.strerror(err), str(b))


def atomic_write(target: Path, write) -> None:
    """Call write(tmp_path) on a temp file beside `target`, fsync it, rename it over `target`, fsync the folder."""
    with _temp_file(target, write) as tmp:
        os.replace(tmp, target)
    fsync_directory(target.parent)


@contextlib.contextmanager
def _temp_file(target: Path, write):
    """A temp file beside `target` (hidden, named after it), written by write(path) and flushed to disk;
    removed on the way out unless it was renamed away."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    # mkstemp makes it 0600: give it the mode an ordinary write gives (the old file's, else the umask's)
    kept = _kept_mode(target)
    os.chmod(tmp, umask_mode() if kept is None else kept)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        yield tmp
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def remove_stale_temp_files(directory: Path) -> None:
    """Remove the temp files that a killed in-place save_adapter left in `directory`."""
    for stale in directory.iterdir():
        if _is_temp_file(stale.name):
            with contextlib.suppress(OSError):
                stale.unlink()


def fsync_directory(directory: Path) -> None:
    """Flush `directory`'s entries (the renames into it) to disk, where the platform allows it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # e.g. Windows, where a directory cannot be opened; its renames are durable by themselves
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems do not flush directories
    finally:
        os.close(fd)


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

    Only what the config declares is loaded: LoRA tensors, the modules in `modules_to_save`, and
    biases when `bias` is "all" or "lora_only". Base parameters an adapter replaces this way are
    remembered, and `delete_adapter` / `eject(merge=False)` put them back. A loralib checkpoint has no
    config: every tensor in it that names a parameter of the model is loaded (its classification head,
    biases), except the frozen weight of a module it adapts. Everything is checked (config values,
    header metadata, shapes, dtypes, finiteness) before the model is touched, and if anything still
    fails while installing, the model is put back exactly as it was. With `check_base=False` the
    checks against what the file records of its origin are skipped: the fingerprint of the base model
    and the copy of the config in the weights' header.

    Raises:
        AdapterFileError: missing, empty, truncated, corrupt or malformed files, values of the wrong
            type, non-finite tensors, tensors the config does not declare, a config that disagrees with
            the copy in the weights' header; anything else that goes wrong reading a file.
        ShapeMismatchError: the adapter was made for another base (names the first module that
            differs and both shapes).
        ConfigError: `name` is taken or not a plain name, alpha is missing for a loralib file, or an
            argument has the wrong type.
    """
    _check_arguments(model, path, name, alpha, slices, check_base)
    if name in configs(model):
        raise ConfigError(f"The model already has an adapter named {name!r}; load under another name=.")
    return install_plan(model, plan_adapter(model, path, alpha=alpha, slices=slices, check_base=check_base), name)


def plan_adapter(model: nn.Module, path: str | os.PathLike, *, alpha: float | None = None,
                 slices: list[bool] | None = None, check_base: bool = True) -> "_Plan":
    """The first half of `load_adapter`: read the adapter at `path` and check it against `model`, touching
    nothing. The plan holds the checked tensors; `install_plan` installs it (also later, on the same model,
    as a server does to keep adapters read in host memory).

    Raises:
        The errors of `load_adapter` that concern the files and their fit to the model.
    """
    _check_arguments(model, path, "default", alpha, slices, check_base)
    p = Path(path)
    if p.is_dir():
        source, read = p, lambda: _plan_peft_dir(model, p, check_base)
    elif p.is_file() and p.suffix == ".safetensors":
        source, read = p, lambda: _plan_peft_dir(model, p.parent, check_base, weights=p)
    elif p.is_file():
        source, read = p, lambda: _plan_loralib(model, p, alpha, slices)
    else:
        aside = sorted(p.parent.glob(glob.escape(f".{p.name}.") + "old-*")) if p.name else []
        hint = (f" A save_adapter to it was killed while the previous adapter was moved aside: it is in {aside[-1]};"
                f" rename that back to {p.name}, or save again.") if aside else ""
        raise AdapterFileError(f"No adapter at {p}: the path does not exist. Give the directory that holds "
                               f"{CONFIG_NAME} and {WEIGHTS_NAME}, or a loralib .pt/.bin file.{hint}")
    try:
        return read()
    except LoraError:
        raise
    except Exception as exc:  # whatever else a damaged or hostile file provokes
        raise AdapterFileError(f"{source} could not be loaded ({type(exc).__name__}: {str(exc)[:200]}); it is "
                               "damaged or not an adapter. Re-save or re-download it.") from exc


def install_plan(model: nn.Module, plan: "_Plan", name: str = "default") -> nn.Module:
    """The second half of `load_adapter`: install a plan of `plan_adapter` as adapter `name` and make it
    active. If anything fails, the model is put back as it was. Returns `model`.

    Raises:
        ConfigError: `name` is taken or not a plain name.
    """
    if name in configs(model):
        raise ConfigError(f"The model already has an adapter named {name!r}; load under another name=.")
    _install(model, name, plan)
    return model


def _check_arguments(model: Any, path: Any, name: Any, alpha: Any, slices: Any, check_base: Any) -> None:
    if not isinstance(model, nn.Module):
        raise ConfigError(f"load_adapter expects a torch.nn.Module as model, got {type(model).__name__}.")
    if not isinstance(path, (str, os.PathLike)):
        raise ConfigError(f"load_adapter expects the adapter's path as a str or os.PathLike (a directory, or a "
                          f"loralib .pt/.bin file), got {path!r}.")
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ConfigError(f"Adapter name {name!r} must be letters, digits, '_' or '-' (it is used in file keys).")
    if alpha is not None and not (_finite_number(alpha) and alpha > 0):
        raise ConfigError(f"alpha must be a positive number (the lora_alpha used in training), got {alpha!r}.")
    if slices is not None and not _mask(slices):
        raise ConfigError(f"slices must be a list of booleans with at least one True, e.g. [True, False, True]; "
                          f"got {slices!r}.")
    if not isinstance(check_base, bool):
        raise ConfigError(f"check_base must be True or False, got {check_base!r}.")


def _finite_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _mask(x: Any) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(m, bool) for m in x) and any(x)


#: adapter_config.json fields that decide what a load computes: save_adapter copies them into the
#: safetensors header, and load_adapter refuses a config that disagrees with that copy.
PAIRED_FIELDS = ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "bias", "modules_to_save")

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def read_config(directory: Path) -> dict[str, Any]:
    """adapter_config.json as a dict, checked as data: every field lorakit reads has the right JSON type and
    a valid value (positive integer ranks, positive finite alphas, booleans that are JSON booleans, safe
    pattern keys).

    Raises:
        AdapterFileError: the file is missing, not JSON, or a field is wrong (named with its value).
    """
    cfg_path = directory / CONFIG_NAME
    if not cfg_path.is_file():
        listing = sorted(x.name for x in directory.iterdir())[:10]
        raise AdapterFileError(
            f"{directory} holds no {CONFIG_NAME} (it contains: {listing or 'nothing'}). "
            "Point load_adapter at the directory that save_adapter / PEFT's save_pretrained wrote.")
    try:
        data = json.loads(cfg_path.read_text())
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, nesting too deep
        raise AdapterFileError(f"{cfg_path} is not valid JSON ({type(exc).__name__}: {str(exc)[:200]}); the file "
                               "is damaged. Re-save the adapter.") from exc
    if not isinstance(data, dict):
        raise AdapterFileError(f"{cfg_path} must hold a JSON object, found {type(data).__name__}.")

    def bad(key: str, want: str) -> AdapterFileError:
        return AdapterFileError(f"{cfg_path}: field {key!r} must be {want}, found {data.get(key)!r}. Fix the "
                                "file or re-save the adapter.")

    if data.get("peft_type", "LORA") != "LORA":
        raise AdapterFileError(f"{cfg_path} describes a {data.get('peft_type')!r} adapter; lorakit loads LoRA only.")
    r = data.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise bad("r", "a positive integer")
    if not (_finite_number(data.get("lora_alpha")) and data["lora_alpha"] > 0):
        raise bad("lora_alpha", "a positive finite number")
    for key in ("use_rslora", "use_dora", "lora_bias"):
        if data.get(key) is not None and not isinstance(data[key], bool):
            raise bad(key, "true or false (a JSON boolean)")
    dropout = data.get("lora_dropout")
    if dropout is not None and not (_finite_number(dropout) and 0 <= dropout < 1):
        raise bad("lora_dropout", "a number in [0, 1)")
    if data.get("bias") is not None and data["bias"] not in ("none", "all", "lora_only"):
        raise bad("bias", 'one of "none", "all", "lora_only"')
    params = data.get("target_parameters")
    if params is not None and not (isinstance(params, list) and all(isinstance(t, str) and t for t in params)):
        raise bad("target_parameters", "null or a list of parameter names")
    saved = data.get("modules_to_save")
    if saved is not None and not (isinstance(saved, list) and all(isinstance(m, str) and m for m in saved)):
        raise bad("modules_to_save", "null or a list of module names")
    for key in ("rank_pattern", "alpha_pattern"):
        if data.get(key) is not None and not isinstance(data[key], dict):
            raise bad(key, "an object {module pattern: value}")
    if data.get("lora_bias"):
        raise AdapterFileError(f"{cfg_path} has lora_bias=true (a bias on B); lorakit does not support that yet.")
    try:  # the patterns' keys and values, checked as LoraConfig checks a user's
        _file_config(data)
    except ConfigError as exc:
        raise AdapterFileError(f"{cfg_path}: {exc}") from exc
    return data


def _file_config(data: dict[str, Any]) -> LoraConfig:
    """The scale-deciding fields of a checked adapter_config.json dict as a LoraConfig (targets unused)."""
    return LoraConfig(r=data["r"], alpha=data["lora_alpha"], rslora=bool(data.get("use_rslora")), targets=["_"],
                      rank_pattern=dict(data.get("rank_pattern") or {}),
                      alpha_pattern=dict(data.get("alpha_pattern") or {}))


def read_weights(file: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Tensors of an adapter weights file (safetensors, or PEFT's old .bin read without pickle code),
    and lorakit's metadata from the safetensors header ({} when absent), checked as data.

    Raises:
        AdapterFileError: the file is missing, truncated, corrupt, or its metadata is malformed.
    """
    if not file.is_file():
        raise AdapterFileError(f"{file} is missing: the adapter directory has a config but no weights.")
    if file.suffix != ".safetensors":
        return _torch_load_safely(file), {}
    from safetensors import safe_open
    try:
        with safe_open(str(file), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # SafetensorError, OSError, and whatever a damaged header provokes
        raise AdapterFileError(
            f"{file} is truncated or corrupt ({exc}). Re-save or re-download the adapter.") from exc
    if "lorakit" not in header:
        return tensors, {}
    try:
        meta = json.loads(header["lorakit"])
    except (ValueError, RecursionError) as exc:
        raise AdapterFileError(f"{file}: lorakit's metadata in the safetensors header is not valid JSON "
                               f"({type(exc).__name__}); the file is damaged. Re-save the adapter.") from exc
    _check_meta(meta, file)
    return tensors, meta


def _check_meta(meta: Any, file: Path) -> None:
    def bad(what: str) -> AdapterFileError:
        return AdapterFileError(f"{file}: lorakit's metadata in the safetensors header is malformed ({what}); the "
                                "file is damaged. Re-save the adapter.")

    if not isinstance(meta, dict):
        raise bad(f"a {type(meta).__name__}, not an object")
    version = meta.get("format_version", FORMAT_VERSION)
    if isinstance(version, bool) or not isinstance(version, int):
        raise bad(f"format_version {version!r}")
    if version > FORMAT_VERSION:
        raise AdapterFileError(f"{file} was written by a newer lorakit (format {version}; this one reads "
                               f"{FORMAT_VERSION}). Upgrade lorakit.")
    fingerprint = meta.get("base_fingerprint")
    if fingerprint is not None:
        modules = fingerprint.get("modules", {}) if isinstance(fingerprint, dict) else None
        if not isinstance(modules, dict) or not all(
                isinstance(shape, list) and all(isinstance(n, int) and not isinstance(n, bool) for n in shape)
                for shape in modules.values()):
            raise bad(f"base_fingerprint {str(fingerprint)[:100]}")
    slices = meta.get("slices", {})
    if not isinstance(slices, dict) or not all(_mask(mask) for mask in slices.values()):
        raise bad(f"slices {str(slices)[:100]}")
    if not isinstance(meta.get("adapter_config", {}), dict):
        raise bad(f"adapter_config {str(meta['adapter_config'])[:100]}")


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
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in data.items()):
        raise AdapterFileError(f"{file} does not hold a dict of tensors under string keys.")
    return dict(data)


class _Module:
    """What one adapted module receives: A, B in the adapter's own layout, rank, alpha, slice mask, and
    a DoRA adapter's magnitude (out,) (None for LoRA)."""

    def __init__(self, A: Tensor, B: Tensor, r: int, alpha: float, slices: list[bool] | None,
                 magnitude: Tensor | None = None) -> None:
        self.A, self.B, self.r, self.alpha, self.slices = A, B, r, alpha, slices
        self.magnitude = magnitude


class _Plan:
    """A checked adapter, ready to install: nothing in it can fail against the model it was planned for."""

    def __init__(self, source: str, modules: dict[str, _Module], rslora: bool, dropout: float, bias: str,
                 modules_to_save: list[str] | None, extra: dict[str, Tensor], init: str = "zeros",
                 params: dict[str, _Module] | None = None, dora: bool = False) -> None:
        self.source, self.modules, self.rslora, self.dropout = source, modules, rslora, dropout
        self.bias, self.modules_to_save, self.extra, self.init = bias, modules_to_save, extra, init
        self.params = params or {}  # adapted parameters (target_parameters), by full parameter name
        self.dora = dora


def _plan_peft_dir(model: nn.Module, directory: Path, check_base: bool, weights: Path | None = None) -> _Plan:
    data = read_config(directory)
    if weights is None:
        weights = directory / WEIGHTS_NAME
        if not weights.exists() and (directory / "adapter_model.bin").exists():
            weights = directory / "adapter_model.bin"
    tensors, meta = read_weights(weights)
    if check_base:
        _check_pair(data, meta.get("adapter_config"), directory / CONFIG_NAME, weights)
        if meta.get("base_fingerprint"):
            check_fingerprint(model, meta["base_fingerprint"], directory)
    pairs, extra = _split_keys(tensors, weights)
    if not pairs:
        raise AdapterFileError(f"{weights} holds no LoRA tensors (no *.lora_A / *.lora_B keys).")
    file_cfg = _file_config(data)
    rslora = file_cfg.rslora
    saved_slices = meta.get("slices") or {}
    modules, params = {}, {}
    target_parameters = data.get("target_parameters") or []
    dora = bool(data.get("use_dora"))
    for path, entry in pairs.items():
        if target_parameters:
            key = experts.resolve_peft_path(model, path, target_parameters)
            if key is not None:
                params[key] = _plan_param(model, key, entry, file_cfg.alpha_for(key), rslora, file_cfg.rank_for(key),
                                          str(weights))
                continue
            if path.endswith(".base_layer") or not _adaptable_module(model, path):
                raise ShapeMismatchError(
                    f"{weights} holds LoRA tensors under {path!r} for target_parameters={target_parameters}, but no "
                    f"parameter of this {type(model).__name__} there matches them; the adapter was trained on "
                    "another architecture (its parameter names differ).")
        modules[path] = _plan_module(model, path, entry, file_cfg.alpha_for(path), rslora, saved_slices.get(path),
                                     str(weights), rank=file_cfg.rank_for(path))
        modules[path].magnitude = _plan_magnitude(model, path, entry, dora, str(weights))
    bias = data.get("bias") or "none"
    modules_to_save = data.get("modules_to_save") or None
    # PiSSA factors as trained (save_adapter(pissa_as_lora=False), PEFT's default): the loaded base is the
    # original one, so the PiSSA initialization is done again to make its residual, and then the factors loaded
    init = "pissa" if str(data.get("init_lora_weights")).lower().startswith("pissa") else "zeros"
    declared = _declared_parameters(model, modules, bias, modules_to_save, str(weights))
    extra = _without_embedding_copies(model, extra, modules, declared, weights)
    for key in extra:
        if key not in declared:
            raise AdapterFileError(
                f"{weights} holds tensor {key!r}, which {CONFIG_NAME} does not declare (it is no LoRA tensor, no "
                f"module in modules_to_save={modules_to_save} and bias={bias!r} loads no bias). lorakit loads "
                "only what the config declares: remove the tensor, or declare the module in modules_to_save.")
    _check_extra(model, extra, str(weights))
    return _Plan(str(weights), modules, rslora, float(data.get("lora_dropout") or 0.0), bias, modules_to_save, extra,
                 init, params, dora)


def _adaptable_module(model: nn.Module, path: str) -> bool:
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return False
    return isinstance(module, LoraLayer) or supported(module)


def _plan_param(model: nn.Module, key: str, entry: dict[str, Any], alpha: float, rslora: bool, rank: int,
                source: str) -> _Module:
    """Check one parameter adapter's A (r*E, in) and B (out, r*E) against parameter `key` of the model."""
    shape = experts.parameter_shape(model, key)
    if shape is None:
        raise ShapeMismatchError(f"{source} adapts parameter {key!r}, which this {type(model).__name__} does not have "
                                 "as a 2-D or 3-D weight; the adapter was trained on another architecture.")
    num_experts, n_in, n_out, _ = shape
    param = model.get_submodule(key.rpartition(".")[0])._parameters[key.rpartition(".")[2]]
    A = _checked_tensor(entry["A"], f"{key} lora_A", source, param.dtype)
    B = _checked_tensor(entry["B"], f"{key} lora_B", source, param.dtype)
    rows = A.shape[0] if A.ndim else 0
    if entry["embedding"] or A.ndim != 2 or B.ndim != 2 or not rows or A.shape[1] != n_in or B.shape[0] != n_out \
            or B.shape[1] != rows or rows % num_experts:
        raise ShapeMismatchError(
            f"{source}: parameter {key!r} has shape {tuple(param.shape)} here ({num_experts} experts of in={n_in}, "
            f"out={n_out}), which takes lora_A (r*{num_experts}, {n_in}) and lora_B ({n_out}, r*{num_experts}); the "
            f"adapter has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}. It belongs to another base model.")
    if rows != rank * num_experts:
        raise AdapterFileError(
            f"{source}: parameter {key!r} has rank {rows // num_experts} per expert (lora_A has {rows} rows for "
            f"{num_experts} experts) but {CONFIG_NAME} gives it r={rank}, which needs {rank * num_experts} rows: the "
            "rank pattern does not fit these weights. Fix rank_pattern or re-save the adapter.")
    return _Module(A, B, rank, alpha, None)


def _without_embedding_copies(model: nn.Module, extra: dict[str, Tensor], modules: dict, declared,
                              file: Path) -> dict[str, Tensor]:
    """`extra` less the copies of embedding weights that PEFT saves beside an adapter (`save_embedding_layers`,
    on by default when an embedding is a target, so that a resized vocabulary travels with it): an adapted
    module's `base_layer.weight`, or the input / output embedding's `weight` where the config does not declare
    it (modules_to_save). A copy equal to the model's own weight changes nothing and is dropped.

    Raises:
        AdapterFileError: a copy that differs from the model's weight (the adapter was trained on changed
            embeddings), which loading would have to replace.
    """
    embeddings = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            module = getattr(model, getter)() if hasattr(model, getter) else None
        except (AttributeError, NotImplementedError):
            module = None
        if module is not None:
            embeddings.add(id(module))
    kept = {}
    for key, t in extra.items():
        path, _, leaf = key.rpartition(".")
        adapted = path.removesuffix(".base_layer")
        if adapted != path and adapted in modules:
            path = adapted
            module = _get(model, path)
        else:
            module = _get(model, path) if path else None
            module = module if id(module) in embeddings else None
        own = getattr(module, "weight", None)
        if key in declared or leaf != "weight" or not isinstance(own, Tensor):
            kept[key] = t
            continue
        if own.shape != t.shape or not torch.equal(own.detach().to(device=t.device, dtype=t.dtype), t):
            raise AdapterFileError(
                f"{file} holds a copy of {path}.weight {tuple(t.shape)} that differs from this model's "
                f"{tuple(own.shape)}: the adapter was trained on changed embeddings (often a resized vocabulary). "
                f"Give the model those embeddings first (model.resize_token_embeddings, then copy {key!r} in), "
                "or save the adapter without them (PEFT: save_pretrained(..., save_embedding_layers=False)).")
    return kept


def _get(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _plan_magnitude(model: nn.Module, path: str, entry: dict[str, Any], dora: bool, source: str) -> Tensor | None:
    """A DoRA module's magnitude (out,), checked against the model and the config's use_dora; None for LoRA.

    PEFT stores it flat for linear layers; any shape of out elements is taken (and refused later by
    `check_dora` for layer types lorakit's DoRA does not take).
    """
    M = entry.get("M")
    if M is None and not dora:
        return None
    if M is None or not dora:
        raise AdapterFileError(
            f"{source}: module {path!r} " + ("has no lora_magnitude_vector, but the config says use_dora=true" if M is
                                             None else "holds a DoRA lora_magnitude_vector, but the config says "
                                             "use_dora=false") + "; the config and the weights do not belong "
                                                                 "together. Re-save the adapter.")
    module = model.get_submodule(path)
    base = module._base if isinstance(module, LoraLayer) else module
    n_out = (base.out_features if is_bnb_linear(base) else module.weight.shape[1] if isinstance(base, nn.Embedding)
             else _out_features(base, module))
    if M.numel() != n_out or M.dim() < 1 or max(M.shape) != M.numel():
        raise ShapeMismatchError(f"{source}: module {path!r} has {n_out} outputs here but its lora_magnitude_vector "
                                 f"is {tuple(M.shape)}; it needs ({n_out},). The adapter belongs to another base "
                                 "model, or the file is damaged.")
    dtype = torch.float32 if is_bnb_linear(base) else module.weight.dtype
    return _checked_tensor(M, f"{path} lora_magnitude_vector", source, dtype).reshape(-1)


def _check_pair(data: dict[str, Any], copy: dict[str, Any] | None, config: Path, weights: Path) -> None:
    """Refuse a config whose scale-deciding fields differ from the copy that save_adapter put in the header."""
    if copy is None:
        return  # written by PEFT, or by an older lorakit
    for key in PAIRED_FIELDS:
        if data.get(key) != copy.get(key):
            raise AdapterFileError(
                f"{config} does not belong with {weights}: {key!r} is {data.get(key)!r} in the config but "
                f"{copy.get(key)!r} in the copy saved with the weights. The folder mixes two saves (an interrupted "
                "save_adapter?) or the config was edited: save the adapter again, or pass check_base=False to "
                "load the config as it is.")


def _split_keys(tensors: dict[str, Tensor], file: Path) -> tuple[dict[str, dict[str, Any]], dict[str, Tensor]]:
    """{module path: {"A": A, "B": B, "embedding": bool[, "M": DoRA magnitude]}} and the other tensors (biases,
    saved modules)."""
    pairs: dict[str, dict[str, Any]] = {}
    extra: dict[str, Tensor] = {}
    pattern = re.compile(r"(?P<path>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B"
                         r"|lora_magnitude_vector)(?:\.[A-Za-z0-9_\-]+)?(?:\.weight)?")
    for key, t in tensors.items():
        k = key[len(PREFIX):] if key.startswith(PREFIX) else key
        m = pattern.fullmatch(k)
        if m is None:
            extra[k.replace(".modules_to_save.", ".")] = t
            continue
        entry = pairs.setdefault(m["path"], {"embedding": False})
        if m["kind"] == "lora_magnitude_vector":  # DoRA
            entry["M"] = t
            continue
        entry["embedding"] |= "embedding" in m["kind"]
        entry[m["kind"][-1]] = t
    for path, entry in pairs.items():
        if "A" not in entry or "B" not in entry:
            missing = "lora_B" if "A" in entry else "lora_A"
            raise AdapterFileError(f"{file}: module {path} has no {missing} tensor; the file is incomplete.")
    return pairs, extra


def _weight_shape(module: nn.Module) -> list[int]:
    """The shape of the weight `module` stands for: (out, in) for a quantized linear (bitsandbytes packs its
    storage, e.g. (out*in/2, 1) uint8 for 4 bits), so that an adapter made on a quantized base fits the
    16-bit base and the other way round; the weight's own shape otherwise."""
    from .quant import is_bnb_linear

    if getattr(module, "quantized", False) or is_bnb_linear(module):
        return [module.out_features, module.in_features]
    return list(module.weight.shape)


def check_fingerprint(model: nn.Module, fingerprint: dict[str, Any], source: Path | str) -> None:
    """Raise ShapeMismatchError naming the first adapted module whose base weight differs."""
    modules = fingerprint.get("modules") or {}
    for path, shape in modules.items():
        owner, _, pname = path.rpartition(".")
        param = _parameter(model, owner, pname)
        if param is not None:  # an adapted parameter (target_parameters)
            if list(shape) != list(param.shape):
                raise ShapeMismatchError(
                    f"The adapter at {source} does not fit this model: parameter {path!r} has shape "
                    f"{tuple(param.shape)} here but {tuple(shape)} in the base the adapter was trained on. Load it "
                    "into the same base model (same size and architecture).")
            continue
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise ShapeMismatchError(
                f"The adapter at {source} was made for a base with a module {path!r} (weight {tuple(shape)}), "
                f"which this {type(model).__name__} does not have. It belongs to another architecture "
                f"({fingerprint.get('model_class', 'unknown')}); load it into that base model.") from None
        weight = getattr(module, "weight", None)
        # a quantized layer's packed storage shape fits too: adapter files may record it instead of (out, in)
        if not isinstance(weight, Tensor) or list(shape) not in (_weight_shape(module), list(weight.shape)):
            got = tuple(_weight_shape(module)) if isinstance(weight, Tensor) else None
            raise ShapeMismatchError(
                f"The adapter at {source} does not fit this model: module {path!r} has weight shape {got} here "
                f"but {tuple(shape)} in the base the adapter was trained on. Load it into the same base model "
                "(same size and architecture).")


def _parameter(model: nn.Module, owner: str, pname: str) -> Tensor | None:
    """Parameter `pname` that module `owner` holds itself (a LoraExperts holds its module's), or None."""
    try:
        module = model.get_submodule(owner)
    except AttributeError:
        return None
    if isinstance(module, LoraLayer):
        return None
    return module._parameters.get(pname)


def _plan_module(model: nn.Module, path: str, entry: dict[str, Any], alpha: float, rslora: bool,
                 mask: list[bool] | None, source: str, rank: int | None) -> _Module:
    """Check one module's A and B against the model and turn them into the adapter's layout.

    A sliced adapter is stored full-width: A (k*r, in) and B (out, k*r) with zero blocks where a slice is
    left out. `rank` is the rank that a PEFT config gives the module (the stored k*r), whose alpha was
    chosen to keep the scale at that rank; None for loralib files, whose alpha is for one slice's rank.
    """
    try:
        module = model.get_submodule(path)
    except AttributeError:
        raise ShapeMismatchError(
            f"{source} adapts module {path!r}, which this {type(model).__name__} does not have; the adapter "
            "was trained on another architecture.") from None
    base = module._base if isinstance(module, LoraLayer) else module
    if not (isinstance(module, LoraLayer) or supported(base)):
        raise ShapeMismatchError(f"{source} adapts module {path!r}, a {type(base).__name__}, which LoRA cannot adapt "
                                 "here; the adapter was trained on another architecture.")
    if entry["embedding"] != isinstance(base, nn.Embedding):
        raise ShapeMismatchError(f"{source}: module {path!r} is a {type(base).__name__} here but the adapter "
                                 f"holds {'embedding' if entry['embedding'] else 'linear'} LoRA tensors for it.")
    w = module.weight
    quantized = is_bnb_linear(base)  # packed weight; float32 adapters (lorakit.quant)
    A = _checked_tensor(entry["A"], f"{path} lora_A", source, torch.float32 if quantized else w.dtype)
    B = _checked_tensor(entry["B"], f"{path} lora_B", source, torch.float32 if quantized else w.dtype)
    kernel: tuple[int, ...] = ()
    if quantized:
        n_in, n_out = base.in_features, base.out_features
    elif type(base).__name__ == "Conv1D":
        n_in, n_out = w.shape[0], w.shape[1]
    elif isinstance(base, nn.Embedding):
        n_in, n_out = w.shape
    else:
        n_out, n_in, kernel = w.shape[0], w.shape[1], tuple(w.shape[2:])
    rows = A.shape[0] if A.ndim else 0
    shapes_ok = A.ndim >= 2 and B.ndim >= 2 and rows > 0 and A.shape[1] == n_in and B.shape[0] == n_out \
        and B.shape[1] == rows
    if kernel:  # convolutions: A (r, in, *kernel), B (out, r, 1, ...)
        shapes_ok = shapes_ok and tuple(A.shape) == (rows, n_in, *kernel) and tuple(B.shape) == (
            n_out, rows, *(1,) * len(kernel))
    elif shapes_ok:
        shapes_ok = A.ndim == 2 and B.ndim == 2
    if not shapes_ok:
        raise ShapeMismatchError(
            f"{source}: module {path!r} has weight shape {tuple(w.shape)} (in={n_in}, out={n_out}) here, but the "
            f"adapter's lora_A is {tuple(A.shape)} and lora_B is {tuple(B.shape)}; they need A (r, {n_in}) and "
            f"B ({n_out}, r) with r >= 1. The adapter belongs to another base model, or the file is damaged.")
    if rank is not None and rows != rank:
        raise AdapterFileError(
            f"{source}: module {path!r} has rank {rows} (rows of lora_A) but {CONFIG_NAME} gives it r={rank}; the "
            "config and the weights do not belong together. Re-save the adapter.")
    r = rows
    if mask is not None:
        k = sum(mask)
        if kernel or isinstance(base, nn.Embedding) or n_out % len(mask) or rows % k:
            raise AdapterFileError(f"{source}: slices {mask} do not fit module {path!r} (output {n_out}, lora_A "
                                   f"{tuple(A.shape)}); the metadata does not belong to these weights.")
        r = rows // k
        full_B = B
        B = _unslice_B(full_B, mask, r)
        if not torch.equal(_slice_to_full(B, mask, r, n_out), full_B):
            raise AdapterFileError(
                f"{source}: slices {mask} of module {path!r} would drop non-zero entries of lora_B (only the blocks "
                "of enabled slices may be non-zero); the metadata does not belong to these weights.")
        if rank is not None:  # the file's alpha' keeps the scale at rank k*r: alpha'/f(k*r) == alpha/f(r)
            alpha = alpha / (math.sqrt(k) if rslora else k)
    scale = scaling(alpha, r, rslora)
    bound = scale * rows * float(A.abs().max()) * float(B.abs().max())
    if not math.isfinite(scale) or (bound > _FLOAT32_MAX and not torch.isfinite(
            scale * (entry["B"].double().flatten(1) @ entry["A"].double().flatten(1))).all()):
        raise AdapterFileError(f"{source}: the update of module {path!r} (scale {scale:g} times B @ A) overflows; "
                               "the adapter is broken.")
    return _Module(A, B, r, float(alpha), mask)


_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def _checked_tensor(t: Tensor, what: str, source: str, dtype: torch.dtype) -> Tensor:
    """`t` if it is a finite floating-point tensor that stays finite in `dtype` (the model's)."""
    if t.dtype not in _FLOAT_DTYPES:
        raise AdapterFileError(f"{source}: {what} is {t.dtype}; adapter tensors must be floating point (float32, "
                               "float16, bfloat16 or float64). The file is damaged or not an adapter.")
    if not torch.isfinite(t).all():
        raise AdapterFileError(f"{source}: {what} holds NaN or inf; the adapter is broken (diverged training?).")
    if not torch.isfinite(t.to(dtype)).all():
        raise AdapterFileError(f"{source}: {what} holds values too large for this model's {dtype}.")
    return t


def _declared_parameters(model: nn.Module, modules: dict[str, _Module], bias: str,
                         modules_to_save: list[str] | None, source: str) -> set[str]:
    """Names of the model's parameters that an adapter with this config may carry besides A and B."""
    declared: set[str] = set()
    if modules_to_save:
        cfg = LoraConfig(targets=["_"], modules_to_save=modules_to_save)
        try:
            paths = saved_module_paths(model, cfg)
        except LoraError as exc:
            raise ShapeMismatchError(f"{source}: {exc} The adapter belongs to another architecture.") from None
        for mpath in paths:
            if mpath in modules or any(p.startswith(mpath + ".") for p in modules):
                raise AdapterFileError(f"{source}: module {mpath!r} is both adapted with LoRA and in modules_to_save; "
                                       "the config is inconsistent.")
            declared |= {f"{mpath}.{n}" for n, _ in model.get_submodule(mpath).named_parameters()
                         if ".adapters." not in f".{n}"}
    if bias == "all":
        declared |= {n for n, _ in model.named_parameters() if n.endswith("bias") and ".adapters." not in n}
    elif bias == "lora_only":
        declared |= {f"{path}.bias" for path in modules}
    return declared


def _check_extra(model: nn.Module, extra: dict[str, Tensor], source: str) -> None:
    """Biases and saved-module weights must name a parameter of the model, of its shape, finite."""
    params = dict(model.named_parameters())
    for key, t in extra.items():
        p = params.get(key)
        if p is None:
            raise ShapeMismatchError(f"{source} holds tensor {key!r}, which this {type(model).__name__} has no "
                                     "parameter for; the adapter belongs to another architecture.")
        if p.shape != t.shape:
            raise ShapeMismatchError(f"{source}: {key!r} has shape {tuple(t.shape)} in the adapter but "
                                     f"{tuple(p.shape)} here (e.g. another number of labels).")
        _checked_tensor(t, repr(key), source, p.dtype)


def _install(model: nn.Module, name: str, plan: _Plan) -> None:
    """Create adapter `name` on exactly the planned modules, copy the tensors in, and remember the base
    parameters it replaces. If anything fails, the model is put back as it was."""
    esc = {path: re.escape(path) for path in [*plan.modules, *plan.params]}
    every = {**plan.modules, **plan.params}
    first = next(iter(every.values()))
    cfg = LoraConfig(
        r=first.r, alpha=first.alpha, dropout=plan.dropout, init=plan.init, dora=plan.dora,
        targets="|".join(esc[p] for p in plan.modules) if plan.modules else [],
        target_parameters=list(plan.params) or None,
        rslora=plan.rslora, bias=plan.bias, rank_pattern={esc[p]: m.r for p, m in every.items()},
        alpha_pattern={esc[p]: m.alpha for p, m in every.items()},
        slices={esc[p]: m.slices for p, m in plan.modules.items() if m.slices},
        modules_to_save=plan.modules_to_save)
    params = dict(model.named_parameters())
    replaced = {key: params[key].detach().clone() for key in plan.extra}
    undo = _Undo(model)
    try:
        inject(model, cfg, name)
        with torch.no_grad():
            for path, m in plan.modules.items():
                a = model.get_submodule(path).adapters[name]
                a.lora_A.copy_(m.A.reshape(a.lora_A.shape))
                a.lora_B.copy_(m.B.reshape(a.lora_B.shape))
                if m.magnitude is not None:
                    a.lora_magnitude_vector.copy_(m.magnitude.reshape(a.lora_magnitude_vector.shape))
            for key, m in plan.params.items():
                a = experts.layer_of(model, key).adapters[name]
                a.lora_A.copy_(m.A)
                a.lora_B.copy_(m.B)
            for key, t in plan.extra.items():
                params[key].copy_(t)
    except BaseException as exc:
        undo(name, replaced)
        if isinstance(exc, LoraError) or not isinstance(exc, Exception):
            raise
        raise AdapterFileError(f"{plan.source} could not be installed ({type(exc).__name__}: {str(exc)[:200]}); "
                               "the model is unchanged.") from exc
    if replaced:
        model.__dict__.setdefault("_lorakit_replaced", {})[name] = replaced


class _Undo:
    """What a load changes on a model, taken before it: called, it puts the model back."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.wrapped = {path for path, _ in lora_layers(model)}
        self.owners = {path for path, m in model.named_modules() if isinstance(m, experts.LoraExperts)}
        self.layer_active = {path: list(layer.active) for path, layer in lora_layers(model)}
        self.state = {k: model.__dict__[k] for k in ("_lorakit_active", "_lorakit_configs") if k in model.__dict__}
        self.grads = [(p, p.requires_grad) for p in model.parameters()]

    def __call__(self, name: str, replaced: dict[str, Tensor]) -> None:
        model = self.model
        for path, layer in list(lora_layers(model)):
            if name in layer.adapters:
                del layer.adapters[name]
            if path in self.wrapped:
                layer.active = self.layer_active[path]
            elif isinstance(layer, experts.LoraParam):  # made by this load: drop it from its owner
                owner, _, pname = experts.parameter_path(path).rpartition(".")
                del model.get_submodule(owner)._modules[experts.CONTAINER][pname]
            else:  # wrapped by this load: give the module back its own place
                parent, _, child = path.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, layer.unwrap())
        for path, module in list(model.named_modules()):
            if isinstance(module, experts.LoraExperts) and path not in self.owners:
                parent, _, child = path.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, module.unwrap())
        configs(model).pop(name, None)
        for key in ("_lorakit_active", "_lorakit_configs"):
            model.__dict__.pop(key, None)
        model.__dict__.update(self.state)  # set_adapter replaced the active list, so this is the old one
        params = dict(model.named_parameters())
        with torch.no_grad():
            for key, value in replaced.items():
                params[key].copy_(value)
        for p, flag in self.grads:
            p.requires_grad_(flag)


def restore_replaced(model: nn.Module, name: str | None = None) -> None:
    """Put back the base parameters (saved modules, trained biases) that loading adapter `name` (default:
    every loaded adapter) replaced. Where a later-loaded adapter replaced the same parameter, it is left
    alone, and the value the later adapter will put back becomes the one from before `name`."""
    record = model.__dict__.get("_lorakit_replaced", {})
    order = list(record)
    names = order if name is None else [name] if name in record else []
    params = dict(model.named_parameters())
    for n in reversed(names):
        later = order[order.index(n) + 1:]
        for key, value in record.pop(n).items():
            heir = next((m for m in later if m in record and key in record[m]), None)
            if heir is not None:
                record[heir][key] = value
            elif key in params:
                with torch.no_grad():
                    params[key].copy_(value)
    if not record:
        model.__dict__.pop("_lorakit_replaced", None)


def _unslice_B(B_full: Tensor, mask: list[bool], r: int) -> Tensor:
    """(out, k*r) block matrix -> (k*out/n, r): the enabled slices' blocks stacked."""
    out_slice = B_full.shape[0] // len(mask)
    blocks = []
    for j, i in enumerate(i for i, on in enumerate(mask) if on):
        blocks.append(B_full[i * out_slice:(i + 1) * out_slice, j * r:(j + 1) * r])
    return torch.cat(blocks, 0)


# -- loralib ------------------------------------------------------------------------------------------
def _plan_loralib(model: nn.Module, file: Path, alpha: float | None, slices: list[bool] | None) -> _Plan:
    tensors = _torch_load_safely(file)
    pairs: dict[str, dict[str, Any]] = {}
    extra: dict[str, Tensor] = {}
    for key, t in tensors.items():
        m = re.fullmatch(r"(?P<path>.+)\.lora_(?P<kind>A|B)", key)
        if m:
            pairs.setdefault(m["path"], {"embedding": False})[m["kind"]] = t
        else:
            extra[key] = t
    if not pairs:
        raise AdapterFileError(f"{file} holds no loralib tensors (keys ending in .lora_A / .lora_B).")
    if alpha is None:
        raise ConfigError(f"{file} is a loralib checkpoint, which does not record lora_alpha. Pass it: "
                          "load_adapter(model, path, alpha=16) (the value used in training; scale = alpha / r).")
    modules = {}
    for path, entry in pairs.items():
        if "A" not in entry or "B" not in entry:
            raise AdapterFileError(f"{file}: {path} lacks lora_A or lora_B.")
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise ShapeMismatchError(f"{file} adapts module {path!r}, which this {type(model).__name__} does "
                                     "not have; load it into the model it was trained with.") from None
        base = module._base if isinstance(module, LoraLayer) else module
        A, B = entry["A"], entry["B"]
        mask = None
        if isinstance(base, nn.Embedding):  # loralib Embedding: A (r, num), B (dim, r), as PEFT's
            entry["embedding"] = True
        elif A.ndim == 2 and B.ndim == 2 and is_linear_like(base) and B.shape[1] > 0 and not (
                A.shape[0] == B.shape[1] and B.shape[0] == _out_features(base, module)):
            # loralib MergedLinear: A (k*r, in), B (k*out/n, r) for k of n fused projections
            r, n_out = B.shape[1], _out_features(base, module)
            k = A.shape[0] // r
            mask = slices or _infer_slices(k, n_out, B.shape[0])
            if mask is None or A.shape[0] % r or sum(mask) != k or n_out % len(mask) \
                    or B.shape[0] != k * (n_out // len(mask)):
                raise ShapeMismatchError(
                    f"{file}: {path} looks like a loralib MergedLinear (A {tuple(A.shape)}, B {tuple(B.shape)}, "
                    f"output {n_out}) but its enabled slices cannot be inferred or do not fit; pass "
                    "slices=[True, False, True] or the mask used in training.")
            _checked_tensor(B, f"{path} lora_B", str(file), module.weight.dtype)
            entry["B"] = _slice_to_full(B, mask, r, n_out)
        # loralib scales by alpha / r with r the rank of one slice
        modules[path] = _plan_module(model, path, entry, float(alpha), False, mask, str(file), rank=None)
    params = dict(model.named_parameters())
    extra = {k: v for k, v in extra.items() if k in params}
    for key in extra:
        owner, _, leaf = key.rpartition(".")
        if owner in modules and leaf != "bias":
            raise AdapterFileError(f"{file} holds {key!r}, the frozen base weight of a module it adapts with LoRA; "
                                   "a LoRA checkpoint never replaces that. The file is damaged or not a loralib "
                                   "checkpoint.")
    _check_extra(model, extra, str(file))
    saved = sorted({k.rsplit(".", 1)[0] for k in extra if not k.endswith("bias")}) or None
    return _Plan(str(file), modules, False, 0.0, "none", saved, extra)


def _out_features(base: nn.Module, module: nn.Module) -> int:
    return module.weight.shape[1] if type(base).__name__ == "Conv1D" else module.weight.shape[0]


def _infer_slices(k: int, n_out: int, b_rows: int) -> list[bool] | None:
    if k <= 0 or b_rows % k or not b_rows or n_out % (b_rows // k):
        return None
    n = n_out // (b_rows // k)
    if k == n:
        return [True] * n
    if (k, n) == (2, 3):
        return [True, False, True]  # loralib's GPT-2 examples: q and v of c_attn
    return None


def _slice_to_full(B: Tensor, mask: list[bool], r: int, n_out: int) -> Tensor:
    """Sliced B (k*out/n, r) -> PEFT-style full B (out, k*r) with zero blocks for the slices left out."""
    n, k = len(mask), sum(mask)
    out_slice = n_out // n
    full = B.new_zeros(n_out, k * r)
    for j, i in enumerate(i for i, on in enumerate(mask) if on):
        full[i * out_slice:(i + 1) * out_slice, j * r:(j + 1) * r] = B[j * out_slice:(j + 1) * out_slice]
    return full


__all__ = ["save_adapter", "load_adapter", "adapter_state_dict", "read_config", "read_weights",
           "check_fingerprint", "atomic_write", "restore_replaced", "LoraError", "infer_task_type", "model_card",
           "umask_mode", "TASK_TYPES"]


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
    if data.get("use_dora"):
        raise AdapterFileError(f"{directory} is a DoRA adapter (use_dora=true): its magnitudes make it more than the "
                               "factors A and B that this reader returns. Load it into a model with load_adapter.")
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
    dora = next((path for path, entry in pairs.items() if "M" in entry), None)
    if dora is not None:
        raise AdapterFileError(f"{weights} holds DoRA magnitudes (module {dora!r}): it is more than the factors A "
                               "and B that this reader returns. Load it into a model with load_adapter.")
    return data, pairs, extra, weights
