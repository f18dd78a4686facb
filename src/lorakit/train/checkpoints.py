"""Checkpoints of a run: write them atomically, check them on --resume, restore them exactly.

output_dir/checkpoint/ holds
    trainable.safetensors   the trainable parameters by name (full tensors, any world size)
    state.pt                optimizer, scheduler and RNG states (tensors and plain data only)
    progress.json           step, epoch, batch of the epoch, best eval so far, global batch, world size
    run_config.yaml         the settings of the run that wrote it

A resumed run continues with the settings the run started with: `check_resume` refuses settings
that would change what it computes (learning rate, rank, targets, model, data ...) and names them.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn

from ..distributed import Context
from ..errors import ConfigError, DiskFullError, LoraError
from ..io import fsync_directory

#: settings a resumed run may change: how long it runs, how often it logs, evaluates and saves, and how it
#: computes (processes, graphs, precision); every other setting must be the one the run started with
RESUMABLE = frozenset({
    "output_dir", "resume", "overwrite", "max_steps", "epochs", "eval_every", "save_every", "log_every",
    "threads", "strategy", "cuda_graphs", "precision", "gradient_checkpointing", "batch_size", "eval_file",
    "max_eval_examples", "max_new_tokens", "eval_generate"})
FILES = ("trainable.safetensors", "state.pt", "progress.json")


class CheckpointError(LoraError):
    """A checkpoint that is missing, damaged, or written by a run with other settings."""


def disk_full(exc: BaseException | None) -> bool:
    """Whether `exc` (or an exception it was raised from) says the disk or the quota is full."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(exc) or "os error 28" in str(exc):  # (safetensors' Rust I/O errors)
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def disk_full_error(path: Path | str, what: str, exc: BaseException | None = None) -> DiskFullError:
    """The error for a write of `what` into `path` that failed on a full disk (`exc`: the failure, whose file
    is named if it has one)."""
    while exc is not None and not getattr(exc, "filename", None):
        exc = exc.__cause__ or exc.__context__
    where = exc.filename if exc is not None else path
    return DiskFullError(
        f"No space left on device: writing {what} to {where} failed. Free space on that disk (or pass --output-dir "
        "on another one); the files written before are untouched, and --resume continues from the last "
        "checkpoint if the run wrote one.")


# -- write ---------------------------------------------------------------------------------------------
class _Sink:
    """The file torch.save writes through, keeping the OSError of a failed write: torch.save itself
    reports only "[enforce fail at inline_container.cc] unexpected pos"."""

    def __init__(self, file: BinaryIO) -> None:
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.file.flush()


def _torch_save(obj: Any, file: BinaryIO) -> None:
    sink = _Sink(file)
    try:
        torch.save(obj, sink)
    except RuntimeError:
        if sink.error is not None:
            raise sink.error from None
        raise


def _write(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """write(f) into a new file at `path`, then flush it to the disk."""
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(out: Path, model: nn.Module, optimizer, scheduler, state: dict[str, Any],
                    ctx: Context | None = None, config_text: str | None = None) -> None:
    """Write output_dir/checkpoint atomically: build it beside, then swap directories.

    With several processes every rank calls it: the weights and the optimizer state are gathered
    in full, rank 0 writes the single-process format (so any world size can resume it), and all
    ranks wait for it (and stop with it if it fails). `config_text` (the run's run_config.yaml) is kept with it.

    Raises:
        DiskFullError: the disk is full; the previous checkpoint is untouched.
        CheckpointError: another failed write; the previous checkpoint is untouched.
    """
    ctx = ctx or Context()
    weights = ctx.trainable_state(model)
    optim_state = ctx.optimizer_state(model, optimizer)
    error = None
    if ctx.is_main:
        try:
            _write_checkpoint(out, weights, optim_state, scheduler, state, ctx, config_text)
        except Exception as exc:
            error = exc
    if not ctx.all_ok(error is None):  # (the other ranks stop with rank 0 rather than wait for it)
        raise error or CheckpointError(f"Rank 0 could not write the checkpoint to {out / 'checkpoint'}; its error "
                                       "says why.")


def _write_checkpoint(out: Path, weights, optim_state, scheduler, state, ctx: Context, config_text) -> None:
    from safetensors.torch import save as safetensors_bytes

    tmp, old, final = out / ".checkpoint-tmp", out / ".checkpoint-old", out / "checkpoint"
    rng = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
           "python_version": random.getstate()[0], "python_gauss": random.getstate()[2]}
    if torch.cuda.is_available():
        # one rank owns one GPU: its generator stands where a single process keeps device 0's
        rng["cuda"] = [torch.cuda.get_rng_state()] if ctx.distributed else torch.cuda.get_rng_state_all()
    # a learning rate held as a tensor (by a captured step) is saved as a number: any run can resume it
    optim_state = {**optim_state, "param_groups": [{**g, "lr": float(g["lr"])} for g in optim_state["param_groups"]]}
    sched_state = {k: [float(x) for x in v] if k == "_last_lr" else v for k, v in scheduler.state_dict().items()}
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        _write(tmp / "trainable.safetensors", lambda f: f.write(safetensors_bytes(weights)))
        _write(tmp / "state.pt", lambda f: _torch_save({"optimizer": optim_state, "scheduler": sched_state,
                                                        "rng": rng}, f))
        _write(tmp / "progress.json", lambda f: f.write(json.dumps(state, indent=2).encode()))
        if config_text is not None:
            _write(tmp / "run_config.yaml", lambda f: f.write(config_text.encode()))
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if disk_full(exc):
            raise disk_full_error(final, "the checkpoint") from exc
        raise CheckpointError(f"Could not write the checkpoint to {final}: {exc}. The previous checkpoint is "
                              "untouched; check the disk and the permissions of --output-dir.") from exc
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    fsync_directory(out)


