"""`LoraConfig`: what to adapt and how. One typed dataclass, round-trips through JSON.

The field names are lorakit's; `to_peft_dict` / `from_peft_dict` translate to and from the
`adapter_config.json` that Hugging Face PEFT writes, so files move freely between the two.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

INITS = ("kaiming", "gaussian", "pissa", "zeros")
BIASES = ("none", "all", "lora_only")


@dataclass
class LoraConfig:
    """How to adapt a model with LoRA.

    Args:
        r: rank of the update `B @ A` (A is (r, in), B is (out, r)).
        alpha: scaling numerator: the update is multiplied by `alpha / r` (`alpha / sqrt(r)` with rslora).
        dropout: dropout probability applied to the LoRA input (the base path never sees it).
        targets: which modules to adapt. A list of names matches a module whose full name equals
            the entry or ends with "." + entry (PEFT's rule); a single string is a regular
            expression that must match the whole module name; "all-linear" adapts every linear
            layer (nn.Linear, GPT-2's Conv1D) except the model's output head.
        exclude: modules never to adapt, with the same rules as `targets`.
        init: "kaiming" (A ~ kaiming-uniform, B = 0, as loralib and PEFT), "gaussian"
            (A ~ N(0, (1/r)^2), B = 0, as the paper and PEFT), "pissa" (A, B from the top-r SVD of W,
            the base weight replaced by the residual so the output is unchanged), or "zeros"
            (A = B = 0; the adapter is filled by a later load).
        rslora: scale by alpha / sqrt(r) instead of alpha / r (Kalajdzievski 2023).
        bias: "none" (no bias trains), "all" (every bias of the model trains) or
            "lora_only" (the biases of adapted modules train). Trained biases are saved with the adapter.
        rank_pattern: per-module rank overrides, {regex: r}; a key matches a module whose name
            ends with it (PEFT's rule: `re.match(rf"(.*\\.)?({key})$", name)`).
        alpha_pattern: per-module alpha overrides, same matching.
        slices: per-slice LoRA on fused projections, {name pattern: [bool, ...]}: the module's
            output is split into len(list) equal slices and only the True ones get an update
            (GPT-2's `c_attn` with `[True, False, True]` adapts q and v, as loralib's MergedLinear).
        modules_to_save: modules (same matching as `targets`) that train fully and are saved with the
            adapter, e.g. a newly initialized classification head.
    """

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    targets: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    exclude: list[str] | str | None = None
    init: str = "kaiming"
    rslora: bool = False
    bias: str = "none"
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    slices: dict[str, list[bool]] = field(default_factory=dict)
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.targets, tuple):
            self.targets = list(self.targets)
        if isinstance(self.exclude, tuple):
            self.exclude = list(self.exclude)
        _check_rank(self.r, "r")
        for key, rank in self.rank_pattern.items():
            _check_rank(rank, f"rank_pattern[{key!r}]")
        if not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ConfigError(f"alpha must be a positive number, got {self.alpha!r}. The usual choice is 2 * r.")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}.")
        if self.init not in INITS:
            raise ConfigError(f"init must be one of {', '.join(INITS)}; got {self.init!r}.")
        if self.bias not in BIASES:
            raise ConfigError(f"bias must be one of {', '.join(BIASES)}; got {self.bias!r}.")
        if isinstance(self.targets, str):
            _check_regex(self.targets, "targets")
        elif not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise ConfigError(
                f"targets must be a non-empty list of module names, a regex string, or 'all-linear'; "
                f"got {self.targets!r}."
            )
        if isinstance(self.exclude, str):
            _check_regex(self.exclude, "exclude")
        for pattern in (*self.rank_pattern, *self.alpha_pattern, *self.slices):
            _check_regex(pattern, "a pattern key")
        for key, mask in self.slices.items():
            if not mask or not all(isinstance(m, bool) for m in mask) or not any(mask):
                raise ConfigError(
                    f"slices[{key!r}] must be a list of booleans with at least one True (one per fused "
                    f"projection, e.g. [True, False, True] for q and v of GPT-2's c_attn); got {mask!r}."
                )

    # -- per-module resolution -------------------------------------------------------------
    def rank_for(self, name: str) -> int:
        """The rank of module `name`, after `rank_pattern`."""
        key = pattern_key(self.rank_pattern, name)
        return int(self.rank_pattern[key]) if key is not None else self.r

    def alpha_for(self, name: str) -> float:
        """The alpha of module `name`, after `alpha_pattern`."""
        key = pattern_key(self.alpha_pattern, name)
        return float(self.alpha_pattern[key]) if key is not None else float(self.alpha)

    def slices_for(self, name: str) -> list[bool] | None:
        """The slice mask of module `name`, or None for an ordinary (full-width) adapter."""
        key = pattern_key(self.slices, name)
        return list(self.slices[key]) if key is not None else None

    def scale_for(self, name: str) -> float:
        """The multiplier of `B @ A` for module `name`."""
        return scaling(self.alpha_for(name), self.rank_for(name), self.rslora)

    # -- serialization -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LoraConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"Unknown LoraConfig fields {unknown}; known fields are {sorted(known)}.")
        return cls(**data)


def scaling(alpha: float, r: int, rslora: bool) -> float:
    """alpha / r, or alpha / sqrt(r) for rank-stabilized LoRA."""
    return float(alpha) / (math.sqrt(r) if rslora else r)


def pattern_key(patterns: dict[str, Any], name: str) -> str | None:
    """The first key of `patterns` that matches module `name` by PEFT's suffix rule, or None."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def name_matches(spec: list[str] | str, name: str) -> bool:
    """PEFT's target rule: a string is a full-match regex; a list matches equal names or dotted suffixes."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def _check_rank(r: Any, what: str) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ConfigError(f"{what} must be a positive integer, got {r!r}. Typical ranks are 4 to 64.")


def _check_regex(pattern: str, what: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"{what} {pattern!r} is not a valid regular expression: {exc}.") from exc
