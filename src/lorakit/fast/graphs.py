"""A training step captured once as a CUDA graph and replayed: no per-op CPU work per step.

An adapted model launches several small kernels per adapted linear. When the host cannot
enqueue them as fast as the GPU runs them, the step is bound by CPU time, not GPU time
(BENCHMARKS.md measures both). A CUDA graph records forward, backward, gradient clipping
and the optimizer step once; each later step copies the batch into the recorded input
buffers and replays the whole step with one launch.

    opt = torch.optim.AdamW(lk.trainable_parameters(model), lr=2e-4, capturable=True, fused=True)
    step = lk.graphed_step(model, opt, first_batch)      # batch: dict of tensors, fixed shapes
    for batch in loader:
        loss = step(batch)
        scheduler.step()                                  # schedules keep working (lr is a tensor)

What it needs: every batch has the same keys, shapes and dtypes (pad to one length); an
optimizer built with `capturable=True` (with AdamW also `fused=True`: on the 1.1B Llama of
BENCHMARKS.md the capturable foreach form made the graphed step 4.6 ms slower); no host synchronization inside the
step (no `.item()`, no data-dependent Python control flow); and no loss of an earlier eager
step still referenced when a step is built (its autograd nodes, made on another stream, would
break the capture: `del loss`). Dropout stays random: the
fast path draws its seeds on the GPU, which a replay advances. Gradient checkpointing
(non-reentrant) is recorded with its recomputation and draws the same masks there.

Gradient accumulation: `graphed_step(model, None, batch, loss_fn, accumulate=True)` adds each
micro-batch's gradients into fixed gradient tensors, and `graphed_update(opt)` clips, steps and
zeroes them (see `graphed_update`).

Capturing needs a few warm-up steps on the example batch (kernels compile and tune, lorakit
makes its launch plans). They change nothing the caller sees: the trainable parameters, the
optimizer state and the CUDA random state are put back as they were, so a run resumed from a
checkpoint draws the same dropout masks as one never stopped. (A copy of the trainable parameters
is held meanwhile: small for adapters, a second model for full fine-tuning.) Off CUDA, `graphed_step` returns the same
step run eagerly, so code that uses it runs anywhere.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..errors import GraphError

Batch = Mapping[str, Tensor] | Sequence[Tensor]


def _default_loss(model: nn.Module, batch: Batch) -> Tensor:
    out = model(**batch)
    loss = out["loss"] if isinstance(out, Mapping) else getattr(out, "loss", None)
    if loss is None:
        raise GraphError("graphed_step: the model's output has no loss (pass labels in the batch, or "
                         "loss_fn=lambda model, batch: <loss tensor>).")
    return loss


def _tensors(batch: Batch) -> list[tuple[Any, Tensor]]:
    items = list(batch.items()) if isinstance(batch, Mapping) else list(enumerate(batch))
    for k, t in items:
        if not isinstance(t, Tensor):
            raise GraphError(f"graphed_step: batch[{k!r}] is a {type(t).__name__}; every entry must be a tensor.")
    return items


class GraphedStep:
    """`step(batch) -> loss`: one training step (forward, backward, optional clipping, optimizer step).

    Built by `graphed_step`; see the module docstring.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, example: Batch,
                 loss_fn: Callable[[nn.Module, Batch], Tensor] | None = None, max_grad_norm: float | None = None,
                 warmup: int = 3, pool=None, accumulate: bool = False) -> None:
        if loss_fn is None and not isinstance(example, Mapping):
            raise GraphError("graphed_step: a batch that is not a dict needs "
                             "loss_fn=lambda model, batch: <loss tensor>.")
        if accumulate and (optimizer is not None or max_grad_norm is not None):
            raise GraphError("graphed_step: accumulate=True only adds gradients; pass optimizer=None and no "
                             "max_grad_norm, and step the optimizer with graphed_update(optimizer, ...).")
        self.model, self.optimizer, self.accumulate = model, optimizer, accumulate
        self.loss_fn = loss_fn or _default_loss
        self.max_grad_norm = max_grad_norm
        items = _tensors(example)
        self._spec = [(k, tuple(t.shape), t.dtype) for k, t in items]
        self._params = [p for g in optimizer.param_groups for p in g["params"]] if optimizer is not None else \
            [p for p in model.parameters() if p.requires_grad]
        device = items[0][1].device if items else next(model.parameters()).device
        self.graph: torch.cuda.CUDAGraph | None = None
        if device.type != "cuda":
            return  # eager: the same step, run op by op
        if optimizer is not None:
            _check_capturable(optimizer)
            _lr_as_tensor(optimizer, device)
        self._static = {k: t.detach().clone() for k, t in items}
        self._capture(device, warmup, pool)

    # -- the step --------------------------------------------------------------------------------
    def _step(self, batch: Batch) -> Tensor:
        loss = self.loss_fn(self.model, batch)
        loss.backward()
        if self.optimizer is not None:
            if self.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(self._params, self.max_grad_norm, foreach=True)
            self.optimizer.step()
        return loss.detach()

    def _static_batch(self) -> Batch:
        if all(isinstance(k, int) for k, _, _ in self._spec):
            return [self._static[k] for k, _, _ in self._spec]
        return dict(self._static)

    def _capture(self, device: torch.device, warmup: int, pool) -> None:
        grads = None
        if self.accumulate:  # what earlier steps accumulated is put back after the warm-up and the capture
            _zero_in_place([p for p in self._params if p.grad is None])
            grads = [p.grad.detach().clone() for p in self._params]
        try:
            self._warm_up_and_capture(device, warmup, pool)
        finally:
            if grads is not None:
                with torch.no_grad():
                    for p, g in zip(self._params, grads):
                        p.grad.copy_(g)

    def _warm_up_and_capture(self, device: torch.device, warmup: int, pool) -> None:
        saved = _snapshot(self._params, self.optimizer)
        rng = torch.cuda.get_rng_state(device)  # the warm-up's dropout seeds must not move the caller's stream

        def warm_step() -> None:  # compile and tune the kernels
            self._zero_grad()
            self._step(self._static_batch())

        _warm_up(device, warm_step, max(1, warmup))
        _restore(saved, self.optimizer)
        torch.cuda.set_rng_state(rng, device)
        self._zero_grad()  # gradients are then allocated inside the graph, written (not added to) by each replay
        # the graph's pool cannot take blocks the eager allocator keeps cached: hand them back first
        torch.cuda.empty_cache()
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph, pool=pool):
                self._loss = self._step(self._static_batch())
        except RuntimeError as e:
            self.graph = None
            _reset_generator(device)
            self._zero_grad()  # gradients allocated in the failed capture hold nothing
            if isinstance(e, torch.OutOfMemoryError):
                raise GraphError(
                    "graphed_step: out of memory while capturing the step. A captured step keeps its activations in "
                    "a memory pool of its own; use smaller batches, or run the steps eagerly.") from e
            if "captur" not in str(e):
                raise
            raise GraphError(
                f"graphed_step: the step could not be captured as a CUDA graph ({str(e).splitlines()[0]}). Usual "
                "causes: a host synchronization inside the step (.item(), printing a tensor, data-dependent "
                "control flow), or the loss of an earlier eager step still referenced (its autograd nodes "
                "live on another stream: `del loss` before building the step).") from e

    def _zero_grad(self) -> None:
        if self.accumulate:  # the same gradient tensors for every step and for graphed_update: zeroed in place
            _zero_in_place(self._params)
        elif self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.model.zero_grad(set_to_none=True)

    def __call__(self, batch: Batch) -> Tensor:
        items = _tensors(batch)
        spec = [(k, tuple(t.shape), t.dtype) for k, t in items]
        if spec != self._spec:
            raise GraphError(
                f"graphed_step: this batch has entries {_fmt(spec)} but the step was captured for {_fmt(self._spec)}. "
                "A captured step replays fixed shapes: pad every batch to one length (and one batch size), "
                "or build one graphed_step per shape.")
        if self.graph is None:
            if not self.accumulate:
                self._zero_grad()
            return self._step(batch)
        for k, t in items:
            self._static[k].copy_(t, non_blocking=True)
        self.graph.replay()
        if self.optimizer is not None:
            # What a Python-level optimizer.step() call would note; lr schedulers check it, and a replay
            # runs the recorded step without calling it.
            self.optimizer._opt_called = True
        return self._loss.clone()


