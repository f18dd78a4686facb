"""The continuous-batching engine: one model, one decode batch whose rows each use their own adapter.

One thread owns the model. Each turn of its loop:
    1. admits waiting requests while the batch has room (`max_batch`), the KV cache budget holds them
       at their longest (`kv.fits`), and their adapter can be put in the model (`AdapterRegistry.acquire`);
       a request that does not fit waits, in arrival order (one whose adapter has no free slot in the model
       lets later requests for the base model pass);
    2. reads at most `prefill_chunk` prompt tokens: the next chunk of the oldest admitted request (a long
       prompt takes several turns, so running rows wait one chunk at most), or several short prompts in one
       batch; a request whose prompt is read picks its first token and joins the decode batch;
    3. decodes one token for every row of the batch in one forward pass, each row through its adapter
       (`lk.route`), and lets finished or abandoned rows leave.

A row's greedy tokens are those it gets alone (`lk.greedy_decode` with its adapter): rows only share
the forward pass, padded on the left and masked as `model.generate` does (`kv.PaddedKV`).
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .. import fast
from ..errors import LoraError
from ..fast.decode import _Pins, _last_logits
from ..inject import disabled, route
from .adapters import AdapterRegistry
from .kv import PaddedKV, check_model, fits, new_cache
from .sampling import SamplingParams, TextStream, draw, generator

log = logging.getLogger("lorakit.serve")


@dataclass
class Event:
    """What a request hears from the engine: new text, then one final event (finish_reason set)."""

    text: str = ""
    finish_reason: str | None = None  # "stop", "length", or "error" (then `error` says why)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: Exception | None = None


@dataclass
class Request:
    """One generation. `emit` is called on the engine's thread with every `Event`."""

    prompt: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]
    adapter: str | None = None  # a registry name, None for the base model
    id: int = field(default_factory=itertools.count().__next__)
    arrived: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    # engine state
    slot: str | None = None
    cache: object = None
    read: int = 0  # prompt tokens in `cache`
    last: int = -1  # the newest token, not yet in the cache
    stream: TextStream | None = None
    gen: torch.Generator | None = None
    first_at: float | None = None
    generated: int = 0  # new tokens, an end-of-sequence token included

    @property
    def total(self) -> int:
        """The most cache positions this request can take."""
        return len(self.prompt) + self.params.max_tokens


class QueueFull(LoraError):
    """The engine's waiting queue is full; the client should retry later."""


