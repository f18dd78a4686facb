"""Greedy decoding and sampling with a static KV cache; on a GPU every token after the first is one CUDA graph
replay.

Token-by-token decode through `model.generate` is bound by the host: each token runs the whole
model op by op from Python, and an unmerged adapter adds a launch per adapted linear
(BENCHMARKS.md, inference). Here the prompt is read eagerly (the prefill), and the decode step
(forward on one token, greedy pick, next position) is recorded once and replayed for every
token, so the host enqueues one launch a token. The tokens are those of
`model.generate(input_ids, attention_mask=..., do_sample=False, max_new_tokens=n)`; rows that
reach an end-of-sequence token continue with padding, and decoding stops once every row has.

    decoder = lk.Decoder(model)                 # reuse it across batches: one graph per batch shape
    out = decoder(enc["input_ids"], enc["attention_mask"], max_new_tokens=64)
    out = decoder(enc["input_ids"], enc["attention_mask"], max_new_tokens=64, do_sample=True, top_p=0.9)

With `do_sample=True` each token is drawn as `model.generate(do_sample=True)` draws it: the logits divided
by the temperature, cut to the top_k most likely tokens, then to the smallest set whose probability
reaches top_p, then to those at least min_p times as likely as the most likely (each setting from the
call, else the model's generation config, else transformers' default: 1.0, 50, 1.0, none). The
distribution is generate's; the draws, from torch's default generator (`torch.manual_seed`), are not the
same draws as generate's.

What it needs: a Hugging Face causal LM that runs on transformers' `StaticCache` (Llama, GPT-2,
Qwen2, Mistral, ...), prompts padded on the left, and nothing that changes the adapters
(`set_adapter`, `merge`, loading) between calls of one decoder: a captured step replays the
kernels it recorded. Per-prompt adapters (as `lk.route` mixes them) are the call's `adapters=`:
the decoder then keeps every adapter of each adapted linear stacked (a copy, held as long as the
decoder), and one step captured per batch size serves every mix of names; a changed adapter
tensor (its version moves) is stacked and captured again. `decode_unsupported(model, gen_kwargs)`
says why a call would not fit.
Off CUDA (or with cuda_graphs="off") the same steps run eagerly. `GreedyDecoder` is the same class.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

from ..errors import ConfigError, GraphError

# Generation settings that do not change a greedy pick (or that the call sets itself).
_NEUTRAL = {"bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "max_length", "max_new_tokens",
            "do_sample", "temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff",
            "transformers_version", "_from_model_config", "use_cache", "cache_implementation", "renormalize_logits",
            "return_dict_in_generate", "output_scores", "output_logits", "output_attentions",
            "output_hidden_states", "num_beams", "compile_config", "disable_compile"}
_CALL_KEYS = {"max_new_tokens", "pad_token_id", "eos_token_id"}
_SAMPLING_KEYS = {"temperature", "top_k", "top_p", "min_p"}
# generation settings of sampling that the decoder does not apply (greedy picks ignore them)
_OTHER_SAMPLING = {"typical_p", "epsilon_cutoff", "eta_cutoff"}
# transformers' values for what neither the call nor the model's generation config sets
_SAMPLING_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0, "min_p": 0.0}
# the replays between two reads of "has every row ended?" (each read waits for the GPU)
_CHECK_EVERY = 8


def decode_unsupported(model: nn.Module, gen_kwargs: Mapping[str, Any] | None = None) -> str | None:
    """Why `Decoder` would not decode like `model.generate(**gen_kwargs)`, or None when it would."""
    gen_kwargs = dict(gen_kwargs or {})
    sample = bool(gen_kwargs.pop("do_sample", False))
    if int(gen_kwargs.pop("num_beams", 1)) != 1:
        return "beam search"
    extra = set(gen_kwargs) - _CALL_KEYS - (_SAMPLING_KEYS if sample else set())
    if extra:
        return f"generate() arguments {sorted(extra)}"
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "generation_config") or not hasattr(model, "generate"):
        return "not a Hugging Face generative model"
    if getattr(config, "is_encoder_decoder", False):
        return "an encoder-decoder model"
    if not getattr(model, "_can_compile_fullgraph", False):
        return f"{type(model).__name__} has no static KV cache support"
    from transformers import GenerationConfig

    default = GenerationConfig().to_dict()
    resolved = getattr(GenerationConfig, "_get_default_generation_params", dict)()  # what generate puts for None
    neutral = _NEUTRAL - _OTHER_SAMPLING if sample else _NEUTRAL
    changed = sorted(k for k, v in model.generation_config.to_dict().items()
                     if k not in neutral and default.get(k, v) != v and not (k in resolved and resolved[k] == v))
    if changed:
        return f"the model's generation config sets {changed}"
    if any(getattr(m, "routing", None) is not None for m in model.modules()):
        return "adapters routed per example (lk.route)"
    from transformers import StaticCache
    from transformers.cache_utils import StaticLayer

    # (layers allocate their tensors on first use: this builds none)
    kinds = {type(layer).__name__ for layer in StaticCache(config=config, max_cache_len=1).layers
             if type(layer) is not StaticLayer}
    if kinds:  # e.g. sliding-window layers, which keep a write position on the host
        return f"cache layers of kind {sorted(kinds)}"
    return None


class _Pins:
    """What routed steps (`adapters=`) read, kept across calls: every adapter of each adapted linear stacked once,
    and per batch size and list of adapter names one rows tensor (each prompt's index into the stack, -1 for
    the base model), rewritten in place by every call. `generation` moves whenever a stack or a rows tensor is
    made anew: the steps captured before it read tensors that are no longer used."""

    def __init__(self, model: nn.Module) -> None:
        from ..layers import LoraLinear

        self.layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
        self.stacks: dict[int, tuple[list, list[Tensor], list[int], tuple[Tensor, Tensor, Tensor]]] = {}
        self.rows: dict[tuple[tuple[str, ...], int], Tensor] = {}
        self.generation = 0

    def pin(self, names: list[str | None], device: torch.device) -> None:
        """Point every adapted linear at its stack and at the rows of this batch's `names` (written here)."""
        from . import state_of
        from .dispatch import stack

        batch, wanted = len(names), {}
        for layer in self.layers:
            adapters = list(layer.adapters.values())
            if not adapters:
                continue
            tensors = [t for a in adapters for t in (a.lora_A, a.lora_B)]
            entry = self.stacks.get(id(layer))
            if entry is None or entry[0] != adapters or any(a is not b for a, b in zip(entry[1], tensors)) \
                    or [t._version for t in tensors] != entry[2]:
                entry = self.stacks[id(layer)] = (adapters, tensors, [t._version for t in tensors],
                                                  stack(layer, adapters))
                self.generation += 1
            key = (tuple(layer.adapters), batch)
            rows = self.rows.get(key)
            if rows is None:
                rows = self.rows[key] = torch.empty(batch, dtype=torch.long, device=device)
                self.generation += 1
            wanted[key] = rows
            state_of(layer).pins[layer] = (rows, entry[3])
        for (order, _), rows in wanted.items():
            rows.copy_(torch.tensor([order.index(n) if n in order else -1 for n in names], dtype=torch.long))

    def unpin(self) -> None:
        from . import state_of

        for layer in self.layers:
            state_of(layer).pins.pop(layer, None)