def graphed_step(model: nn.Module, optimizer: torch.optim.Optimizer | None, example_batch: Batch,
                 loss_fn: Callable[[nn.Module, Batch], Tensor] | None = None, *, max_grad_norm: float | None = None,
                 warmup: int = 3, pool=None, accumulate: bool = False) -> GraphedStep:
    """A training step for `model` captured as one CUDA graph (eager off CUDA); see the module docstring.

    Args:
        model: in training mode, on the GPU.
        optimizer: built with `capturable=True`; None: forward and backward only.
        example_batch: a dict (passed as `model(**batch)`) or a sequence of tensors, on the model's
            device, with the shapes and dtypes of every later batch.
        loss_fn: `loss_fn(model, batch) -> scalar loss`; default `model(**batch).loss`.
        max_grad_norm: clip the gradients' total norm to this before each optimizer step.
        warmup: eager steps before the capture (their effect on parameters and optimizer state is undone).
        pool: a memory pool shared with other captured steps (`torch.cuda.graph_pool_handle()`), so
            that steps for several batch shapes of one model hold the memory of the largest only
            (capture the largest first). Safe because a step's only output, the loss, is copied
            right after its replay; the gradients a replay leaves in `p.grad` may be overwritten
            by another step's replay.
        accumulate: gradient accumulation (with optimizer=None): each call adds its gradients to
            `p.grad` of the trainable parameters (zeros are allocated once, and the same tensors
            serve every later step); `graphed_update` steps the optimizer and zeroes them in place.
            Scale the loss by 1 / micro-batches in `loss_fn`. Steps for several shapes may share
            the gradients: they are never reallocated.

    Returns:
        `step(batch) -> loss` (a detached scalar tensor; reading it with `.item()` waits for the step).

    Raises:
        GraphError: an optimizer that cannot be captured, a step that cannot be recorded (a host
            synchronization inside it, say), or (at a call) a batch of another shape. After a failed
            capture the process goes on as before (parameters, optimizer state and the CUDA generator
            as they were; `p.grad` cleared), so the caller may run the step eagerly instead.
    """
    return GraphedStep(model, optimizer, example_batch, loss_fn, max_grad_norm, warmup, pool, accumulate)


