"""Packing: several short sft / lm examples per row, with no attention or loss across their boundaries.

A packed row is the concatenation of whole examples (never split), at most `max_length` tokens:

    input_ids     [a0 a1 a2 b0 b1 c0 c1 c2 c3]
    position_ids  [ 0  1  2  0  1  0  1  2  3]     each example's positions restart at 0
    labels        [-100 a1 a2 -100 b1 -100 c1 c2 c3]

The first label of every example is -100: a causal LM predicts token t+1 from token t, so in a
row the last token of `a` would otherwise be trained to predict `b`'s first token, a pair that
never occurs in the data; alone, an example's first label is never predicted either. With the
restarting positions (RoPE / learned positions see what they see for the example alone) and a
block-diagonal causal mask (`block_causal_mask`), each token attends only to the earlier tokens
of its own example, so a packed batch's loss (mean over its loss tokens) is the token-weighted
mean of the examples' losses computed one by one.

The mask is explicit because a Hugging Face model does not isolate examples from restarting
`position_ids` alone under the sdpa and eager attention implementations: transformers infers
packed sequences from `position_ids` only when no attention mask and no cache is given, and a
causal LM creates a cache whenever its config says `use_cache` (the default). A 4-D mask is
used as given by the eager and sdpa implementations (the flash-attention ones take no 4-D
mask: for them, packed rows go without `attention_mask`, isolated by `position_ids` alone).
The mask costs B * T * T elements per batch: 32 MiB in float32 for 8 rows of 1024 tokens.

`PadCollator` builds the mask for examples that carry `position_ids`.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from lorakit.data.examples import IGNORE_INDEX
from lorakit.errors import ConfigError


def pack_examples(examples: Sequence[Mapping[str, Any]], max_length: int) -> list[dict[str, Any]]:
    """Pack tokenized sft / lm examples into rows of at most `max_length` tokens.

    Rows are filled best-fit, longest example first (few, full rows); inside a row the
    examples keep their original order. Deterministic: the same examples give the same rows.

    Args:
        examples: from `build_examples` for task sft or lm (`input_ids` and `labels` lists of
            equal length), each at most `max_length` tokens (`build_examples` truncates them).
        max_length: the longest row.

    Returns:
        Rows with `input_ids`, `labels` and `position_ids` lists (see the module docstring).

    Raises:
        ConfigError: an example has no token-level labels (classification or regression
            examples cannot be packed) or is longer than `max_length`, or max_length < 1.
    """
    if max_length < 1:
        raise ConfigError(f"--max-length must be positive to pack examples, got {max_length}.")
    lengths = []
    for i, ex in enumerate(examples):
        labels = ex.get("labels")
        if not isinstance(labels, (list, tuple)) or len(labels) != len(ex["input_ids"]):
            raise ConfigError(
                f"Example {i} has no per-token labels, so it cannot be packed: --packing fits the sft "
                f"and lm tasks only."
            )
        if len(ex["input_ids"]) > max_length:
            raise ConfigError(
                f"Example {i} has {len(ex['input_ids'])} tokens, more than the packed row length "
                f"{max_length}. Tokenize with the same --max-length as the packing."
            )
        lengths.append(len(ex["input_ids"]))

    # Best fit, longest first: each example goes to the open row with the least room that
    # still holds it. `room` is sorted as (free tokens, row index) so bisect finds that row.
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []
    for i in sorted(range(len(examples)), key=lambda k: (-lengths[k], k)):
        at = bisect.bisect_left(room, (lengths[i], -1))
        if at == len(room):
            rows.append([i])
            free, row = max_length - lengths[i], len(rows) - 1
        else:
            free, row = room.pop(at)
            rows[row].append(i)
            free -= lengths[i]
        if free > 0:
            bisect.insort(room, (free, row))

    packed = []
    for members in sorted(rows, key=min):
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for i in sorted(members):
            ex = examples[i]
            ids += ex["input_ids"]
            labels += [IGNORE_INDEX, *ex["labels"][1:]]
            positions += range(len(ex["input_ids"]))
        packed.append({"input_ids": ids, "labels": labels, "position_ids": positions})
    return packed


def block_causal_mask(position_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The additive 4-D attention mask of packed rows: causal inside each example, closed across.

    Args:
        position_ids: (B, T) long; an example starts wherever the position is 0 (so each
            padding token, at position 0, is its own one-token example and attends to itself).
        dtype: the mask's float dtype (the attention scores' dtype, or autocast's).

    Returns:
        (B, 1, T, T) tensor, 0 where query t may attend to key s (same example, s <= t) and the
        dtype's lowest value elsewhere, as transformers' eager and sdpa attention add it.
    """
    example = (position_ids == 0).cumsum(dim=1)  # (B, T): which example of the row a token is in
    same = example[:, :, None] == example[:, None, :]  # (B, T, T)
    t = position_ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=position_ids.device).tril()
    allowed = same & causal
    mask = torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]
