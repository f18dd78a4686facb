"""`PadCollator`: a list of examples -> a batch of tensors, padded to the longest in the batch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from lorakit.data.examples import IGNORE_INDEX
from lorakit.data.packing import block_causal_mask
from lorakit.errors import ConfigError


class PadCollator:
    """Pad a batch of examples (from `build_examples`) to its longest sequence.

    Output, for a batch of B examples padded to length T:
        input_ids      (B, T) long, `pad_token_id` in the padding
        attention_mask (B, T) long, 1 on real tokens, 0 on padding
        token_type_ids (B, T) long, 0 in the padding (only if the examples have them)
        position_ids   (B, T) long, 0 in the padding (only for packed rows, from
                       `pack_examples`); their attention_mask is then the 4-D block-diagonal
                       causal mask (B, 1, T, T) of `block_causal_mask`, in `mask_dtype`
        labels         (B, T) long with -100 in the padding for sft / lm examples;
                       (B,) long for classification; (B,) float32 for regression
        Any other key is dropped.

    Args:
        pad_token_id: the tokenizer's pad id (never trained on: masked out of attention and
            loss, so any id works, e.g. EOS for GPT-2).
        pad_to_multiple_of: round T up to a multiple of this (8 suits tensor cores); None
            pads to the longest only.
        padding_side: "right" (training) or "left" (batched generation, so every prompt
            ends at the last position).
        mask_dtype: dtype of the 4-D mask of packed rows (autocast casts it for attention).

    Raises:
        ConfigError: pad_token_id is None, or an unknown padding_side / bad multiple.
    """

    def __init__(
        self,
        pad_token_id: int | None,
        pad_to_multiple_of: int | None = None,
        padding_side: str = "right",
        mask_dtype: torch.dtype = torch.float32,
    ) -> None:
        if pad_token_id is None:
            raise ConfigError(
                "The tokenizer has no pad token, which batching needs. Set one, e.g. "
                "`tokenizer.pad_token = tokenizer.eos_token` (padding is masked out of "
                "attention and loss, so reusing EOS is safe)."
            )
        if padding_side not in ("right", "left"):
            raise ConfigError(f"padding_side must be 'right' or 'left', got {padding_side!r}.")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ConfigError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}.")
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.padding_side = padding_side
        self.mask_dtype = mask_dtype

    def __call__(self, examples: Sequence[Mapping[str, Any]], pad_to: int | None = None) -> dict[str, torch.Tensor]:
        """Collate `examples`; `pad_to` pads to exactly that length instead (fixed shapes, e.g. for a
        captured step), which must hold the longest example."""
        if not examples:
            raise ConfigError("Cannot collate an empty batch.")
        longest = max(len(ex["input_ids"]) for ex in examples)
        m = self.pad_to_multiple_of
        width = -(-longest // m) * m if m else longest
        if pad_to is not None:
            if pad_to < longest:
                raise ConfigError(f"pad_to={pad_to} is shorter than the longest example ({longest} tokens).")
            width = pad_to

        batch = {
            "input_ids": self._pad([ex["input_ids"] for ex in examples], width, self.pad_token_id),
            "attention_mask": self._pad([[1] * len(ex["input_ids"]) for ex in examples], width, 0),
        }
        if "position_ids" in examples[0]:
            positions = self._pad([ex["position_ids"] for ex in examples], width, 0)
            batch["position_ids"] = positions
            batch["attention_mask"] = block_causal_mask(positions, self.mask_dtype)
        if "token_type_ids" in examples[0]:
            batch["token_type_ids"] = self._pad([ex["token_type_ids"] for ex in examples], width, 0)
        if "labels" in examples[0]:
            first = examples[0]["labels"]
            if isinstance(first, (list, tuple)):
                batch["labels"] = self._pad([ex["labels"] for ex in examples], width, IGNORE_INDEX)
            elif isinstance(first, float):
                batch["labels"] = torch.tensor(
                    [ex["labels"] for ex in examples], dtype=torch.float32
                )
            else:
                batch["labels"] = torch.tensor([ex["labels"] for ex in examples], dtype=torch.long)
        return batch

    def _pad(self, rows: list[Sequence[int]], width: int, value: int) -> torch.Tensor:
        out = torch.full((len(rows), width), value, dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row)
            if n == 0:
                continue
            if self.padding_side == "right":
                out[i, :n] = torch.as_tensor(row, dtype=torch.long)
            else:
                out[i, width - n :] = torch.as_tensor(row, dtype=torch.long)
        return out