class Engine:
    """Serves `Request`s on `model` (see the module docstring). `start()` runs the loop on its own thread.

    Args:
        model: a Hugging Face causal LM in eval mode, adapters to be added by `registry`.
        tokenizer: its tokenizer (decodes the text of the new tokens).
        registry: the adapters (None: the base model only).
        kv_budget: KV cache positions for the whole batch (rows padded to the longest count in full).
        max_batch: rows decoded together.
        max_queue: requests waiting beyond the batch; more are refused (`QueueFull`).
        prefill_chunk: prompt tokens read per turn.
        metrics: a `serve.metrics.Metrics`, or None.
    """

    def __init__(self, model: nn.Module, tokenizer, registry: AdapterRegistry | None = None, kv_budget: int = 16384,
                 max_batch: int = 32, max_queue: int = 256, prefill_chunk: int = 512, metrics=None) -> None:
        check_model(model)
        self.model, self.tokenizer, self.metrics = model, tokenizer, metrics
        self.registry = registry
        self.kv_budget, self.max_batch, self.max_queue = int(kv_budget), int(max_batch), int(max_queue)
        self.prefill_chunk = int(prefill_chunk)
        self.device = next(model.parameters()).device
        # transformers renames forward's `past_key_values` to `cache`; pass whichever the model takes
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        gc = getattr(model, "generation_config", None)
        eos = getattr(gc, "eos_token_id", None)
        eos = getattr(model.config, "eos_token_id", None) if eos is None else eos
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
            eos.append(tokenizer.eos_token_id)
        self.eos = set(eos)
        self.waiting: deque[Request] = deque()
        self.prefilling: list[Request] = []
        self.running: list[Request] = []
        self.kv = PaddedKV(model)
        self._pins, self._pinned_version = _Pins(model), -1
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False

    # -- any thread ------------------------------------------------------------------------------------------
    def submit(self, request: Request) -> None:
        """Queue a request.

        Raises:
            QueueFull: `max_queue` requests are waiting already.
        """
        with self._cv:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting; retry shortly.")
            self.waiting.append(request)
            self._cv.notify()
        self._gauges()

    def cancel(self, request: Request) -> None:
        """Abandon a request (its client left): it leaves the queue or the batch at the next turn."""
        request.cancelled = True
        self.wake()

    def wake(self) -> None:
        """Have the loop take a turn (e.g. to remove unloaded adapters from the model)."""
        with self._cv:
            self._cv.notify()

    def start(self) -> Engine:
        self._thread = threading.Thread(target=self._loop, name="lorakit-serve-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join()

    def load(self) -> dict[str, int]:
        """Requests waiting, being read and decoding."""
        return {"waiting": len(self.waiting), "prefilling": len(self.prefilling), "running": len(self.running)}

    # -- the engine's thread -----------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not (self.waiting or self.prefilling or self.running
                                              or (self.registry is not None and self.registry.pending())):
                    self._cv.wait()
                if self._stop:
                    break
            try:
                self._turn()
            except Exception as exc:  # a bug or a broken model: fail the requests in flight, keep serving
                log.exception("engine turn failed")
                for r in self.running + self.prefilling:
                    self._finish(r, "error", exc)
                self.running, self.prefilling, self.kv = [], [], PaddedKV(self.model)
        for r in list(self.waiting) + self.prefilling + self.running:
            self._finish(r, "error", RuntimeError("the server is shutting down"))

    @torch.no_grad()  # not inference_mode: adapters injected here must stay ordinary tensors
    def _turn(self) -> None:
        self._drop_cancelled()
        if self.registry is not None:
            self.registry.collect(self._busy())
        self._admit()
        if self.prefilling:
            group = self._prefill_group()
            try:
                self._prefill(group)
            except Exception as exc:  # these prompts broke the model (e.g. too long for it): fail them alone
                log.exception("prefill failed")
                for r in group:
                    if r in self.prefilling:
                        self.prefilling.remove(r)
                    self._finish(r, "error", exc)
        if self.running:
            self._decode()
        self._gauges()

    def _busy(self) -> set[str]:
        return {r.slot for r in self.running + self.prefilling if r.slot is not None}

    def _drop_cancelled(self) -> None:
        with self._cv:
            gone = [r for r in self.waiting if r.cancelled]
            for r in gone:
                self.waiting.remove(r)
        self.prefilling = [r for r in self.prefilling if not r.cancelled]
        keep = [i for i, r in enumerate(self.running) if not r.cancelled]
        if len(keep) < len(self.running):
            self.running = [self.running[i] for i in keep]
            self.kv.keep(keep)

    def _admit(self) -> None:
        """Move waiting requests into the batch, oldest first. One that does not fit the batch or the KV budget
        stops the admission (so a long request is not passed over forever). One whose adapter cannot enter the
        model yet (every slot in use) waits, and so do the adapter requests after it, so that the slots drain
        and it gets one; requests for the base model pass it."""
        with self._cv:
            waiting = list(self.waiting)
        blocked = False
        for r in waiting:
            held = self.running + self.prefilling
            if len(held) >= self.max_batch or (held and not fits([h.total for h in held] + [r.total],
                                                                   self.kv_budget)):
                return
            if r.adapter is not None and blocked:
                continue
            if r.adapter is not None:
                try:
                    r.slot = self.registry.acquire(r.adapter, self._busy())
                except LoraError as exc:
                    self._unqueue(r)
                    self._finish(r, "error", exc)
                    continue
                if r.slot is None:
                    blocked = True
                    continue
            self._unqueue(r)
            try:
                r.gen = generator(r.params, self.device)
            except (RuntimeError, ValueError, OverflowError) as exc:  # e.g. a seed torch does not take
                self._finish(r, "error", exc)
                continue
            r.cache, r.stream = new_cache(self.model), TextStream(self.tokenizer, r.params.stop)
            self.prefilling.append(r)

    def _unqueue(self, r: Request) -> None:
        with self._cv:
            self.waiting.remove(r)

    def _prefill_group(self) -> list[Request]:
        """The prompts read this turn: the oldest one's next chunk, or, when it starts and is short, as many
        whole prompts (oldest first) as fit one chunk padded to the longest of them."""
        first = self.prefilling[0]
        if first.read or len(first.prompt) >= self.prefill_chunk:
            return [first]
        group, longest = [first], len(first.prompt)
        for r in self.prefilling[1:]:
            n = max(longest, len(r.prompt))
            if r.read or n * (len(group) + 1) > self.prefill_chunk:
                break
            group.append(r)
            longest = n
        return group

    def _prefill(self, group: list[Request]) -> None:
        """Read the group's prompts (one chunk of one, or several whole ones padded on the left in one batch);
        a request whose prompt is read picks its first token and joins the decode batch."""
        if len(group) == 1:  # the next chunk of one prompt, into its own cache
            r = group[0]
            start, end = r.read, min(len(r.prompt), r.read + self.prefill_chunk)
            ids = torch.tensor([r.prompt[start:end]], device=self.device)
            mask = torch.ones(1, end, dtype=torch.long, device=self.device)
            positions = torch.arange(start, end, device=self.device)[None]
        else:  # whole prompts: (rows, longest) padded on the left, masked, positions counted from each start
            start, end = 0, max(len(r.prompt) for r in group)
            ids = torch.tensor([[0] * (end - len(r.prompt)) + r.prompt for r in group], device=self.device)
            mask = torch.tensor([[0] * (end - len(r.prompt)) + [1] * len(r.prompt) for r in group],
                                device=self.device)
            positions = (mask.cumsum(-1) - 1).clamp_(min=0)
            group[0].cache = new_cache(self.model)  # one cache for the group; each row leaves it for the batch
        cache = group[0].cache
        with self._routed([r.slot for r in group]):
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                **{self._cache_arg: cache}, use_cache=True, **_last_logits(self.model)).logits
        for row, r in enumerate(group):
            r.read = end if len(group) == 1 else len(r.prompt)
            if r.read < len(r.prompt):
                return
            self.prefilling.remove(r)
            r.cache = None
            if not self._take(r, self._pick(r, logits[row, -1])):
                self.kv.add(cache, row, len(r.prompt))
                self.running.append(r)

    def _decode(self) -> None:
        """One token for every running row; finished rows leave."""
        rows = self.running
        mask, positions = self.kv.step_inputs()
        ids = torch.tensor([[r.last] for r in rows], device=self.device)
        with self._routed([r.slot for r in rows]):
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                **{self._cache_arg: self.kv.cache}, use_cache=True).logits[:, -1]
        self.kv.advance()
        greedy = logits.argmax(-1).tolist()
        keep = []
        for i, r in enumerate(rows):
            try:
                token = greedy[i] if r.params.greedy else self._pick(r, logits[i])
            except RuntimeError as exc:  # this row's settings broke sampling: the other rows go on
                self._finish(r, "error", exc)
                continue
            if not self._take(r, token):
                keep.append(i)
        if len(keep) < len(rows):
            self.running = [rows[i] for i in keep]
            self.kv.keep(keep)

    def _routed(self, slots: list[str | None]):
        """Route the rows through their adapters; on the fast path the adapters stay stacked across steps."""
        if all(s is None for s in slots):
            return disabled(self.model)
        stack = contextlib.ExitStack()
        stack.enter_context(route(self.model, slots))
        if not fast.enabled_for(torch.empty(0, device=self.device)):
            return stack  # the reference path reads the route alone
        with stack.pop_all() as undo:  # leaves the route if pinning fails
            version = self.registry.version if self.registry is not None else 0
            if version != self._pinned_version:  # adapters came or went: `pin` restacks the layers they touch,
                from ..layers import LoraLinear   # but layers wrapped since need pins made anew

                if [m for m in self.model.modules() if isinstance(m, LoraLinear)] != self._pins.layers:
                    self._pins = _Pins(self.model)
                self._pinned_version = version
            undo.callback(self._pins.unpin)
            self._pins.pin(slots, self.device)
            return undo.pop_all()

    def _pick(self, r: Request, logits: torch.Tensor) -> int:
        return int(logits.argmax(-1)) if r.params.greedy else draw(logits, r.params, r.gen)

    def _take(self, r: Request, token: int) -> bool:
        """Record r's new token and hand out its text; True when r is finished (and told so)."""
        now = time.perf_counter()
        if r.first_at is None:
            r.first_at = now
            if self.metrics is not None:
                self.metrics.ttft.observe(now - r.arrived)
        r.last = token
        r.generated += 1
        if token in self.eos:
            self._finish(r, "stop")
            return True
        stopped = r.stream.add(token)
        if stopped:
            self._finish(r, "stop")
            return True
        if r.generated >= r.params.max_tokens:
            self._finish(r, "length")
            return True
        text = r.stream.ready()
        if text:
            r.emit(Event(text=text))
        return False

    def _finish(self, r: Request, reason: str, error: Exception | None = None) -> None:
        n = r.generated
        text = r.stream.ready(final=True) if r.stream is not None and error is None else ""
        if self.metrics is not None:
            self.metrics.finished(reason, len(r.prompt), n, r.first_at, time.perf_counter())
        r.cache = None
        r.emit(Event(text=text, finish_reason=reason, prompt_tokens=len(r.prompt), completion_tokens=n, error=error))

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.queue.set(len(self.waiting))
            self.metrics.batch.set(len(self.running))
            if self.registry is not None:
                self.metrics.adapters.set(len(self.registry.device))
