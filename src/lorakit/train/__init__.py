"""The training loop behind `lorakit train`: LoRA (or full) fine-tuning with eval, checkpoints and resume.

A run is described by three dataclasses, `TrainConfig` (this file), `DataConfig`
(lorakit.data) and `LoraConfig`; the CLI flags, a YAML file and the `run_config.yaml` saved
with every run are views of them. `run(cfg)` does the whole job and returns a summary dict.

Layout of an output directory:
    run_config.yaml      the resolved configuration
    metrics.jsonl        one JSON object per log / eval event
    checkpoint/          the last checkpoint (trainable weights, optimizer, scheduler, RNG, data position)
    best/                the adapter with the best eval metric so far
    adapter/             the final adapter (PEFT format)

On several processes (`torchrun --nproc-per-node N -m lorakit train`, or `lorakit train --nproc N`)
the same loop runs data-parallel with `strategy` ddp or fsdp; `lorakit.distributed` holds the
machinery and documents what stays the same (files, data order, evaluation, RNG).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..inject import count_parameters, inject
from ..config import LoraConfig
from ..distributed import STRATEGIES, Context
from ..data import (DataConfig, LengthGroupedBatchSampler, PadCollator, build_examples, load_records,
                   resolve_labels)
from ..errors import ConfigError, GraphError, LoraError
from ..io import atomic_write
from .checkpoints import (CheckpointError, check_resume, disk_full, disk_full_error, keep_optimizer_mode,
                          load_checkpoint, resume_batch, save_checkpoint, saved_run_config)
from .rundir import MetricsLog, check_output_dir, delete, dir_size, plan_output_dir

_resume_batch = resume_batch  # (the name tests and benchmarks know)

SCHEDULES = ("linear", "cosine", "constant")
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class TrainConfig:
    """How to train. Every field is a `lorakit train` flag (`--field-name`)."""

    model: str = "smollm2-135m"
    """A bundled model name (smollm2-135m, minilm-l6), a local Hugging Face model directory, or a hub id."""
    train_file: str | None = None
    """Training data (JSONL, CSV/TSV, GLUE TSV, E2E CSV, .txt). None: the built-in demo task."""
    eval_file: str | None = None
    """Held-out data in the same format. None: the built-in task's held-out split, else no eval."""
    output_dir: str = "runs/lorakit"
    """Where the run writes its config, metrics, checkpoints and the final adapter."""
    full: bool = False
    """Full fine-tuning (every weight trains, no LoRA), for comparison."""
    lr: float = 2e-4
    weight_decay: float = 0.0
    schedule: str = "linear"
    """Learning-rate decay after warmup: linear, cosine or constant."""
    warmup_ratio: float = 0.05
    """Fraction of the steps spent warming the learning rate up from 0."""
    epochs: float = 1.0
    max_steps: int = 0
    """Optimizer steps to run; 0 means `epochs` passes over the data."""
    batch_size: int = 8
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    max_grad_norm: float = 1.0
    """Gradient clipping threshold; 0 disables clipping."""
    eval_every: int = 0
    """Evaluate every N optimizer steps (0: only before and after training)."""
    save_every: int = 0
    """Write a checkpoint every N optimizer steps (0: no intermediate checkpoints)."""
    log_every: int = 10
    seed: int = 0
    precision: str = "auto"
    """auto (bf16 on a GPU that has it, else fp32), fp32 or bf16. bf16 is autocast; LoRA on one GPU also loads the frozen base in bfloat16 (the adapters train in float32)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward: less memory, ~30% more compute."""
    max_eval_examples: int = 200
    """Cap on held-out examples per evaluation (0: all)."""
    max_new_tokens: int = 48
    """sft: tokens generated per example when the eval generates."""
    eval_generate: bool = True
    """sft: evaluate by generating completions (exact match / BLEU...) besides the loss."""
    threads: int = 0
    """CPU threads for PyTorch (0: its default). On a busy machine 1 can be much faster than 2."""
    resume: bool = False
    """Continue from output_dir/checkpoint (optimizer, scheduler, RNG and data position restored), with the settings the run started with."""
    overwrite: bool = False
    """Start afresh in an output_dir that holds an earlier run: its run files (adapter/, best/, checkpoint/, metrics.jsonl, run_config.yaml, summary.json) are deleted first."""
    strategy: str = "auto"
    """Several processes (torchrun, --nproc): ddp (a model that fits one GPU), fsdp (FSDP2 shards base and adapters), auto (ddp)."""
    cuda_graphs: str = field(default="auto", metadata={"const": "on"})
    """auto, on or off: capture the training step as a CUDA graph and replay it (no per-op host work per step; batches padded to a few lengths, one graph each; with grad_accum, one graph per micro-batch length and one for the optimizer step). auto: on for LoRA on one GPU (gradient checkpointing included), with eager steps if the step cannot be captured."""

    def validate(self) -> "TrainConfig":
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}.")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, got {self.precision!r}.")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}.")
        for name in ("batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if not self.lr > 0:
            raise ConfigError(f"lr must be positive, got {self.lr}.")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}.")
        mode = self.cuda_graphs
        mode = ("on" if mode else "off") if isinstance(mode, bool) else _SWITCH.get(str(mode).lower(), str(mode).lower())
        if mode not in ("auto", "on", "off"):
            raise ConfigError(f"cuda_graphs must be auto, on or off, got {self.cuda_graphs!r}.")
        self.cuda_graphs = mode
        return self

    def graphs_for(self, device: torch.device, distributed: bool) -> tuple[bool, str]:
        """(whether the steps are captured as CUDA graphs, why) for this run on `device`."""
        if self.cuda_graphs == "off":
            return False, "off (--cuda-graphs off)"
        if self.cuda_graphs == "on":
            return device.type == "cuda", "on" if device.type == "cuda" else "asked for, but there is no CUDA device"
        why = "no CUDA device" if device.type != "cuda" else "several processes" if distributed else \
            "--full" if self.full else ""
        return not why, f"off ({why})" if why else "on (one GPU; --cuda-graphs off for eager steps)"