class GraphedUpdate:
    """`update()`: clip the accumulated gradients, step the optimizer and zero the gradients in place,
    captured as one CUDA graph (eager off CUDA). Built by `graphed_update`."""

    def __init__(self, optimizer: torch.optim.Optimizer, max_grad_norm: float | None = None, pool=None) -> None:
        self.optimizer, self.max_grad_norm = optimizer, max_grad_norm
        self._params = [p for g in optimizer.param_groups for p in g["params"]]
        self.graph: torch.cuda.CUDAGraph | None = None
        if any(p.grad is None for p in self._params):
            raise GraphError("graphed_update: some parameters have no gradient yet; build the accumulating steps "
                             "(graphed_step(..., accumulate=True)) first, so that the gradients it steps on exist.")
        device = self._params[0].device if self._params else torch.device("cpu")
        if device.type != "cuda":
            return
        _check_capturable(optimizer)
        _lr_as_tensor(optimizer, device)
        grads = [p.grad.detach().clone() for p in self._params]  # what the steps accumulated so far
        saved = _snapshot(self._params, optimizer)
        _warm_up(device, self._update, 1)  # the optimizer creates its state
        _restore(saved, optimizer)
        torch.cuda.empty_cache()
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph, pool=pool):
                self._update()
        except RuntimeError as e:
            self.graph = None
            _reset_generator(device)
            raise GraphError(f"graphed_update: the optimizer step could not be captured as a CUDA graph "
                             f"({str(e).splitlines()[0]}).") from e
        finally:
            with torch.no_grad():
                for p, g in zip(self._params, grads):
                    p.grad.copy_(g)

    def _update(self) -> None:
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self._params, self.max_grad_norm, foreach=True)
        self.optimizer.step()
        _zero_in_place(self._params)

    def __call__(self) -> None:
        if self.graph is None:
            self._update()
            return
        self.graph.replay()
        self.optimizer._opt_called = True  # (see GraphedStep.__call__)


