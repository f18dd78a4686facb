"""Per-request token choice and text: sampling settings, seeded draws, stop strings, incremental detokenization."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..fast.decode import sampling_probs


@dataclass
class SamplingParams:
    """What one request asks for. temperature 0 (below 1e-5) is greedy (the most likely token, as `lk.greedy_decode`);
    top_k 0 keeps every token; `seed` makes the draws of one request repeatable."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5  # logits divided by less overflow


def generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """The request's own generator (its draws do not depend on other requests), None when greedy."""
    if params.greedy:
        return None
    g = torch.Generator(device=device)
    if params.seed is None:
        g.seed()
    else:
        g.manual_seed(params.seed)
    return g


def draw(logits: Tensor, params: SamplingParams, g: torch.Generator) -> int:
    """One token from `logits` (vocab,), as `lk.Decoder(do_sample=True)` filters them, drawn with `g`."""
    probs, order = sampling_probs(logits[None], params.temperature, params.top_k, params.top_p)
    return int(order[0, torch.multinomial(probs[0], 1, generator=g)])


class TextStream:
    """The text of a request's new tokens as it grows, and how much of it is safe to send.

    Tokens are decoded a few at a time: each new token is decoded with the tokens since the last complete
    piece of text (so that tokenizers which drop or merge spaces at the start of a decode see the same
    context), and text is added once its characters are complete. Text that could still be the start of a
    stop string is held back until the next token decides it."""

    def __init__(self, tokenizer, stop: list[str]) -> None:
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0  # characters of `text` already handed out
        self._prefix = 0  # ids[_prefix:_read] decode to the end of `text`; ids[_read:] are not in it yet
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _catch_up(self, final: bool = False) -> None:
        """Add the text of the tokens not in `text` yet, unless it ends in an unfinished character."""
        if self._read == len(self.ids):
            return
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(self.ids)

    def add(self, token: int) -> bool:
        """Take one token; True when a stop string appeared (the text is cut before it)."""
        self.ids.append(token)
        start = len(self.text)
        self._catch_up()
        return self._cut(start)

    def _cut(self, start: int) -> bool:
        """Look for stop strings in text added from `start` on (with what came before, for one that straddles)."""
        hits = [i for i in (self.text.find(s, max(0, start - len(s) + 1)) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            return True
        return False

    def ready(self, final: bool = False) -> str:
        """The text not handed out yet that no later token can change (all of it when `final`)."""
        if final:
            start = len(self.text)
            self._catch_up(final=True)
            self._cut(start)
        end = len(self.text)
        if not final:
            held = 0
            for s in self.stop:
                held = max([held] + [k for k in range(1, min(len(s) - 1, end) + 1)
                                     if self.text.endswith(s[:k], 0, end)])
            end -= held
        out = self.text[self.sent:max(end, self.sent)]
        self.sent = max(end, self.sent)
        return out