_SWITCH = {"true": "on", "yes": "on", "1": "on", "false": "off", "no": "off", "0": "off"}


@dataclass
class RunConfig:
    """Everything a run needs: training, data and LoRA settings."""

    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)

    def to_dict(self) -> dict[str, Any]:
        return {"train": dataclasses.asdict(self.train), "data": dataclasses.asdict(self.data),
                "lora": dataclasses.asdict(self.lora)}


# -- data ----------------------------------------------------------------------------------------------
@dataclass
class Split:
    records: list[dict[str, Any]]
    examples: list[dict[str, Any]]
    stats: Any


def model_task(data: DataConfig) -> str:
    return {"classification": "sequence-classification", "regression": "regression"}.get(data.task, "causal-lm")


def read_split(path: str | None, records: list[dict] | None, tokenizer, data: DataConfig,
               label_names=None) -> Split:
    if records is None:
        records = load_records(path, format=data.format, text_unit=data.text_unit) if path else []
    examples, stats = build_examples(records, tokenizer, data, label_names=label_names, source=str(path or "data"))
    return Split(records, examples, stats)


def builtin_defaults() -> dict[str, dict[str, Any]]:
    """The settings the built-in task was tuned with (lorakit.tasks.DEFAULT_HPARAMS), by section."""
    from ..tasks import DEFAULT_HPARAMS as H
    steps = int(H["steps"])
    return {
        "train": {"model": H["model"], "lr": H["lr"], "schedule": H["schedule"], "batch_size": H["batch_size"],
                  "max_steps": steps, "warmup_ratio": int(H.get("warmup_steps", 0)) / steps,
                  "max_new_tokens": H["max_new_tokens"], "max_eval_examples": H["n_eval"], "seed": H["seed"],
                  "output_dir": "runs/default"},
        "data": {"max_length": H["max_length"]},
        "lora": {"r": H["r"], "alpha": H["alpha"], "dropout": H["dropout"], "targets": H["targets"]},
    }


