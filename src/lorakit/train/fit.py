"""The training loop: `fit` runs the optimizer steps of a run that `setup` built, `finish` evaluates and
saves what it trained."""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import LoraError
from . import checkpoints
from .evaluation import evaluate, fmt, track_best
from .rundir import dir_size
from .setup import Training


def fit(t: Training) -> dict[str, Any]:
    """Train from `t.progress` to `t.total_steps`: each optimizer step runs its micro-batches through
    `t.stepper`, then logs, evaluates (every eval_every steps) and checkpoints (every save_every steps).
    Returns {"steps", "train_seconds"}.

    Raises:
        NonFiniteLoss: the loss became NaN or inf (the last checkpoint is kept).
    """
    from tqdm.auto import tqdm

    cfg, ctx, progress = t.cfg, t.ctx, t.progress
    t.model.train()
    step, epoch, batch_pos = progress["step"], progress["epoch"], progress["batch"]
    bar = tqdm(total=t.total_steps, initial=step, desc="train", unit="step", dynamic_ncols=True,
               disable=not ctx.is_main)
    if ctx.is_main:
        t.stepper.log = bar.write  # (lines printed under the progress bar, not into it)
    tokens_seen, t_start, window_loss, window_n = 0, time.time(), 0.0, 0
    try:
        while step < t.total_steps:
            for micro in optimizer_steps(t.sampler, epoch, batch_pos, cfg.grad_accum):
                loss, tokens = t.stepper.backward(micro)
                loss_sum, tokens = ctx.step_stats(float(loss), tokens)  # (the host waits for the device here only)
                tokens_seen += tokens
                if not math.isfinite(loss_sum):
                    raise NonFiniteLoss(step + 1, loss_sum, t.out)
                t.stepper.update()
                t.scheduler.step()
                step += 1
                batch_pos += len(micro)

                window_loss, window_n = window_loss + loss_sum, window_n + 1
                rate = tokens_seen / max(time.time() - t_start, 1e-9)
                lr = float(t.scheduler.get_last_lr()[0])  # a tensor once a graph is captured
                bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{lr:.2e}", tok_s=f"{rate:.0f}")
                bar.update(1)
                if step % cfg.log_every == 0 or step == t.total_steps:
                    t.metrics.write({"event": "train", "step": step, "loss": window_loss / window_n,
                                     "lr": lr, "tokens_per_s": rate, "seconds": round(time.time() - t_start, 4)})
                    window_loss, window_n = 0.0, 0
                if t.evals and cfg.eval_every and step % cfg.eval_every == 0 and step < t.total_steps:
                    result = evaluate(t.model, t.tokenizer, t.evals, t.run_cfg, ctx.device, t.score_fn)
                    t.model.train()
                    t.metrics.write({"event": "eval", "step": step, **result})
                    if ctx.is_main:
                        bar.write(f"step {step}: {fmt(result)}")
                    progress["best"] = track_best(t.model, t.out, result, progress["best"], step, cfg.full, ctx,
                                                   t.run_cfg)
                if cfg.save_every and step % cfg.save_every == 0:
                    checkpoints.save_checkpoint(
                        t.out, t.model, t.optimizer, t.scheduler,
                        {"step": step, "epoch": epoch, "batch": batch_pos, "best": progress["best"],
                         "global_batch": t.sampler.global_batch_size, "world_size": ctx.world_size},
                        ctx, config_text=t.config_text)
                if step == t.total_steps:
                    break
            else:  # the epoch is over
                epoch, batch_pos = epoch + 1, 0
    finally:
        bar.close()
    return {"steps": step, "train_seconds": time.time() - t_start}


def optimizer_steps(sampler, epoch: int, skip: int, grad_accum: int) -> Iterator[list[list[int]]]:
    """The optimizer steps left in `epoch` after its first `skip` batches: groups of `grad_accum` batches
    (lists of example indices); an incomplete last group is dropped."""
    sampler.set_epoch(epoch, skip=skip)
    batches = iter(sampler)
    while len(micro := list(itertools.islice(batches, grad_accum))) == grad_accum:
        yield micro


def finish(t: Training, fitted: dict[str, Any]) -> dict[str, Any]:
    """Evaluate after training, keep the best adapter, save the final adapter (or model) and the summary;
    returns the summary."""
    from ..models import resolve_model_path

    cfg, ctx, step = t.cfg, t.ctx, fitted["steps"]
    after = evaluate(t.model, t.tokenizer, t.evals, t.run_cfg, ctx.device, t.score_fn) if t.evals else {}
    if after:
        t.metrics.write({"event": "eval", "step": step, "final": True, **after})
        track_best(t.model, t.out, after, t.progress["best"], step, cfg.full, ctx, t.run_cfg)
    final_dir = t.out / ("model" if cfg.full else "adapter")
    if cfg.full:
        ctx.save_pretrained(t.model, t.tokenizer, final_dir)
    else:
        ctx.save_adapter(t.model, final_dir)
    base_dir = resolve_model_path(cfg.model)
    data = t.run_cfg.data
    summary = {
        "before": t.before, "after": after, "steps": step, "train_seconds": fitted["train_seconds"],
        "trainable_parameters": t.trainable, "total_parameters": t.total,
        "adapter_dir": str(final_dir), "adapter_bytes": dir_size(final_dir),
        "base_bytes": dir_size(base_dir) if isinstance(base_dir, Path) else None,
        **(example_prompt(t.evals or t.train, data) if data.task == "sft" else {}),
        "world_size": ctx.world_size, "strategy": ctx.strategy,
    }
    if ctx.is_main:
        (t.out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def example_prompt(split, data) -> dict[str, Any]:
    """The first record's prompt, for the summary's `lorakit generate` hint: {"example_prompt": prompt + separator}
    for prompt/completion data, {"example_messages": the turns before the last assistant turn} for conversations,
    or {} when neither is there."""
    rec = split.records[0] if split.records else {}
    messages = rec.get(data.messages_column)
    if isinstance(messages, list):
        last = max((k for k, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "assistant"),
                   default=len(messages))
        return {"example_messages": messages[:last]}
    if isinstance(rec.get(data.prompt_column), str):
        return {"example_prompt": rec[data.prompt_column] + data.separator}
    return {}


class NonFiniteLoss(LoraError):
    """The loss became NaN or inf; training stopped and the last good checkpoint was kept."""

    def __init__(self, step: int, value: float, out: Path) -> None:
        super().__init__(
            f"The loss became {value} at step {step}; training stopped. The last good checkpoint in "
            f"{out / 'checkpoint'} (if any) is untouched. Lower --lr, enable clipping (--max-grad-norm 1.0), "
            "or check the data for empty or broken examples, then continue with --resume.")