class _Session:
    """The static state of one batch shape: KV cache, step inputs, outputs, and the captured step."""

    def __init__(self, model: nn.Module, batch: int, cache_len: int, device: torch.device,
                 sample: bool = False) -> None:
        from transformers import StaticCache

        self.model, self.cache_len, self.sample = model, cache_len, sample
        self.cache = StaticCache(config=model.config, max_cache_len=cache_len)  # layers: `decode_unsupported`
        long = dict(dtype=torch.long, device=device)
        self.mask = torch.ones(batch, cache_len, **long)
        self.tok = torch.zeros(batch, 1, **long)         # the last token, fed to the next step
        self.pos = torch.zeros(1, **long)                # its cache position
        self.positions = torch.zeros(batch, 1, **long)   # its position id (cache position less left padding)
        self.out = torch.zeros(batch, cache_len, **long)  # the tokens, by cache position
        self.done = torch.zeros(batch, dtype=torch.bool, device=device)
        self.eos = torch.zeros(0, **long)
        self.pad = torch.zeros((), **long)
        # sampling settings, read by the captured step (a call writes its own)
        self.temperature = torch.ones((), device=device)
        self.top_k = torch.zeros((), **long)
        self.top_p = torch.ones((), device=device)
        self.min_p = torch.zeros((), device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.generation = 0  # of the decoder's `_Pins` when a routed step was captured

    def prefill(self, input_ids: Tensor, attention_mask: Tensor, eos: Tensor, pad: Tensor) -> None:
        """Read the prompt into the cache and pick the first new token (eagerly)."""
        P = input_ids.shape[1]
        self.cache.reset()
        self.mask[:, :P].copy_(attention_mask)
        self.mask[:, P:].fill_(1)
        positions = (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)
        logits = self.model(input_ids=input_ids, attention_mask=self.mask, position_ids=positions,
                            past_key_values=self.cache, cache_position=torch.arange(P, device=input_ids.device),
                            use_cache=True, **_last_logits(self.model)).logits
        if self.eos.shape != eos.shape:  # other end tokens than the captured step compares with: capture again
            self.eos, self.graph = eos.clone(), None
        self.eos.copy_(eos)
        self.pad.copy_(pad)
        self.done.zero_()
        self.pos.fill_(P - 1)
        self.positions.copy_(positions[:, -1:])
        self._pick(logits[:, -1])

    def step(self) -> None:
        """One token: forward the last one, pick the next (padding once a row has ended)."""
        logits = self.model(input_ids=self.tok, attention_mask=self.mask, position_ids=self.positions,
                            past_key_values=self.cache, cache_position=self.pos, use_cache=True).logits
        self._pick(logits[:, -1])

    def _pick(self, logits: Tensor) -> None:
        pick = sample_tokens(logits, self.temperature, self.top_k, self.top_p, self.min_p) if self.sample \
            else logits.argmax(-1)
        nxt = torch.where(self.done, self.pad, pick)
        self.pos.add_(1)
        self.positions.add_(1)
        self.out.index_copy_(1, self.pos, nxt[:, None])
        self.done |= (nxt[:, None] == self.eos).any(1)
        self.tok.copy_(nxt[:, None])

    def capture(self, input_ids: Tensor, attention_mask: Tensor, eos: Tensor, pad: Tensor) -> None:
        """Record `step` after warm-up steps (kernels compile and tune); the cache is read in again after."""
        from .graphs import _warm_up

        device = self.tok.device
        _warm_up(device, self.step, 2)
        torch.cuda.empty_cache()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.step()
        except RuntimeError as e:
            raise GraphError(f"the decode step could not be captured as a CUDA graph ({str(e).splitlines()[0]}); "
                             "decode eagerly instead (cuda_graphs='off').") from e
        self.graph = graph
        # the warm-up and the capture moved the cache on: read the prompt in again
        self.prefill(input_ids, attention_mask, eos, pad)


def sample_tokens(logits: Tensor, temperature: Tensor | float, top_k: Tensor | int, top_p: Tensor | float,
                  min_p: Tensor | float = 0.0) -> Tensor:
    """One token per row of `logits` (batch, vocab), drawn as `model.generate(do_sample=True)` draws it (see
    `sampling_probs`), from torch's default generator. No host sync (the settings may be 0-d tensors): a CUDA
    graph can record it."""
    probs, order = sampling_probs(logits, temperature, top_k, top_p, min_p)
    # p / E with E ~ Exp(1) is largest for token i with probability p_i / sum(p) (the exponential race)
    race = probs / torch.empty_like(probs).exponential_().clamp_min_(1e-30)
    return order.gather(-1, race.argmax(-1, keepdim=True)).squeeze(-1)


def sampling_probs(logits: Tensor, temperature: Tensor | float, top_k: Tensor | int, top_p: Tensor | float,
                   min_p: Tensor | float = 0.0) -> tuple[Tensor, Tensor]:
    """(probs, order): the probabilities `model.generate(do_sample=True)` samples from, by token in `order` (most
    likely first), not normalized. The logits are divided by `temperature`; the `top_k` most likely are kept
    (0: all); of those, each whose more likely ones' probabilities sum to less than `top_p` (the first
    always); of those, each at least `min_p` times as likely as the first (0: all)."""
    scores, order = (logits.float() / temperature).sort(-1, descending=True)
    vocab = scores.shape[-1]
    rank = torch.arange(vocab, device=logits.device)
    k = torch.as_tensor(top_k, device=logits.device)
    scores = scores.masked_fill(rank >= torch.where(k > 0, k, vocab), float("-inf"))
    probs = scores.softmax(-1)
    probs = probs.masked_fill(probs.cumsum(-1) - probs >= top_p, 0.0)
    return probs.masked_fill(probs < min_p * probs[..., :1], 0.0), order


def _last_logits(model: nn.Module) -> dict:
    """`logits_to_keep=1` where the model takes it: the prefill needs the last position's logits only."""
    import inspect

    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


class Decoder:
    """`decoder(input_ids, attention_mask, max_new_tokens) -> ids`: greedy decode, as `model.generate`
    with `do_sample=False` returns it (prompt, then the new tokens), or with `do_sample=True` sampling
    as `model.generate(do_sample=True)` samples. See the module docstring.

    Args:
        model: a Hugging Face causal LM (adapters injected or not), in eval mode on its device.
        cuda_graphs: "auto" (on CUDA: capture each batch shape's step, and decode eagerly where a
            capture fails), "on" (a failed capture raises GraphError), "off" (eager steps).
        cache_multiple: KV cache lengths are rounded up to this, so that batches of nearby lengths
            share one captured step.
    """

    def __init__(self, model: nn.Module, cuda_graphs: str | bool = "auto", cache_multiple: int = 64) -> None:
        why = decode_unsupported(model)
        if why is not None:
            raise ConfigError(f"{type(self).__name__} cannot decode this model: {why}. "
                              "Use model.generate(...) instead.")
        mode = {True: "on", False: "off"}.get(cuda_graphs, cuda_graphs)
        if mode not in ("auto", "on", "off"):
            raise ConfigError(f"cuda_graphs={cuda_graphs!r}: use 'auto', 'on' or 'off'.")
        self.model, self.mode, self.cache_multiple = model, mode, int(cache_multiple)
        self._sessions: dict[tuple[int, int, bool, bool], _Session] = {}
        self._pins: _Pins | None = None
        #: why the last call decoded eagerly on CUDA (a failed capture under "auto"), else None
        self.eager_reason: str | None = None

    @torch.no_grad()
    def __call__(self, input_ids: Tensor, attention_mask: Tensor | None = None, max_new_tokens: int = 32,
                 eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
                 adapters: list[str | None] | None = None, do_sample: bool = False, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, min_p: float | None = None) -> Tensor:
        """Prompts (batch, length), padded on the left -> (batch, length + new tokens).

        `adapters`: one adapter name (None: the base model) per prompt, as `lk.route` takes them. One step is
        captured per batch size for every routing (see the module docstring).
        `do_sample`: draw each token (see the module docstring); `temperature`, `top_k`, `top_p`, `min_p` as
        `model.generate` takes them, None for the model's generation config (else 1.0, 50, 1.0, none). One
        step is captured per batch size for all settings.
        """
        from ..layers import LoraLayer

        if any(m.routing is not None for m in self.model.modules() if isinstance(m, LoraLayer)):
            raise ConfigError(f"{type(self).__name__} was called inside lk.route(...): pass the names as "
                              "adapters=[...] instead (a captured step must not outlive the routing it recorded).")
        sampling = self._sampling(temperature, top_k, top_p, min_p) if do_sample else None
        if adapters is not None:
            from ..inject import route

            if len(adapters) != input_ids.shape[0]:
                raise ConfigError(f"adapters= names {len(adapters)} adapters for {input_ids.shape[0]} prompts; "
                                  "give one name (or None for the base model) per prompt.")
            if self._pins is None:
                self._pins = _Pins(self.model)
            with route(self.model, list(adapters)):
                try:
                    self._pins.pin(list(adapters), input_ids.device)
                    return self._decode(input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id, True,
                                        sampling)
                finally:
                    self._pins.unpin()
        return self._decode(input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id, False, sampling)

    def _sampling(self, temperature, top_k, top_p, min_p) -> tuple[float, int, float, float]:
        """(temperature, top_k, top_p, min_p) of a sampling call: the call's, else the generation config's, else
        transformers' defaults; checked."""
        gc = self.model.generation_config
        given = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "min_p": min_p}
        got = {k: v if v is not None else getattr(gc, k, None) for k, v in given.items()}
        t, k, p, m = (got[n] if got[n] is not None else _SAMPLING_DEFAULTS[n] for n in given)
        if not float(t) > 0:
            raise ConfigError(f"temperature={t}: sampling needs a temperature > 0 (for the most likely token, "
                              "decode greedily: do_sample=False).")
        if int(k) != k or k < 0:
            raise ConfigError(f"top_k={k}: give a whole number >= 0 (0 keeps every token).")
        if not 0 < float(p) <= 1:
            raise ConfigError(f"top_p={p}: give a probability in (0, 1] (1 keeps every token).")
        if not 0 <= float(m) <= 1:
            raise ConfigError(f"min_p={m}: give a fraction in [0, 1] (0 keeps every token).")
        return float(t), int(k), float(p), float(m)

    def _decode(self, input_ids: Tensor, attention_mask: Tensor | None, max_new_tokens: int, eos_token_id,
                pad_token_id, routed: bool, sampling: tuple[float, int, float, float] | None) -> Tensor:
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ConfigError(f"input_ids has shape {tuple(input_ids.shape)}; pass (batch, prompt length), "
                              "prompts padded on the left.")
        if max_new_tokens < 1:
            return input_ids
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        elif attention_mask.shape != input_ids.shape:
            raise ConfigError(f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids "
                              f"{tuple(input_ids.shape)}; they must match.")
        elif attention_mask.shape[1] > 1 and not bool(attention_mask[:, -1].all()):
            raise ConfigError("some prompt ends in padding: pad on the left (tokenizer.padding_side = 'left').")
        batch, P = input_ids.shape
        device = input_ids.device
        eos, pad = self._special_tokens(eos_token_id, pad_token_id, device)
        cache_len = -(-(P + max_new_tokens) // self.cache_multiple) * self.cache_multiple
        config = self.model.config
        limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        if limit:
            cache_len = max(min(cache_len, limit), P + max_new_tokens)
        session = self._session(batch, cache_len, P + max_new_tokens, device, routed, sampling is not None)
        if sampling is not None:
            for held, value in zip((session.temperature, session.top_k, session.top_p, session.min_p), sampling):
                held.fill_(value)
        session.prefill(input_ids, attention_mask, eos, pad)
        generation = self._pins.generation if routed else 0
        if session.generation != generation:
            session.graph = None  # recorded with adapter stacks made anew since
        if session.graph is None and self._graphs(device):
            try:
                session.capture(input_ids, attention_mask, eos, pad)
                session.generation = generation
            except GraphError as e:
                if self.mode == "on":
                    raise
                self.eager_reason, self.mode = str(e), "off"
        return self._steps(session, input_ids, max_new_tokens, eos)

    def _steps(self, session: _Session, input_ids: Tensor, max_new_tokens: int, eos: Tensor) -> Tensor:
        P = input_ids.shape[1]
        new = 1
        while new < max_new_tokens:
            if new % _CHECK_EVERY == 1 and bool(session.done.all()):
                break
            if session.graph is not None:
                session.graph.replay()
            else:
                session.step()
            new += 1
        gen = session.out[:, P:P + new]
        return torch.cat([input_ids, _trim(gen, session.done, eos)], 1)

    def _session(self, batch: int, cache_len: int, need: int, device: torch.device, routed: bool,
                 sample: bool) -> _Session:
        """A session of this batch size (routed or not, sampling or not) whose cache holds `need` positions and is
        at most twice as long (a longer cache costs a little attention, a new one a capture), else a new one of
        `cache_len`."""
        fits = [(n, s) for (b, n, r, d), s in self._sessions.items()
                if b == batch and r == routed and d == sample and need <= n <= 2 * need]
        if fits:
            return min(fits, key=lambda f: f[0])[1]
        session = self._sessions[(batch, cache_len, routed, sample)] = _Session(self.model, batch, cache_len, device,
                                                                                sample)
        return session

    def _graphs(self, device: torch.device) -> bool:
        return device.type == "cuda" and self.mode != "off"

    def _special_tokens(self, eos_token_id, pad_token_id, device: torch.device) -> tuple[Tensor, Tensor]:
        gc = self.model.generation_config
        eos = gc.eos_token_id if eos_token_id is None else eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        pad = gc.pad_token_id if pad_token_id is None else pad_token_id
        if pad is None:
            pad = eos[0] if eos else 0  # as generate does without a pad token
        return torch.tensor(eos, dtype=torch.long, device=device), torch.tensor(pad, dtype=torch.long, device=device)


def _trim(gen: Tensor, done: Tensor, eos: Tensor) -> Tensor:
    """The new tokens up to the step where the last row ended (generate stops there), all of them where a row
    has not ended. Steps run past it (ends are read every few steps) only added padding."""
    if gen.shape[1] == 0 or eos.numel() == 0 or not bool(done.all()):
        return gen
    ended = (gen[:, :, None] == eos).any(-1)
    first = ended.float().argmax(1)  # each row's first end
    return gen[:, :int(first.max()) + 1]


GreedyDecoder = Decoder  # its name before it sampled too


def greedy_decode(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None, max_new_tokens: int = 32,
                  eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
                  cuda_graphs: str | bool = "auto") -> Tensor:
    """One batch through `Decoder(model, cuda_graphs)`: greedy decode with a static KV cache, the decode
    step replayed as a CUDA graph on a GPU. Returns what `model.generate(..., do_sample=False)` returns."""
    return Decoder(model, cuda_graphs)(input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id)
