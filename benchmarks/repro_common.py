"""What the reproduction scripts share: how a model is adapted, and the one training loop.

`fit` is the loop of `lorakit train` (lorakit.train.run) without its files and checkpoints:
the same seeding order, length-grouped batches, AdamW, warmup + linear decay, bf16 autocast on
a GPU and gradient clipping. Full fine-tuning, lorakit LoRA and PEFT LoRA go through it
unchanged; only `adapt` differs between them.
"""

from __future__ import annotations

import math
import platform
import random
import time
from pathlib import Path

import torch

from lorakit import LoraConfig, count_parameters, inject, save_adapter
from lorakit.data import LengthGroupedBatchSampler, PadCollator
from lorakit.train import autocast, dir_size, lr_lambda

METHODS = ("full", "lorakit", "peft")


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)


def adapt(model, method: str, r: int = 8, alpha: float = 16, targets=("query", "value"), heads=(),
          dropout: float = 0.0, rslora: bool = False):
    """Make `model` trainable the way `method` says; returns a function that saves what trained.

    full: every weight trains. lorakit: lk.inject (heads train and are saved with the adapter, as
    `lorakit train` does for classification). peft: peft.get_peft_model with the same r, alpha,
    targets, dropout 0 and heads (modules_to_save).
    """
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return lambda path: model.save_pretrained(path)
    if method == "lorakit":
        inject(model, LoraConfig(r=r, alpha=alpha, dropout=dropout, rslora=rslora,
                                 targets=targets if isinstance(targets, str) else list(targets),
                                 modules_to_save=list(heads) or None))
        return lambda path: save_adapter(model, path)
    if method == "peft":
        import peft
        cfg = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets),
                              modules_to_save=list(heads) or None, bias="none")
        wrapped = peft.get_peft_model(model, cfg)  # swaps layers inside `model` in place
        return lambda path: wrapped.save_pretrained(path)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def fit(model, examples: list[dict], pad_id: int, *, lr: float, epochs: float, batch_size: int, seed: int,
        warmup_ratio: float = 0.06, max_grad_norm: float = 1.0, on_epoch=None, weight_decay: float = 0.0,
        label_smoothing: float = 0.0, warmup_steps: int | None = None) -> dict:
    """Train in place; `on_epoch(epoch)` runs after each full epoch (e.g. a dev evaluation, not timed).
    `warmup_steps` (when given) replaces `warmup_ratio`; the loss is `lorakit train`'s, label smoothing included."""
    from lorakit.train.steppers import training_loss

    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sampler = LengthGroupedBatchSampler([len(e["input_ids"]) for e in examples], batch_size, seed=seed)
    total = max(1, math.ceil(epochs * sampler.num_batches))
    warmup = int(warmup_ratio * total) if warmup_steps is None else min(warmup_steps, total - 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda("linear", warmup, total))
    collate = PadCollator(pad_id, pad_to_multiple_of=8 if device.type == "cuda" else None)
    model.train()
    step, epoch, losses, eval_seconds = 0, 0, [], 0.0
    start = time.perf_counter()
    while step < total:
        sampler.set_epoch(epoch)
        for idx in sampler:
            batch = {k: v.to(device, non_blocking=True) for k, v in collate([examples[i] for i in idx]).items()}
            with autocast(device, "auto"):
                loss = training_loss(model, batch, label_smoothing)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % 50 == 0 or step == total:
                losses.append((step, loss.item()))
            if step == total:
                break
        epoch += 1
        if on_epoch is not None and step % sampler.num_batches == 0:
            t = time.perf_counter()
            on_epoch(epoch)
            eval_seconds += time.perf_counter() - t
            model.train()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start - eval_seconds
    return {"steps": step, "epochs": step / sampler.num_batches, "train_seconds": seconds,
            "eval_seconds": eval_seconds, "loss_curve": losses}


def sizes(model, save, path: Path) -> dict:
    """Trainable / total parameters and the bytes of what `save` writes (the adapter or the model)."""
    trainable, total = count_parameters(model)
    save(str(path))
    return {"trainable_parameters": trainable, "total_parameters": total, "saved_bytes": dir_size(path)}


def environment() -> dict:
    import transformers
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "device": "cpu"}
    try:
        import peft
        info["peft"] = peft.__version__
    except ImportError:
        info["peft"] = None
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
    return info