# -- evaluation ----------------------------------------------------------------------------------------
@torch.no_grad()
def generate_texts(model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 16,
                   adapters: list[str | None] | None = None, cuda_graphs: str = "auto", **gen_kwargs) -> list[str]:
    """Complete each prompt (greedy unless gen_kwargs say otherwise); returns only the new text.

    With `adapters`, prompt i goes through adapter adapters[i] (None = base), all in one batch.
    Greedy decoding and sampling (temperature, top_k, top_p, min_p) on a GPU run through `lk.Decoder` (each token
    one CUDA graph replay; greedy: the same tokens as `model.generate`, sampling: the same distribution;
    `adapters` included) unless cuda_graphs is "off"; the rest (beams, other settings, CPU) through
    `model.generate`.
    """
    from ..decode import Decoder, decode_unsupported
    from ..inject import route

    model.eval()
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # every prompt ends at the last position
    outputs: list[str] = []
    beams = int(gen_kwargs.get("num_beams", 1))
    kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, do_sample=False)
    kwargs.update(gen_kwargs)
    decoder = None
    if device.type == "cuda" and cuda_graphs != "off" and decode_unsupported(model, kwargs) is None:
        decoder = Decoder(model, cuda_graphs)
    sampling = {k: kwargs.get(k) for k in ("temperature", "top_k", "top_p", "min_p")}
    sampling["do_sample"] = bool(kwargs["do_sample"])
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            enc = tokenizer(chunk, return_tensors="pt", padding=True).to(device)
            if decoder is not None:
                out = decoder(enc["input_ids"], enc["attention_mask"], max_new_tokens, pad_token_id=kwargs["pad_token_id"],
                              adapters=None if adapters is None else adapters[start:start + batch_size], **sampling)
            elif adapters is not None:
                names = [n for n in adapters[start:start + batch_size] for _ in range(beams)]
                with route(model, names):
                    out = model.generate(**enc, **kwargs)
            else:
                out = model.generate(**enc, **kwargs)
            new = out[:, enc["input_ids"].shape[1]:]
            outputs.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
    if decoder is not None and decoder.eager_reason:
        warnings.warn(f"decoding ran eagerly: {decoder.eager_reason}", stacklevel=2)
    return outputs


@torch.no_grad()
def evaluate(model: nn.Module, tokenizer, split: Split, run_cfg: RunConfig, device: torch.device,
             score_fn=None) -> dict[str, float]:
    """Task metrics on a held-out split: loss (+ perplexity) for sft/lm, accuracy/F1/MCC for
    classification, Pearson/Spearman for regression, and, for sft with eval_generate, the
    generation metric (`score_fn(predictions, references)`, or BLEU & co. via lorakit.metrics)."""
    from .. import metrics

    cfg, data = run_cfg.train, run_cfg.data
    n = len(split.examples) if not cfg.max_eval_examples else min(cfg.max_eval_examples, len(split.examples))
    examples = split.examples[:n]
    model.eval()
    collate = PadCollator(tokenizer.pad_token_id)
    losses, weights, preds, golds = [], [], [], []
    for start in range(0, n, cfg.batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[start:start + cfg.batch_size]).items()}
        with autocast(device, cfg.precision):
            out = model(**batch)
        if data.task in ("sft", "lm"):
            tokens = int((batch["labels"][:, 1:] != -100).sum())
            losses.append(float(out.loss) * tokens)
            weights.append(tokens)
        elif data.task == "classification":
            preds += out.logits.argmax(-1).tolist()
            golds += batch["labels"].tolist()
        else:
            preds += out.logits.squeeze(-1).float().tolist()
            golds += batch["labels"].tolist()
    result: dict[str, float] = {}
    if data.task in ("sft", "lm"):
        result["loss"] = sum(losses) / max(sum(weights), 1)
        result["perplexity"] = metrics.perplexity(result["loss"])
        if data.task == "sft" and cfg.eval_generate and data.prompt_column in split.records[0]:
            records = split.records[:n]
            prompts = [r[data.prompt_column] + data.separator for r in records]
            refs = [r[data.completion_column] for r in records]
            # decoding is bound by reading the weights: large batches cost little more than one prompt
            hyps = generate_texts(model, tokenizer, prompts, cfg.max_new_tokens, batch_size=64,
                                  cuda_graphs=cfg.cuda_graphs)
            if score_fn is not None:
                result["score"] = float(score_fn(hyps, refs))
            else:
                result["exact_match"] = sum(h.strip() == r.strip() for h, r in zip(hyps, refs)) / max(len(refs), 1)
    elif data.task == "classification":
        result.update(metrics.classification_scores(preds, golds))
    else:
        result.update(metrics.regression_scores(preds, golds))
    return result


