"""The KV cache of the running decode batch: rows join and leave between steps.

`PaddedKV` keeps one transformers `DynamicCache` for the whole batch, every row padded on the left to
the longest one: keys and values of layer l are (batch, kv_heads, length, head_dim), row b's own
tokens in its last `lengths[b]` positions, zeros before them (masked out). A decode step feeds one
token per row with an attention mask (batch, length + 1) and explicit position ids, as
`model.generate` decodes a left-padded batch, so a row computes what it would compute alone.

Cost: a step appends one column (DynamicCache concatenates: a copy of the cache per layer); a row
that joins or leaves copies the cache once more (padding and cat, or index_select). Memory is
batch * longest row, not the sum of the rows: `fits` admits by that bound. A paged or static cache
can replace this class: the engine uses only what is below.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..errors import ConfigError


def check_model(model: nn.Module) -> None:
    """Raise ConfigError unless `model` is a causal LM whose cache layers are all plain `DynamicLayer`s (no
    sliding window, no linear attention), which `PaddedKV` pads and stacks."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False) or not hasattr(model, "generate"):
        raise ConfigError(f"{type(model).__name__} is not a Hugging Face decoder-only causal LM; lorakit serve "
                          "serves those (Llama, Qwen2, Mistral, GPT-2, ...).")
    kinds = {type(layer).__name__ for layer in DynamicCache(config=config).layers if type(layer) is not DynamicLayer}
    if kinds:
        raise ConfigError(f"{type(model).__name__} uses cache layers of kind {sorted(kinds)}, which lorakit serve "
                          "cannot batch yet; serve it with vLLM or SGLang.")


def new_cache(model: nn.Module):
    """An empty DynamicCache for one request's prefill."""
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def fits(totals: list[int], budget: int) -> bool:
    """Whether rows that may grow to `totals` tokens each fit a padded cache of `budget` token positions."""
    return not totals or len(totals) * max(totals) <= budget


class PaddedKV:
    """The cache of the running batch (see the module docstring). Rows are kept in join order."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.cache = None           # DynamicCache with every layer (batch, kv_heads, length, head_dim), or None
        self.lengths: list[int] = []  # each row's own tokens in the cache

    @property
    def length(self) -> int:
        return self.cache.layers[0].keys.shape[-2] if self.cache is not None else 0

    def add(self, source, row: int, length: int) -> None:
        """Append a row: row `row` of the DynamicCache `source` (a prefill's), its last `length` positions."""
        taken = [(layer.keys[row:row + 1, :, -length:], layer.values[row:row + 1, :, -length:])
                 for layer in source.layers]
        if self.cache is None:
            self.cache, self.lengths = new_cache(self.model), [length]
            for layer, (k, v) in zip(self.cache.layers, taken):
                layer.lazy_initialization(k, v)
                layer.keys, layer.values = k, v
            return
        L = max(self.length, length)
        for layer, (k, v) in zip(self.cache.layers, taken):
            layer.keys = torch.cat([_left_pad(layer.keys, L), _left_pad(k, L)])
            layer.values = torch.cat([_left_pad(layer.values, L), _left_pad(v, L)])
        self.lengths.append(length)

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows (indices into the batch, in order); drop padding no row needs any more."""
        if not rows:
            self.cache, self.lengths = None, []
            return
        self.lengths = [self.lengths[i] for i in rows]
        index = torch.tensor(rows, device=self.cache.layers[0].keys.device)
        cut = self.length - max(self.lengths)
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, cut:]
            layer.values = layer.values.index_select(0, index)[:, :, cut:]

    def step_inputs(self) -> tuple[Tensor, Tensor]:
        """(attention_mask (batch, length + 1), position_ids (batch, 1)) for feeding one new token per row."""
        device = self.cache.layers[0].keys.device
        lengths = torch.tensor(self.lengths, device=device)
        L = self.length
        mask = (torch.arange(L + 1, device=device) >= (L - lengths)[:, None]).long()
        return mask, lengths[:, None]

    def advance(self) -> None:
        """After a step: every row holds one token more (the cache grew by a column)."""
        self.lengths = [n + 1 for n in self.lengths]


def _left_pad(t: Tensor, length: int) -> Tensor:
    """(batch, heads, n, dim) -> (batch, heads, length, dim), zeros in front."""
    return F.pad(t, (0, 0, length - t.shape[-2], 0)) if t.shape[-2] < length else t