def graphed_update(optimizer: torch.optim.Optimizer, *, max_grad_norm: float | None = None,
                   pool=None) -> GraphedUpdate:
    """The optimizer step of gradient accumulation, captured as one CUDA graph (eager off CUDA).

    With `graphed_step(model, None, batch, loss_fn, accumulate=True)` for the micro-batches:

        micro = lk.graphed_step(model, None, first_batch, lambda m, b: m(**b).loss / n, accumulate=True)
        update = lk.graphed_update(opt, max_grad_norm=1.0)
        for batches in groups_of_n:
            for b in batches:
                micro(b)
            update()              # clip, optimizer step, gradients zeroed in place

    Build it after the accumulating steps (their gradient tensors must exist); it leaves them as they
    were. The optimizer needs `capturable=True`, as for `graphed_step`.

    Raises:
        GraphError: parameters without a gradient yet, an optimizer that cannot be captured, or a
            step that cannot be recorded.
    """
    return GraphedUpdate(optimizer, max_grad_norm, pool)


def _warm_up(device: torch.device, fn: Callable[[], None], times: int) -> None:
    """fn() `times` times on a side stream (as capturing requires), then wait for it."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(times):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)


def _zero_in_place(params: list[Tensor]) -> None:
    with torch.no_grad():
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            else:
                p.grad.zero_()


def _reset_generator(device: torch.device) -> None:
    """After a failed capture: the CUDA generator as if the capture had ended. A capture that fails at its end
    leaves the generator in capture mode, and every later random op on the device would raise ("Offset
    increment outside graph capture"). A clone of its state (same seed and offset, not capturing) takes its
    place. Steps captured before keep advancing the old state when replayed: rebuild them, or their random
    numbers may repeat those of eager ops."""
    gen = torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    gen.graphsafe_set_state(gen.clone_state())


def _fmt(spec) -> str:
    return ", ".join(f"{k}: {list(s)} {str(d).replace('torch.', '')}" for k, s, d in spec)


def _check_capturable(optimizer: torch.optim.Optimizer) -> None:
    for g in optimizer.param_groups:
        if not g.get("capturable"):
            raise GraphError(
                f"graphed_step: {type(optimizer).__name__} was built without capturable=True; its step reads the "
                f"step count on the CPU and cannot be recorded. Build it as {type(optimizer).__name__}(params, ..., "
                "capturable=True) (Adam, AdamW and most torch.optim optimizers accept it).")


def _lr_as_tensor(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    # A float lr would be baked into the recorded kernels; as a tensor, schedulers update it in place.
    for g in optimizer.param_groups:
        if not isinstance(g["lr"], Tensor):
            g["lr"] = torch.tensor(float(g["lr"]), dtype=torch.float32, device=device)


def _snapshot(params: list[Tensor], optimizer) -> tuple[list[Tensor], list[Tensor], dict]:
    with torch.no_grad():
        values = [p.detach().clone() for p in params]
        state = {}
        if optimizer is not None:
            for p, st in optimizer.state.items():
                state[p] = {k: v.detach().clone() if isinstance(v, Tensor) else v for k, v in st.items()}
    return params, values, state


def _restore(saved: tuple[list[Tensor], list[Tensor], dict], optimizer) -> None:
    """Parameters and optimizer state as before the warm-up, in the same tensors (the graph records
    their addresses). State the warm-up created is zeroed: a fresh Adam-family state."""
    params, values, state = saved
    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v)
        if optimizer is None:
            return
        for p, st in optimizer.state.items():
            before = state.get(p)
            for k, v in st.items():
                if not isinstance(v, Tensor):
                    if before is not None and k in before:
                        st[k] = before[k]
                    continue
                if before is not None and k in before:
                    v.copy_(before[k])
                else:
                    v.zero_()