def uses_bf16(device: torch.device, precision: str) -> bool:
    """Whether `precision` means bf16 autocast on `device`."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())


def autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_bf16(device, precision))


# -- captured steps (--cuda-graphs) -----------------------------------------------------------------
def graph_lengths(batch_longest: Sequence[int], longest: int, most: int = 8, multiple: int = 8) -> list[int]:
    """The padded lengths a captured run makes a step for, from the longest example of each batch of an epoch
    (`batch_longest`): `most` quantiles of them, so that about as many batches pad to each length, plus
    `longest` (the longest example), so that every batch of every epoch fits one; all rounded up to
    `multiple`. A batch pads to the first that holds it: dense lengths get close graphs."""
    def up(n: int) -> int:
        return -(-max(1, n) // multiple) * multiple

    ms = sorted(up(n) for n in batch_longest)
    picks = {ms[-(-q * len(ms) // most) - 1] for q in range(1, most + 1)} if ms else set()
    return sorted(picks | {up(longest)})


class GraphSteps:
    """The training steps of `lorakit train --cuda-graphs`: one `lk.graphed_step` per padded length.

    Each is captured the first time a batch of its length comes (the sampler sends the longest batch
    first, so the largest step is captured first) and all share one memory pool: the run holds the
    memory of its largest step only. Off CUDA the steps run eagerly (`graphed_step` does that).
    """

    def __init__(self, model: nn.Module, optimizer, cfg: TrainConfig, device: torch.device, lengths: list[int],
                 log) -> None:
        self.model, self.optimizer, self.cfg, self.device, self.log = model, optimizer, cfg, device, log
        self.lengths = lengths
        self.steps: dict[int, Any] = {}
        self.pool = torch.cuda.graph_pool_handle() if device.type == "cuda" else None
        # --grad-accum N: one graph per length adds a micro-batch's gradients, one more clips and steps
        self.accumulate = cfg.grad_accum > 1
        self._update = None

    def collate(self, examples: list[dict[str, Any]], collate) -> dict[str, torch.Tensor]:
        longest = max(len(e["input_ids"]) for e in examples)
        return collate(examples, pad_to=next(n for n in self.lengths if n >= longest))

    def _loss(self, model: nn.Module, batch) -> torch.Tensor:
        # no autocast weight cache: a cached cast would be made inside one capture and reused by another
        with torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=False,
                            enabled=uses_bf16(self.device, self.cfg.precision)):
            loss = model(**batch).loss
        return loss / self.cfg.grad_accum if self.accumulate else loss

    def _clip(self) -> float | None:
        return self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else None

    def step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Forward, backward, clipping and the optimizer step for `batch` (accumulating: forward and backward,
        the gradients added to those of the step's earlier micro-batches); returns the loss (on the device)."""
        from ..graphs import graphed_step

        n = batch["input_ids"].shape[1]
        step = self.steps.get(n)
        if step is None:
            t0 = time.time()
            # the first capture warms up what compiles and tunes once; later lengths need a step or two
            step = graphed_step(self.model, None if self.accumulate else self.optimizer, batch, self._loss,
                                pool=self.pool, max_grad_norm=None if self.accumulate else self._clip(),
                                warmup=2 if self.steps else 3, accumulate=self.accumulate)
            self.steps[n] = step
            if step.graph is not None:
                what = "forward and backward of micro-batches" if self.accumulate else "training step for batches"
                self.log(f"Captured the {what} of {self.cfg.batch_size} x {n} tokens as a CUDA graph "
                         f"({time.time() - t0:.1f} s).")
        return step(batch)

    def update(self) -> None:
        """Accumulating: clip the gradients, step the optimizer and zero the gradients (one graph)."""
        from ..graphs import graphed_update

        if self._update is None:
            t0 = time.time()
            self._update = graphed_update(self.optimizer, max_grad_norm=self._clip(), pool=self.pool)
            if self._update.graph is not None:
                self.log(f"Captured the optimizer step as a CUDA graph ({time.time() - t0:.1f} s).")
        self._update()


