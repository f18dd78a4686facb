"""The settings of a training run: `TrainConfig` (how to train), and `RunConfig`, which joins it with
`DataConfig` (lorakit.data) and `LoraConfig`. The CLI flags, a YAML file and the `run_config.yaml`
saved with every run are views of them."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import LoraConfig
from ..data import DataConfig
from ..distributed import STRATEGIES
from ..errors import ConfigError

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
    """Held-out data in the same format. None: train evaluates on the built-in task's held-out split when it trains on that task, else not at all; eval needs it (or --builtin-task)."""
    output_dir: str = "runs/lorakit"
    """Where the run writes its config, metrics, checkpoints and the final adapter. One run per folder: a folder that holds an earlier run takes --resume (continue it) or --overwrite (replace it)."""
    full: bool = False
    """Full fine-tuning (every weight trains, no LoRA), for comparison."""
    quantize: str | None = None
    """nf4, fp4 or int8: load the frozen base quantized with bitsandbytes (QLoRA; the adapters train in float32 and load on the 16-bit base too). None: the stored dtype."""
    lr: float = 2e-4
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.0
    """AdamW weight decay (decoupled), applied to the trainable weights."""
    label_smoothing: float = 0.0
    """Label smoothing of the training loss, in [0, 1) (the LoRA paper's E2E recipe uses 0.1); evaluation loss stays plain cross-entropy."""
    schedule: str = "linear"
    """Learning-rate decay after warmup: linear, cosine or constant."""
    warmup_ratio: float = 0.05
    """Fraction of the steps spent warming the learning rate up from 0."""
    epochs: float = 1.0
    """Passes over the training data (fractions allowed); max_steps overrides it."""
    max_steps: int = 0
    """Optimizer steps to run; 0 means `epochs` passes over the data."""
    batch_size: int = 8
    """Examples per micro-batch (per process), for training and evaluation."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    max_grad_norm: float = 1.0
    """Gradient clipping threshold; 0 disables clipping."""
    eval_every: int = 0
    """Evaluate every N optimizer steps (0: only before and after training)."""
    save_every: int = 0
    """Write a checkpoint every N optimizer steps (0: no intermediate checkpoints)."""
    log_every: int = 10
    """Write the mean training loss to metrics.jsonl every N optimizer steps."""
    seed: int = 0
    """Seed of the LoRA init, the data order and dropout."""
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
    metric_for_best: str = "auto"
    """The eval metric that picks best/ and heads the summary: any one the evaluation reports (loss, perplexity, exact_match; accuracy, f1, mcc; pearson, spearman, corr). auto: the task's official metric (GLUE CoLA mcc, STS-B pearson, MRPC and QQP f1, other classification accuracy, regression pearson, sft generation exact match, else loss)."""
    greater_is_better: bool | None = None
    """Whether a larger metric_for_best is better. None: known per metric (loss and perplexity lower, the others higher)."""
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
        if self.quantize is not None:
            from ..quant import QUANTIZE
            if self.quantize not in QUANTIZE:
                raise ConfigError(f"quantize must be one of {', '.join(QUANTIZE)} (or none), got {self.quantize!r}.")
            if self.full:
                raise ConfigError(f"--full trains every weight, but a {self.quantize} base cannot train (its weights "
                                  "are quantized and frozen); drop --quantize for full fine-tuning, or drop --full "
                                  "to train LoRA adapters on the quantized base.")
        for name in ("batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if not self.lr > 0:
            raise ConfigError(f"lr must be positive, got {self.lr}.")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}.")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}.")
        if not isinstance(self.metric_for_best, str) or not self.metric_for_best:
            raise ConfigError(f"metric_for_best must be a metric name or auto, got {self.metric_for_best!r}.")
        mode = self.cuda_graphs
        text = str(mode).lower()
        mode = ("on" if mode else "off") if isinstance(mode, bool) else _SWITCH.get(text, text)
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


def uses_bf16(device: torch.device, precision: str) -> bool:
    """Whether `precision` means bf16 autocast on `device`."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())


def autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_bf16(device, precision))



def lr_lambda(schedule: str, warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 1.0 - progress if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return f




def to_yaml(data: dict[str, Any]) -> str:
    import yaml
    return yaml.safe_dump(data, sort_keys=False)
