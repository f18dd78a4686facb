"""One optimizer step of training, behind one interface: eager, captured as CUDA graphs, or a fallback
that starts captured and switches to eager once, for the rest of the run, if a capture fails.

    loss, tokens = stepper.backward(micro_batches)   # forward + backward of the step's micro-batches
    ... (the loop reads the loss, stops on NaN)
    stepper.update()                                 # clip, optimizer step, zero the gradients

`backward` returns the summed loss of the micro-batches (each divided by grad_accum) as a tensor on
the device and the number of tokens they hold: the loop reads both once per step, so the host waits
for the GPU once per step.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from ..distributed import Context
from ..errors import ConfigError, GraphError
from .config import TrainConfig, autocast, uses_bf16


class Stepper(Protocol):
    log: Callable[[str], None]
    """Where the stepper reports (captures, a switch to eager steps)."""

    def backward(self, micro: list[list[int]]) -> tuple[torch.Tensor, int]:
        """Forward and backward of one step's micro-batches (lists of example indices), gradients summed
        in the parameters; returns (the micro-batches' summed loss on the device, their tokens)."""

    def update(self) -> None:
        """Clip the gradients, step the optimizer and zero the gradients (what `backward` did not do)."""


class EagerStepper:
    """Each micro-batch through the model as PyTorch runs it; with several processes the gradients
    are reduced in the backward of the step's last micro-batch only."""

    def __init__(self, train_model: nn.Module, optimizer, params: list[nn.Parameter], cfg: TrainConfig,
                 ctx: Context, examples: list[dict[str, Any]], collate, log=print) -> None:
        self.train_model, self.optimizer, self.params, self.cfg, self.ctx = train_model, optimizer, params, cfg, ctx
        self.examples, self.collate, self.log = examples, collate, log

    def backward(self, micro: list[list[int]]) -> tuple[torch.Tensor | None, int]:
        loss_acc, tokens = None, 0
        device = self.ctx.device
        for j, idx in enumerate(micro):
            host_batch = self.collate([self.examples[i] for i in idx])
            # real tokens, from the examples (no sync; a packed batch's attention_mask is 4-D)
            tokens += sum(len(self.examples[i]["input_ids"]) for i in idx)
            batch = {k: v.to(device) for k, v in host_batch.items()}
            with self.ctx.accumulating(self.train_model, sync=j == len(micro) - 1):
                with autocast(device, self.cfg.precision):
                    loss = training_loss(self.train_model, batch, self.cfg.label_smoothing) / self.cfg.grad_accum
                loss.backward()  # (accumulating graphs: into their gradient tensors, in place)
            part = loss.detach().float()
            loss_acc = part if loss_acc is None else loss_acc + part
            # the loss's grad_fn would keep this step's autograd nodes alive, and a CUDA graph captured
            # next (--cuda-graphs) cannot use accumulate-grad nodes made on another stream
            del loss
        return loss_acc, tokens

    def update(self) -> None:
        if self.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def training_loss(model: nn.Module, batch: dict[str, torch.Tensor], label_smoothing: float = 0.0) -> torch.Tensor:
    """The model's own loss, or with label smoothing the same cross-entropy (mean over the labels that are not
    -100; a causal LM's logits at position t predict the label at t + 1) with the targets smoothed.

    Raises:
        ConfigError: label smoothing on a model whose labels are not class indices (regression).
    """
    if not label_smoothing:
        return model(**batch).loss
    labels = batch["labels"]
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    if labels.is_floating_point():
        raise ConfigError("--label-smoothing applies to class labels and tokens, not to regression targets; "
                          "drop it for this task.")
    if logits.dim() == 3:  # causal LM: shift
        logits, labels = logits[:, :-1], labels[:, 1:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                             ignore_index=-100, label_smoothing=label_smoothing)


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
            loss = training_loss(model, batch, self.cfg.label_smoothing)
        return loss / self.cfg.grad_accum if self.accumulate else loss

    def _clip(self) -> float | None:
        return self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else None

    def step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Forward, backward, clipping and the optimizer step for `batch` (accumulating: forward and backward,
        the gradients added to those of the step's earlier micro-batches); returns the loss (on the device)."""
        from ..fast.graphs import graphed_step

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
        from ..fast.graphs import graphed_update

        if self._update is None:
            t0 = time.time()
            self._update = graphed_update(self.optimizer, max_grad_norm=self._clip(), pool=self.pool)
            if self._update.graph is not None:
                self.log(f"Captured the optimizer step as a CUDA graph ({time.time() - t0:.1f} s).")
        self._update()


class GraphedStepper:
    """Full micro-batches, padded to the graphs' lengths, replay a captured step; a short one (the end of
    an epoch) runs eagerly into the same gradients. Without accumulation the captured step clips and
    steps the optimizer itself; with it, `update` replays one more graph that does.

    Raises GraphError (from `backward` or `update`) when a step cannot be captured.
    """

    def __init__(self, graphs: GraphSteps, eager: EagerStepper) -> None:
        self.graphs, self.eager = graphs, eager
        self._stepped = False  # (this step's captured graph has stepped the optimizer already)

    @property
    def log(self):
        return self.graphs.log

    @log.setter
    def log(self, log) -> None:
        self.graphs.log = self.eager.log = log

    def backward(self, micro: list[list[int]]) -> tuple[torch.Tensor | None, int]:
        graphs, eager = self.graphs, self.eager
        loss_acc, tokens, short = None, 0, []
        for idx in micro:
            if len(idx) != eager.cfg.batch_size:
                short.append(idx)
                continue
            host_batch = graphs.collate([eager.examples[i] for i in idx], eager.collate)
            part = graphs.step({k: v.to(eager.ctx.device, non_blocking=True) for k, v in host_batch.items()})
            tokens += sum(len(eager.examples[i]["input_ids"]) for i in idx)
            loss_acc = part if loss_acc is None else loss_acc + part
        self._stepped = not graphs.accumulate and len(short) < len(micro)
        if not graphs.accumulate and not self._stepped:
            eager.optimizer.zero_grad(set_to_none=True)  # p.grad may still hold a captured step's gradients
        if short:
            part, more = eager.backward(short)
            tokens += more
            loss_acc = part if loss_acc is None else loss_acc + part
        return loss_acc, tokens

    def update(self) -> None:
        if self.graphs.accumulate:
            self.graphs.update()  # clipping, the optimizer step and zeroed gradients, as one graph
        elif not self._stepped:
            self.eager.update()


class FallbackStepper:
    """Captured steps while they can be captured; at the first GraphError, eager steps for the rest of the
    run (the step that failed runs again eagerly, or its optimizer update does)."""

    def __init__(self, graphed: GraphedStepper, eager: EagerStepper) -> None:
        self.current: GraphedStepper | EagerStepper = graphed
        self.eager = eager

    @property
    def log(self):
        return self.current.log

    @log.setter
    def log(self, log) -> None:
        self.current.log = self.eager.log = log

    def backward(self, micro: list[list[int]]) -> tuple[torch.Tensor | None, int]:
        if self.current is not self.eager:
            try:
                return self.current.backward(micro)
            except GraphError as e:
                self._switch(e, keep_grads=False)  # and this step again, eagerly
        return self.eager.backward(micro)

    def update(self) -> None:
        if self.current is not self.eager:
            try:
                return self.current.update()
            except GraphError as e:
                # (an update that failed steps on the gradients the micro-batches accumulated)
                self._switch(e, keep_grads=True)
        self.eager.update()

    def _switch(self, error: GraphError, keep_grads: bool) -> None:
        self.current = self.eager  # (the graphs and their memory pool go)
        self.eager.log(f"CUDA graphs off for the rest of the run, the steps run eagerly: {error} (--cuda-graphs off "
                       "skips the attempt.)")
        if not keep_grads:
            self.eager.optimizer.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()  # hand back the memory of the graphs' pool


def make_stepper(cfg: TrainConfig, eager: EagerStepper, padded: bool, lengths: list[int], log) -> Stepper:
    """The stepper of a run: eager, or (`padded`: --cuda-graphs, or auto on one GPU) graphs for its batches,
    which fall back to eager steps when cuda_graphs is auto and stop the run with the error when it is on."""
    if not padded:
        return eager
    graphs = GraphSteps(eager.train_model, eager.optimizer, cfg, eager.ctx.device, lengths, log)
    graphed = GraphedStepper(graphs, eager)
    return graphed if cfg.cuda_graphs == "on" else FallbackStepper(graphed, eager)
