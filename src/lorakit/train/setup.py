"""Everything a run needs before its first step: checked settings and output folder, seeds, data, the
model with its adapters, the optimizer and schedule, a resumed checkpoint, and the stepper.

The order matters for reproducibility: the seeds are set before the model loads (the LoRA init draws
from them), and nothing between them and the first step draws random numbers that an uninterrupted
and a resumed run would draw differently.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import LengthGroupedBatchSampler, PadCollator, pack_examples, read_records, resolve_labels
from ..distributed import Context
from ..errors import ConfigError
from ..inject import count_parameters, inject
from ..io import atomic_write
from .checkpoints import (
    check_resume,
    keep_optimizer_mode,
    load_checkpoint,
    resume_batch,
    saved_run_config,
)
from .config import RunConfig, TrainConfig, lr_lambda, to_yaml, uses_bf16
from .evaluation import evaluate, fmt
from .rundir import MetricsLog, delete, plan_output_dir
from .splits import Split, model_task, read_split
from .steppers import EagerStepper, Stepper, graph_lengths, make_stepper


@dataclass
class Training:
    """A run ready for its first (or resumed) step: what `setup` builds and `fit` drives."""

    run_cfg: RunConfig
    ctx: Context
    log: Callable[[str], None]
    out: Path
    model: nn.Module
    """The plain model: evaluation and saving use it."""
    train_model: nn.Module
    """What the steps call: `model`, or its DistributedDataParallel wrapper."""
    tokenizer: Any
    train: Split
    evals: Split | None
    score_fn: Callable | None
    optimizer: torch.optim.Optimizer
    scheduler: Any
    sampler: LengthGroupedBatchSampler
    stepper: Stepper
    total_steps: int
    progress: dict[str, Any]
    """step, epoch, batch (of the epoch) and best eval so far: where training starts."""
    metrics: MetricsLog
    config_text: str
    """The run's run_config.yaml, kept with each checkpoint."""
    before: dict[str, float]
    trainable: int
    total: int

    @property
    def cfg(self) -> TrainConfig:
        return self.run_cfg.train