def _graphs_off(error: GraphError, cfg: TrainConfig, optimizer, log, keep_grads: bool = False) -> None:
    """A capture failed (the caller has dropped its graphs): with --cuda-graphs auto the run goes on with
    eager steps; with on, the error stops it."""
    if cfg.cuda_graphs != "auto":
        raise error
    log(f"CUDA graphs off for the rest of the run, the steps run eagerly: {error} (--cuda-graphs off skips "
        "the attempt.)")
    if not keep_grads:  # (an update that failed steps on the gradients the micro-batches accumulated)
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.empty_cache()  # hand back the memory of the graphs' pool


def lr_lambda(schedule: str, warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 1.0 - progress if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return f


def _head_paths(model: nn.Module) -> list[str]:
    """Newly initialized classification heads that must train and be saved with the adapter."""
    return [n for n in ("classifier", "score") if isinstance(getattr(model, n, None), nn.Module)]


# -- the run -------------------------------------------------------------------------------------------
def run(run_cfg: RunConfig, log=print) -> dict[str, Any]:
    """Train, evaluate before and after, save the adapter; returns a summary dict.

    In a process started by torchrun it trains data-parallel with the other ranks
    (`cfg.strategy`, see lorakit.distributed): every rank returns the summary, only rank 0
    logs and writes files.

    Raises:
        LoraError subclasses for bad input (data columns, labels, model names, unwritable output,
        a non-finite loss, a missing checkpoint on --resume, a strategy without a launcher).
    """
    from .. import distributed

    ctx = distributed.setup(run_cfg.train.validate().strategy)
    try:
        return _run(run_cfg, log if ctx.is_main else _silent, ctx)
    except Exception as exc:
        if not isinstance(exc, LoraError) and disk_full(exc):  # (run_config.yaml, metrics.jsonl, summary.json)
            raise disk_full_error(run_cfg.train.output_dir, "the run's files") from exc
        raise
    finally:
        ctx.close()


def _silent(*args, **kwargs) -> None:
    """The log of ranks > 0."""


def _run(run_cfg: RunConfig, log, ctx: Context) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from ..models import load_model, resolve_model_path

    cfg, data = run_cfg.train.validate(), run_cfg.data.validate()
    out = Path(cfg.output_dir)
    earlier = plan_output_dir(out, cfg.resume, cfg.overwrite)  # (deleted once the run has started)
    cfg_text = _yaml_dump(run_cfg.to_dict())
    if cfg.resume:
        import yaml
        check_resume(saved_run_config(out), yaml.safe_load(cfg_text), out)
    if cfg.cuda_graphs == "on" and ctx.distributed:
        raise ConfigError("--cuda-graphs runs in one process; pass --cuda-graphs off, or drop --nproc / torchrun.")
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)  # the same seed on every rank: the LoRA init must agree
    random.seed(cfg.seed)
    device = ctx.device
    resolve_model_path(cfg.model)  # an unknown model name fails here, before any data work

    builtin = cfg.train_file is None
    score_fn = None
    train_records = eval_records = None
    if builtin:
        from .. import tasks
        train_records, eval_records = tasks.builtin_task(int(tasks.DEFAULT_HPARAMS["n_train"]),
                                                         int(tasks.DEFAULT_HPARAMS["n_eval"]), seed=cfg.seed)
        score_fn = tasks.score
        if data.task != "sft":
            raise ConfigError("The built-in task is sft (prompt -> completion); pass --train-file for "
                              f"task {data.task!r}.")
    # Classification needs the label set before the model (its head size).
    label_names = None
    num_labels = None
    if data.task == "classification":
        if cfg.train_file is None:
            raise ConfigError("Classification needs --train-file (a CSV/TSV/JSONL/GLUE file with a label column).")
        train_records = load_records(cfg.train_file, format=data.format, text_unit=data.text_unit)
        missing = [i for i, r in enumerate(train_records) if data.label_column not in r]
        if missing:
            raise ConfigError(f"Record {missing[0]} of {cfg.train_file} has no column {data.label_column!r}; "
                              f"columns: {sorted(train_records[missing[0]])}. Pass --label-column.")
        _, label_names = resolve_labels([r[data.label_column] for r in train_records], data.labels,
                                        source=cfg.train_file, column=data.label_column)
        num_labels = len(label_names)

    log(f"Loading {cfg.model} ...")
    t0 = time.time()
    # every rank loads at once: the converted-model cache serializes its builders with a file lock
    # LoRA in bf16 on one GPU: the frozen base is loaded in bfloat16 (half the memory, no casts of the
    # weights in each step) and the adapters train in float32 under autocast
    base_bf16 = not cfg.full and not ctx.distributed and device.type == "cuda" and uses_bf16(device, cfg.precision)
    model, tokenizer = load_model(cfg.model, task=model_task(data), num_labels=num_labels,
                                  dtype=torch.bfloat16 if base_bf16 else None)
    if ctx.strategy != "fsdp":  # FSDP moves each shard to the GPU itself: the whole model need not fit
        model.to(device)
    log(f"  loaded in {time.time() - t0:.1f} s")

    train = read_split(cfg.train_file, train_records, tokenizer, data, label_names)
    log(f"Train data: {train.stats.describe()}")
    evals = None
    if eval_records is not None or cfg.eval_file:
        evals = read_split(cfg.eval_file, eval_records, tokenizer, data, train.stats.label_names)
        log(f"Eval data: {evals.stats.describe()}")

    if cfg.full:
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        lora = run_cfg.lora
        heads = _head_paths(model) if data.task in ("classification", "regression") else []
        if heads and not lora.modules_to_save:
            lora = dataclasses.replace(lora, modules_to_save=heads)
        inject(model, lora)
        if base_bf16:
            for p in model.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
    if cfg.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads") and not cfg.full:
            model.enable_input_require_grads()
    trainable, total = count_parameters(model)
    log(f"Trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")
    train_model = ctx.wrap(model, bf16=uses_bf16(device, cfg.precision))
    if ctx.distributed:
        log(f"Data-parallel: {ctx.world_size} processes, strategy {ctx.strategy}, "
            f"global batch {cfg.batch_size * ctx.world_size} ({cfg.batch_size} per process)")

    t_eval = time.time()
    before = evaluate(model, tokenizer, evals, run_cfg, device, score_fn) if evals else {}
    if before:
        log(f"Before training: {_fmt(before)} ({time.time() - t_eval:.0f} s)")

    params = [p for p in model.parameters() if p.requires_grad]
    graphed, why = cfg.graphs_for(device, ctx.distributed)
    padded = graphed or cfg.cuda_graphs == "on"  # (on without CUDA: eager steps on the graphs' batches, for tests)
    log(f"CUDA graphs: {why}" + ("; the steps run eagerly on batches padded as for the graphs." if padded and not graphed
                                 else "."))
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
        atomic_write(out / "run_config.yaml", lambda f: Path(f).write_text(cfg_text))
    progress = {"step": 0, "epoch": 0, "batch": 0, "best": None}
    if cfg.resume:
        progress = load_checkpoint(out, model, optimizer, scheduler, ctx)
        keep_optimizer_mode(optimizer, capturable=graphed)
        progress["batch"] = resume_batch(progress, sampler, log)
        log(f"Resumed from step {progress['step']} (epoch {progress['epoch']}, batch {progress['batch']}).")
    metrics = MetricsLog(out / "metrics.jsonl", ctx.is_main, resume_step=progress["step"] if cfg.resume else None)
    record = metrics.write

    graphs = None
    if padded:
        sampler.set_epoch(0)
        batch_longest = [max(lengths[i] for i in b) for b in sampler if len(b) == cfg.batch_size]
        # a capture costs about as much as a few eager steps: at most one graph per 50 (micro-)steps of the run
        most = max(2, min(8, total_steps * cfg.grad_accum // 50))
        graphs = GraphSteps(train_model, optimizer, cfg, device, graph_lengths(batch_longest, max(lengths), most), log)
        log(f"  batches padded to {len(graphs.lengths)} lengths: {', '.join(map(str, graphs.lengths))} tokens")
    model.train()
    step, epoch, batch_pos = progress["step"], progress["epoch"], progress["batch"]
    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", dynamic_ncols=True, disable=not ctx.is_main)
    if graphs is not None and ctx.is_main:
        graphs.log = bar.write  # (lines printed under the progress bar, not into it)
    tokens_seen, t_start, window_loss, window_n = 0, time.time(), 0.0, 0
    try:
        while step < total_steps:
            sampler.set_epoch(epoch, skip=batch_pos)
            batches = iter(sampler)
            while step < total_steps:
                micro = []
                for _ in range(cfg.grad_accum):
                    b = next(batches, None)
                    if b is None:
                        break
                    micro.append(b)
                if len(micro) < cfg.grad_accum:  # end of epoch: drop the incomplete accumulation
                    break
                # The micro-batches' losses add up on the device and are read once per optimizer step, and
                # tokens are counted before the batch moves: the host waits for the GPU once per step.
                loss_acc, step_tokens, replayed = None, 0, []
                if graphs is not None:  # full micro-batches replay a graph; a short last one runs eagerly
                    try:
                        for j, idx in enumerate(micro):
                            if len(idx) == cfg.batch_size:
                                host_batch = graphs.collate([train.examples[i] for i in idx], collate)
                                part = graphs.step({k: v.to(device, non_blocking=True) for k, v in host_batch.items()})
                                step_tokens += int(host_batch["attention_mask"].sum())
                                loss_acc = part if loss_acc is None else loss_acc + part
                                replayed.append(j)
                    except GraphError as e:
                        graphs = None  # (the graphs and their memory pool go)
                        _graphs_off(e, cfg, optimizer, bar.write)  # and this step again, eagerly
                        loss_acc, step_tokens, replayed = None, 0, []
                    if graphs is not None and not graphs.accumulate and not replayed:
                        optimizer.zero_grad(set_to_none=True)  # p.grad may still hold a captured step's gradients
                eager = [idx for j, idx in enumerate(micro) if j not in replayed]
                for j, idx in enumerate(eager):
                    host_batch = collate([train.examples[i] for i in idx])
                    step_tokens += int(host_batch["attention_mask"].sum())
                    batch = {k: v.to(device) for k, v in host_batch.items()}
                    with ctx.accumulating(train_model, sync=j == len(eager) - 1):
                        with autocast(device, cfg.precision):
                            loss = train_model(**batch).loss / cfg.grad_accum
                        loss.backward()  # (accumulating graphs: into their gradient tensors, in place)
                    part = loss.detach().float()
                    loss_acc = part if loss_acc is None else loss_acc + part
                    # the loss's grad_fn would keep this step's autograd nodes alive, and a CUDA graph captured
                    # next (--cuda-graphs) cannot use accumulate-grad nodes made on another stream
                    del loss
                loss_sum, step_tokens = ctx.step_stats(float(loss_acc), step_tokens)
                tokens_seen += step_tokens
                if not math.isfinite(loss_sum):
                    raise NonFiniteLoss(step + 1, loss_sum, out)
                if graphs is not None and graphs.accumulate:
                    try:
                        graphs.update()  # clipping, the optimizer step and zeroed gradients, as one graph
                    except GraphError as e:
                        graphs = None
                        _graphs_off(e, cfg, optimizer, bar.write, keep_grads=True)
                if graphs is None or not (graphs.accumulate or replayed):  # (a whole captured step steps itself)
                    if cfg.max_grad_norm > 0:
                        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                step += 1
                batch_pos += len(micro)
                window_loss, window_n = window_loss + loss_sum, window_n + 1
                rate = tokens_seen / max(time.time() - t_start, 1e-9)
                lr = float(scheduler.get_last_lr()[0])  # a tensor once a graph is captured
                bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{lr:.2e}", tok_s=f"{rate:.0f}")
                bar.update(1)
                if step % cfg.log_every == 0 or step == total_steps:
                    record({"event": "train", "step": step, "loss": window_loss / window_n,
                            "lr": lr, "tokens_per_s": rate, "seconds": round(time.time() - t_start, 4)})
                    window_loss, window_n = 0.0, 0
                if evals and cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
                    result = evaluate(model, tokenizer, evals, run_cfg, device, score_fn)
                    model.train()
                    record({"event": "eval", "step": step, **result})
                    if ctx.is_main:
                        bar.write(f"step {step}: {_fmt(result)}")
                    progress["best"] = _track_best(model, out, result, progress["best"], step, cfg.full, ctx)
                if cfg.save_every and step % cfg.save_every == 0:
                    save_checkpoint(out, model, optimizer, scheduler,
                                    {"step": step, "epoch": epoch, "batch": batch_pos, "best": progress["best"],
                                     "global_batch": sampler.global_batch_size, "world_size": ctx.world_size},
                                    ctx, config_text=cfg_text)
            else:
                break
            epoch, batch_pos = epoch + 1, 0
    finally:
        bar.close()
        metrics.close()
    train_time = time.time() - t_start

    after = evaluate(model, tokenizer, evals, run_cfg, device, score_fn) if evals else {}
    if after:
        if ctx.is_main:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"event": "eval", "step": step, "final": True, **after}) + "\n")
        _track_best(model, out, after, progress["best"], step, cfg.full, ctx)
    final_dir = out / ("model" if cfg.full else "adapter")
    if cfg.full:
        ctx.save_pretrained(model, tokenizer, final_dir)
    else:
        ctx.save_adapter(model, final_dir)
    base_dir = resolve_model_path(cfg.model)
    summary = {
        "before": before, "after": after, "steps": step, "train_seconds": train_time,
        "trainable_parameters": trainable, "total_parameters": total,
        "adapter_dir": str(final_dir), "adapter_bytes": dir_size(final_dir),
        "base_bytes": dir_size(base_dir) if isinstance(base_dir, Path) else None,
        "example_prompt": (evals.records[0].get(data.prompt_column) if evals and data.task == "sft" else None),
        "world_size": ctx.world_size, "strategy": ctx.strategy,
    }
    if ctx.is_main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _metric_key(result: dict[str, float]) -> tuple[str, bool]:
    """The headline metric and whether higher is better."""
    for key in ("score", "exact_match", "accuracy", "pearson"):
        if key in result:
            return key, True
    return "loss", False


def _track_best(model, out: Path, result, best, step, full: bool, ctx: Context | None = None):
    key, higher = _metric_key(result)
    value = result[key]
    if best is None or (value > best["value"] if higher else value < best["value"]):
        if not full:
            (ctx or Context()).save_adapter(model, out / "best")
        return {"metric": key, "value": value, "step": step}
    return best


def _fmt(result: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items())


def _yaml_dump(data: dict[str, Any]) -> str:
    import yaml
    return yaml.safe_dump(data, sort_keys=False)


class NonFiniteLoss(LoraError):
    """The loss became NaN or inf; training stopped and the last good checkpoint was kept."""

    def __init__(self, step: int, value: float, out: Path) -> None:
        super().__init__(
            f"The loss became {value} at step {step}; training stopped. The last good checkpoint in "
            f"{out / 'checkpoint'} (if any) is untouched. Lower --lr, enable clipping (--max-grad-norm 1.0), "
            "or check the data for empty or broken examples, then continue with --resume.")