# -- read and check ------------------------------------------------------------------------------------
def find_checkpoint(out: Path) -> Path:
    """The checkpoint directory of the run in `out`.

    Raises:
        CheckpointError: `out` holds no checkpoint.
    """
    for ckpt in (out / "checkpoint", out / ".checkpoint-old"):  # (-old: a crash between save_checkpoint's renames)
        if (ckpt / "progress.json").is_file():
            return ckpt
    if (out / "checkpoint").is_dir():
        return out / "checkpoint"  # incomplete: load_checkpoint names what is missing
    raise CheckpointError(
        f"--resume: no checkpoint in {out} (expected {out / 'checkpoint'}). The run stopped before its first "
        "checkpoint (--save-every N writes them), or this is not its folder: start afresh with --overwrite, or "
        "point --output-dir at the run to continue.")


def saved_run_config(out: Path) -> dict[str, Any] | None:
    """The settings of the run that wrote the checkpoint in `out` (its run_config.yaml), or None if unknown.

    Raises:
        CheckpointError: no checkpoint, or a run_config.yaml that is not valid YAML.
    """
    import yaml

    ckpt = find_checkpoint(out)
    # checkpoints of earlier versions have no copy: the run's own file still holds its settings
    for path in (ckpt / "run_config.yaml", out / "run_config.yaml"):
        if path.is_file():
            try:
                data = yaml.safe_load(path.read_text())
            except (yaml.YAMLError, UnicodeDecodeError) as exc:
                raise CheckpointError(f"{path} is damaged ({exc}); resume needs the settings the run started "
                                      "with. Start afresh with --overwrite.") from exc
            return data if isinstance(data, dict) else None
    return None


def check_resume(saved: dict[str, Any] | None, current: dict[str, Any], out: Path) -> None:
    """Refuse to resume with settings that differ from the checkpoint's, other than RESUMABLE ones.

    `saved` and `current` are RunConfig.to_dict() views, both as YAML reads them back.

    Raises:
        ConfigError: naming each differing setting with its saved and its new value.
    """
    if not saved:
        return
    changed = []
    for section, values in current.items():
        before = saved.get(section)
        if not isinstance(before, dict):
            continue
        for name, value in values.items():
            if name in RESUMABLE or name not in before or before[name] == value:
                continue
            changed.append(f"--{name.replace('_', '-')} {before[name]!r} -> {value!r}")
    if changed:
        raise ConfigError(
            f"--resume continues the run in {out} with the settings it started with, but these differ from its "
            f"checkpoint's run_config.yaml: {'; '.join(changed)}. Drop them (or set them back) to continue the run, "
            "or start a new one with --overwrite or a new --output-dir.")


def _damaged(ckpt: Path, name: str, exc: BaseException) -> CheckpointError:
    return CheckpointError(
        f"The checkpoint file {ckpt / name} is damaged ({type(exc).__name__}: {str(exc)[:200]}). It cannot be "
        "resumed: start afresh with --overwrite (or a new --output-dir).")