def setup(run_cfg: RunConfig, ctx: Context, log: Callable[[str], None]) -> Training:
    """Check the settings and the output folder, then build the run (see `Training`).

    Raises:
        LoraError subclasses for bad input (data columns, labels, model names, an output folder that
        holds another run or is a file, a checkpoint that is missing, damaged or of other settings).
    """
    from ..models import load_model, resolve_model_path

    cfg, data = run_cfg.train.validate(), run_cfg.data.validate()
    check_metric_for_best(cfg, data.task)
    if cfg.label_smoothing and data.task == "regression":
        raise ConfigError("--label-smoothing applies to class labels and tokens, not to regression targets; drop it "
                          "for --task regression.")
    out = Path(cfg.output_dir)
    earlier = plan_output_dir(out, cfg.resume, cfg.overwrite)  # (deleted once the run has started)
    config_text = to_yaml(run_cfg.to_dict())
    if cfg.resume:
        import yaml
        check_resume(saved_run_config(out), yaml.safe_load(config_text), out)
    if cfg.quantize is not None and ctx.strategy == "fsdp":
        raise ConfigError(f"--quantize {cfg.quantize} with --strategy fsdp: FSDP2 shards parameters, and bitsandbytes "
                          "keeps a quantized weight's scales outside the packed tensor, so its layers cannot be "
                          "sharded. Use --strategy ddp (each process holds the whole quantized base, a quarter of "
                          "its 16-bit size in 4 bits), or drop --quantize.")
    if cfg.cuda_graphs == "on" and ctx.distributed:
        raise ConfigError("--cuda-graphs runs in one process; pass --cuda-graphs off, or drop --nproc / torchrun.")
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)  # the same seed on every rank: the LoRA init must agree
    random.seed(cfg.seed)
    device = ctx.device
    resolve_model_path(cfg.model)  # an unknown model name fails here, before any data work

    train_records, eval_records, score_fn, label_names = _records(cfg, run_cfg.data)
    log(f"Loading {cfg.model} ...")
    t0 = time.time()
    # every rank loads at once: the converted-model cache serializes its builders with a file lock
    # LoRA in bf16 on one GPU: the frozen base is loaded in bfloat16 (half the memory, no casts of the
    # weights in each step) and the adapters train in float32 under autocast
    base_bf16 = not cfg.full and not ctx.distributed and device.type == "cuda" and uses_bf16(device, cfg.precision)
    # --quantize: bitsandbytes quantizes the linear layers onto their device as they load (they must not be
    # moved after); the bfloat16 dtype is then the compute dtype and that of the layers left unquantized
    model, tokenizer = load_model(cfg.model, task=model_task(data), num_labels=len(label_names or []) or None,
                                  dtype=torch.bfloat16 if base_bf16 else None, quantize=cfg.quantize,
                                  device=device if cfg.quantize is not None else None)
    if ctx.strategy != "fsdp" and cfg.quantize is None:  # FSDP moves each shard to the GPU itself
        model.to(device)
    log(f"  loaded in {time.time() - t0:.1f} s")

    train = read_split(cfg.train_file, train_records, tokenizer, data, label_names)
    log(f"Train data: {train.stats.describe()}")
    if data.packing:
        train.examples = pack_examples(train.examples, data.max_length)
        log(f"  packed into {len(train.examples)} rows of up to {data.max_length} tokens")
    evals = None
    if eval_records is not None or cfg.eval_file:
        evals = read_split(cfg.eval_file, eval_records, tokenizer, data, train.stats.label_names)
        log(f"Eval data: {evals.stats.describe()}")

    _adapt(model, run_cfg, base_bf16)
    trainable, total = count_parameters(model)
    log(f"Trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")
    prepare_for_speed(model, cfg, device, log)
    train_model = ctx.wrap(model, bf16=uses_bf16(device, cfg.precision))
    if ctx.distributed:
        log(f"Data-parallel: {ctx.world_size} processes, strategy {ctx.strategy}, "
            f"global batch {cfg.batch_size * ctx.world_size} ({cfg.batch_size} per process)")

    t_eval = time.time()
    before = evaluate(model, tokenizer, evals, run_cfg, device, score_fn) if evals else {}
    if before:
        log(f"Before training: {fmt(before)} ({time.time() - t_eval:.0f} s)")

    params = [p for p in model.parameters() if p.requires_grad]
    graphed, why = cfg.graphs_for(device, ctx.distributed)
    padded = graphed or cfg.cuda_graphs == "on"  # (on without CUDA: eager steps on the graphs' batches, for tests)
    eager_note = "; the steps run eagerly on batches padded as for the graphs." if padded and not graphed else "."
    log(f"CUDA graphs: {why}{eager_note}")
    # a captured step needs an optimizer whose step count lives on the GPU (capturable); fused is the fastest such AdamW
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  **({"capturable": True, "fused": True} if graphed else {}))
    lengths = [len(e["input_ids"]) for e in train.examples]
    sampler = LengthGroupedBatchSampler(lengths, cfg.batch_size, seed=cfg.seed, num_replicas=ctx.world_size,
                                        rank=ctx.rank)
    steps_per_epoch = max(1, sampler.num_batches // cfg.grad_accum)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    warmup = int(cfg.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.schedule, warmup, total_steps))
    collate = PadCollator(tokenizer.pad_token_id, pad_to_multiple_of=8 if device.type == "cuda" else None)

    if earlier:
        ctx.barrier()  # (every process has checked the folder before one deletes)
        if ctx.is_main:
            delete(earlier)
            log(f"--overwrite: deleted the earlier run's {', '.join(p.name for p in earlier)} in {out}")
    out.mkdir(parents=True, exist_ok=True)
    if ctx.is_main:
        atomic_write(out / "run_config.yaml", lambda f: Path(f).write_text(config_text))
    progress = {"step": 0, "epoch": 0, "batch": 0, "best": None}
    if cfg.resume:
        progress = load_checkpoint(out, model, optimizer, scheduler, ctx)
        keep_optimizer_mode(optimizer, capturable=graphed)
        progress["batch"] = resume_batch(progress, sampler, log)
        log(f"Resumed from step {progress['step']} (epoch {progress['epoch']}, batch {progress['batch']}).")
    metrics = MetricsLog(out / "metrics.jsonl", ctx.is_main, resume_step=progress["step"] if cfg.resume else None)

    eager = EagerStepper(train_model, optimizer, params, cfg, ctx, train.examples, collate, log)
    graph_sizes: list[int] = []
    if padded:
        sampler.set_epoch(0)
        batch_longest = [max(lengths[i] for i in b) for b in sampler if len(b) == cfg.batch_size]
        # a capture costs about as much as a few eager steps: at most one graph per 50 (micro-)steps of the run
        most = max(2, min(8, total_steps * cfg.grad_accum // 50))
        graph_sizes = graph_lengths(batch_longest, max(lengths), most)
        log(f"  batches padded to {len(graph_sizes)} lengths: {', '.join(map(str, graph_sizes))} tokens")
    stepper = make_stepper(cfg, eager, padded, graph_sizes, log)
    return Training(run_cfg, ctx, log, out, model, train_model, tokenizer, train, evals, score_fn, optimizer,
                    scheduler, sampler, stepper, total_steps, progress, metrics, config_text, before, trainable, total)


def check_metric_for_best(cfg: TrainConfig, task: str) -> None:
    """Refuse a metric_for_best that the evaluation of `task` never reports (before anything loads).

    Raises:
        ConfigError: naming the metrics the task reports.
    """
    from .evaluation import REPORTED
    if cfg.metric_for_best != "auto" and cfg.metric_for_best not in REPORTED[task]:
        raise ConfigError(f"--metric-for-best {cfg.metric_for_best}: the {task} evaluation reports "
                          f"{', '.join(REPORTED[task])}; pick one of them (or auto, the task's official metric).")
    if cfg.metric_for_best in ("exact_match", "score") and not cfg.eval_generate:
        raise ConfigError(f"--metric-for-best {cfg.metric_for_best} is a generation metric, but --eval-generate is "
                          "false: drop --eval-generate false, or pick loss or perplexity.")


def _records(cfg: TrainConfig, data) -> tuple[list[dict] | None, list[dict] | None, Callable | None, list | None]:
    """(train records, eval records, score function, label names) known before the model loads: the
    built-in task's records, and for classification the label set (the model's head size)."""
    train_records = eval_records = score_fn = label_names = None
    if cfg.train_file is None:
        from .. import tasks
        train_records, eval_records = tasks.builtin_task(int(tasks.DEFAULT_HPARAMS["n_train"]),
                                                         int(tasks.DEFAULT_HPARAMS["n_eval"]), seed=cfg.seed)
        score_fn = tasks.score
        if data.task != "sft":
            raise ConfigError("The built-in task is sft (prompt -> completion); pass --train-file for "
                              f"task {data.task!r}.")
    if data.task == "classification":
        if cfg.train_file is None:
            raise ConfigError("Classification needs --train-file (a CSV/TSV/JSONL/GLUE file with a label column).")
        train_records = read_records(cfg.train_file, data)
        missing = [i for i, r in enumerate(train_records) if data.label_column not in r]
        if missing:
            raise ConfigError(f"Record {missing[0]} of {cfg.train_file} has no column {data.label_column!r}; "
                              f"columns: {sorted(train_records[missing[0]])}. Pass --label-column.")
        _, label_names = resolve_labels([r[data.label_column] for r in train_records], data.labels,
                                        source=cfg.train_file, column=data.label_column)
    return train_records, eval_records, score_fn, label_names


def _adapt(model: nn.Module, run_cfg: RunConfig, base_bf16: bool) -> None:
    """Make what trains trainable: every weight (--full), or LoRA adapters (in float32 over a bfloat16
    base) plus a new classification head; then gradient checkpointing if asked for."""
    cfg = run_cfg.train
    if cfg.full:
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        lora = run_cfg.lora
        heads = _head_paths(model) if run_cfg.data.task in ("classification", "regression") else []
        if heads and not lora.modules_to_save:
            lora = dataclasses.replace(lora, modules_to_save=heads)
        inject(model, lora)
        if base_bf16:  # (the quantized weights are integer storage and frozen: never cast)
            for p in model.parameters():
                if p.requires_grad and p.is_floating_point():
                    p.data = p.data.float()
    if cfg.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads") and not cfg.full:
            model.enable_input_require_grads()


def _head_paths(model: nn.Module) -> list[str]:
    """Newly initialized classification heads that must train and be saved with the adapter."""
    return [n for n in ("classifier", "score") if isinstance(getattr(model, n, None), nn.Module)]


def prepare_for_speed(model: nn.Module, cfg: TrainConfig, device: torch.device, log: Callable[[str], None]) -> None:
    """The one place where the adapted model is prepared for speed, after its adapters and before it is
    wrapped for several processes or its steps are captured: cross-module fusion (an explicit call that
    returns a handle reporting what it changed) belongs here, with its report logged.

    `lk.fuse` runs where the fast path computes (on CUDA by default, see `lk.set_fast_path`): there sibling
    linears share one call and LoRA inputs are rebuilt in backward instead of kept.
    """
    from .. import fast
    from ..layers import LoraLinear

    if not any(isinstance(m, LoraLinear) for m in model.modules()):
        return  # full fine-tuning, or adapters on no linear layer: nothing to fuse
    if not fast.enabled_for(torch.empty(0, device=device)):
        log(f"Fusion across modules: off (the fast path is {fast.fast_path_mode()!r} "
            f"and does not run on {device.type}).")
        return
    log(f"Fusion across modules: {fast.fuse(model)}")
