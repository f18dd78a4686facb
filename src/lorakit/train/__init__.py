"""`lorakit train`: LoRA (or full) fine-tuning with evaluation, checkpoints and resume.

    summary = run(RunConfig(TrainConfig(...), DataConfig(...), LoraConfig(...)))

A run is described by three dataclasses, `TrainConfig` (train/config.py), `DataConfig`
(lorakit.data) and `LoraConfig`; the CLI flags, a YAML file and the `run_config.yaml` saved
with every run are views of them. `run` is `setup.setup` (data, model, optimizer, resume, stepper),
then `fit.fit` (the loop), then `fit.finish` (final evaluation and files).
One optimizer step runs through a stepper (train/steppers.py: eager, CUDA graphs, or graphs with
a fallback to eager steps); evaluation and checkpoints have their own modules.

Layout of an output directory (train/rundir.py; one run per folder: `--resume` continues it,
`--overwrite` replaces it):
    run_config.yaml      the resolved configuration
    metrics.jsonl        one JSON object per log / eval event
    checkpoint/          the last checkpoint (trainable weights, optimizer, scheduler, RNG, data position, settings)
    best/                the adapter with the best eval metric so far
    adapter/             the final adapter (PEFT format)
    summary.json         the summary `run` returns

On several processes (`torchrun --nproc-per-node N -m lorakit train`, or `lorakit train --nproc N`)
the same loop runs data-parallel with `strategy` ddp or fsdp; `lorakit.distributed` holds the
machinery and documents what stays the same (files, data order, evaluation, RNG).
"""

from __future__ import annotations

from typing import Any

from ..errors import LoraError
from .checkpoints import CheckpointError, load_checkpoint, resume_batch, save_checkpoint
from .config import (
    RunConfig,
    TrainConfig,
    autocast,
    builtin_defaults,
    lr_lambda,
    uses_bf16,
)
from .evaluation import evaluate, generate_texts, metric_key
from .fit import NonFiniteLoss
from .rundir import dir_size
from .setup import Training
from .splits import Split, model_task, read_split
from .steppers import GraphSteps, graph_lengths

_resume_batch = resume_batch  # (the name benchmarks and tests know)

__all__ = [
    "CheckpointError", "GraphSteps", "NonFiniteLoss", "RunConfig", "Split", "TrainConfig", "Training",
    "autocast", "builtin_defaults", "dir_size", "evaluate", "generate_texts", "graph_lengths", "load_checkpoint",
    "lr_lambda", "metric_key", "model_task", "read_split", "run", "save_checkpoint", "uses_bf16",
]


def run(run_cfg: RunConfig, log=print) -> dict[str, Any]:
    """Train, evaluate before and after, save the adapter; returns a summary dict.

    In a process started by torchrun it trains data-parallel with the other ranks
    (`cfg.strategy`, see lorakit.distributed): every rank returns the summary, only rank 0
    logs and writes files.

    Raises:
        LoraError subclasses for bad input (data columns, labels, model names, an output folder that
        holds another run or is a file, a non-finite loss, a missing, damaged or mismatched checkpoint
        on --resume, a strategy without a launcher, a full disk).
    """
    from .. import distributed
    from .checkpoints import disk_full, disk_full_error
    from .fit import finish, fit
    from .setup import setup

    ctx = distributed.setup(run_cfg.train.validate().strategy)
    try:
        training = setup(run_cfg, ctx, log if ctx.is_main else _silent)
        try:
            return finish(training, fit(training))
        finally:
            training.metrics.close()
    except Exception as exc:
        if not isinstance(exc, LoraError) and disk_full(exc):  # (run_config.yaml, metrics.jsonl, summary.json)
            raise disk_full_error(run_cfg.train.output_dir, "the run's files", exc) from exc
        raise
    finally:
        ctx.close()


def _silent(*args, **kwargs) -> None:
    """The log of ranks > 0."""