def _read(ckpt: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(weights, state, progress) of a checkpoint, each checked for its form."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    missing = [name for name in FILES if not (ckpt / name).is_file()]
    if missing:
        raise CheckpointError(
            f"The checkpoint in {ckpt} is incomplete: {', '.join(missing)} missing. It cannot be resumed: "
            "start afresh with --overwrite (or a new --output-dir).")
    try:
        weights = load_file(str(ckpt / "trainable.safetensors"))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise _damaged(ckpt, "trainable.safetensors", exc) from exc
    try:
        state = torch.load(str(ckpt / "state.pt"), map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or not {"optimizer", "scheduler", "rng"} <= set(state):
            raise ValueError("expected the optimizer, scheduler and rng states")
    except Exception as exc:  # (a truncated or foreign file: zip, unpickling and type errors of any kind)
        raise _damaged(ckpt, "state.pt", exc) from exc
    try:
        progress = json.loads((ckpt / "progress.json").read_text())
        for key in ("step", "epoch", "batch"):
            if not isinstance(progress[key], int) or progress[key] < 0:
                raise ValueError(f"{key} must be a non-negative integer, got {progress[key]!r}")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise _damaged(ckpt, "progress.json", exc) from exc
    return weights, state, progress


def _check_weights(ckpt: Path, model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    extra = [n for n in weights if n not in params]
    absent = [n for n in params if n not in weights]
    shapes = [n for n in weights if n in params and tuple(weights[n].shape) != tuple(params[n].shape)]
    if extra or absent or shapes:
        if shapes:
            n = shapes[0]
            detail = f"{n} is {tuple(weights[n].shape)} in the checkpoint, {tuple(params[n].shape)} here"
        elif extra:
            detail = f"{extra[0]} is in the checkpoint but does not train here"
        else:
            detail = f"{absent[0]} trains here but is not in the checkpoint"
        raise CheckpointError(
            f"The checkpoint in {ckpt} does not match this model and its LoRA settings ({detail}; "
            f"{len(extra) + len(absent) + len(shapes)} parameters differ). Resume with the settings the run started "
            "with (its run_config.yaml: --model, --r, --targets, ...), or start afresh with --overwrite.")


def load_checkpoint(out: Path, model: nn.Module, optimizer, scheduler, ctx: Context | None = None) -> dict[str, Any]:
    """Restore what save_checkpoint wrote; returns the progress dict (step, epoch, batch, best).

    Every rank reads the files (a shared file system when nodes differ) and loads the full
    tensors into its own part of the model and optimizer, whatever the world size that wrote them.
    Every file is read and checked against the model before anything is loaded into it.

    Raises:
        CheckpointError: no checkpoint; a missing, truncated or damaged file; parameters that differ
            from the model's trainable ones (another model, rank or targets).
    """
    ctx = ctx or Context()
    ckpt = find_checkpoint(out)
    weights, state, progress = _read(ckpt)
    _check_weights(ckpt, model, weights)
    try:
        ctx.load_trainable(model, weights)
        ctx.load_optimizer(model, optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate((rng["python_version"], tuple(rng["python"]), rng["python_gauss"]))
        if "cuda" in rng and torch.cuda.is_available():
            if ctx.distributed:
                torch.cuda.set_rng_state(rng["cuda"][0])
            else:
                torch.cuda.set_rng_state_all(rng["cuda"])
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as exc:
        raise CheckpointError(
            f"The optimizer, scheduler or RNG state in {ckpt / 'state.pt'} does not fit this run "
            f"({type(exc).__name__}: {str(exc)[:200]}). Resume with the settings the run started with, or start "
            "afresh with --overwrite.") from exc
    return progress


def keep_optimizer_mode(optimizer, capturable: bool) -> None:
    """After `load_state_dict`: this run's capturable / fused flags (a checkpoint brings those of the
    run that wrote it), and each step count where they want it (the GPU when capturable)."""
    for g in optimizer.param_groups:
        # (save_checkpoint stores lr as a number)
        g["capturable"], g["fused"] = capturable, (True if capturable else None)
    for p, st in optimizer.state.items():
        if isinstance(st.get("step"), torch.Tensor):
            st["step"] = st["step"].to(device=p.device if capturable else "cpu", dtype=torch.float32)


def resume_batch(progress: dict[str, Any], sampler, log) -> int:
    """The batch of the checkpoint's epoch to continue from.

    The position is saved as global batches of `global_batch` examples (batch_size x world size
    of the run that wrote it). The same global batch size continues with exactly the batches an
    uninterrupted run would see, whatever the number of processes: 2 processes x batch 4 resume
    as 1 process x batch 8. Another global batch size regroups the epoch (the batches depend on
    it), so the run continues at the same fraction of the epoch in the new order: the rest of
    that epoch may repeat some examples and miss others; later epochs are complete.
    """
    saved = int(progress.get("global_batch", sampler.global_batch_size))
    batch = int(progress["batch"])
    if saved == sampler.global_batch_size:
        return batch
    moved = min(sampler.num_batches, batch * saved // sampler.global_batch_size)
    log(f"Note: the checkpoint was written with a global batch of {saved} examples, this run has "
        f"{sampler.global_batch_size} (batch size x processes); continuing at batch {moved} of the epoch in the new "
        f"batch order. For the exact data order, keep batch size x processes = {saved}.")
    return moved
