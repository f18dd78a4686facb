"""`LoraConfig`: what to adapt and how. One typed dataclass, round-trips through JSON.

The field names are lorakit's; `to_peft_dict` / `from_peft_dict` translate to and from the
`adapter_config.json` that Hugging Face PEFT writes, so files move freely between the two.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

try:  # the regex parser of the standard library: re._parser from Python 3.11, sre_parse before
    from re import _parser
except ImportError:  # pragma: no cover - Python 3.10
    import sre_parse as _parser  # type: ignore[no-redef]

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
            layer (nn.Linear, GPT-2's Conv1D) except the model's output head. None (the default):
            the model family's usual targets, resolved by `inject` (PEFT's table: q_proj/v_proj for
            Llama-like decoders, query/value for BERT, c_attn for GPT-2, ...; see
            `lorakit.models.DEFAULT_TARGETS`), or none when `target_parameters` is given.
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
        target_parameters: parameters to adapt directly, PEFT's `target_parameters`: a name matches a
            parameter whose full name equals it or ends with "." + name, e.g.
            ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"] for the 3-D expert weights of a
            mixture-of-experts model (one rank-r update per expert, `lorakit.experts`). With
            target_parameters and no `targets`, only the parameters are adapted; dropout must be 0.
        dora: DoRA (Liu et al. 2024, PEFT's `use_dora`): each adapted linear also learns a magnitude per
            output row, m (out,), initialized to the row norms of W + scale * B @ A, and computes with
            m * (W + scale * B @ A) / ||W + scale * B @ A|| (row-wise; the norm gets no gradient).
            Takes what PEFT's DoRA takes: nn.Linear, GPT-2's Conv1D, nn.Embedding, nn.Conv1d/2d/3d (unquantized).
    """

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    targets: list[str] | str | None = None  # None: the model family's defaults (resolved by inject)
    exclude: list[str] | str | None = None
    init: str = "kaiming"
    rslora: bool = False
    bias: str = "none"
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    slices: dict[str, list[bool]] = field(default_factory=dict)
    modules_to_save: list[str] | None = None
    target_parameters: list[str] | None = None
    dora: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.target_parameters, tuple):
            self.target_parameters = list(self.target_parameters)
        if self.target_parameters is not None:
            _check_target_parameters(self.target_parameters, self.dropout)
        if self.targets is None and self.target_parameters:
            self.targets = []
        if isinstance(self.targets, tuple):
            self.targets = list(self.targets)
        if isinstance(self.exclude, tuple):
            self.exclude = list(self.exclude)
        _check_rank(self.r, "r")
        _check_alpha(self.alpha, "alpha")
        if not _is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be a number in [0, 1), got {self.dropout!r}.")
        if not isinstance(self.rslora, bool):
            raise ConfigError(f"rslora must be True or False, got {self.rslora!r}.")
        if not isinstance(self.dora, bool):
            raise ConfigError(f"dora must be True or False, got {self.dora!r}.")
        if self.dora and self.target_parameters:
            raise ConfigError("dora=True cannot apply to target_parameters (a DoRA magnitude belongs to one weight "
                              "matrix, not to a stack of experts); adapt the parameters with plain LoRA, or target "
                              "modules only.")
        if not isinstance(self.init, str) or self.init not in INITS:
            raise ConfigError(f"init must be one of {', '.join(INITS)}; got {self.init!r}.")
        if not isinstance(self.bias, str) or self.bias not in BIASES:
            raise ConfigError(f"bias must be one of {', '.join(BIASES)}; got {self.bias!r}.")
        if isinstance(self.targets, str):
            check_regex(self.targets, "targets")
        elif self.targets is None:
            pass  # the model family's defaults, resolved by inject
        elif not isinstance(self.targets, list) or not (self.targets or self.target_parameters) \
                or not all(isinstance(t, str) and t for t in self.targets):
            raise ConfigError(
                f"targets must be a non-empty list of module names, a regex string, or 'all-linear'; "
                f"got {self.targets!r}."
            )
        if isinstance(self.exclude, str):
            check_regex(self.exclude, "exclude")
        elif self.exclude is not None and not (isinstance(self.exclude, list)
                                               and all(isinstance(t, str) and t for t in self.exclude)):
            raise ConfigError(f"exclude must be None, a list of module names or a regex string; got {self.exclude!r}.")
        if self.modules_to_save is not None and not (isinstance(self.modules_to_save, list) and all(
                isinstance(t, str) and t for t in self.modules_to_save)):
            raise ConfigError(f"modules_to_save must be None or a list of module names; got {self.modules_to_save!r}.")
        for what in ("rank_pattern", "alpha_pattern", "slices"):
            if not isinstance(getattr(self, what), dict):
                raise ConfigError(f"{what} must be a dict {{module pattern: value}}; got {getattr(self, what)!r}.")
        for what in ("rank_pattern", "alpha_pattern", "slices"):
            for pattern in getattr(self, what):
                check_regex(pattern, f"{what} key", suffix_rule=True)
        for key, rank in self.rank_pattern.items():
            _check_rank(rank, f"rank_pattern[{key!r}]")
        for key, alpha in self.alpha_pattern.items():
            _check_alpha(alpha, f"alpha_pattern[{key!r}]")
        for key, mask in self.slices.items():
            if not isinstance(mask, list) or not all(isinstance(m, bool) for m in mask) or not any(mask):
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


def _check_target_parameters(names: Any, dropout: Any) -> None:
    if not isinstance(names, list) or not names or not all(isinstance(t, str) and t for t in names):
        raise ConfigError(f"target_parameters must be None or a non-empty list of parameter names, e.g. "
                          f"['mlp.experts.gate_up_proj', 'mlp.experts.down_proj']; got {names!r}.")
    if dropout:
        raise ConfigError(f"dropout={dropout!r} cannot apply to target_parameters: their update is added to the "
                          "weight itself, so there is no adapter input to drop (PEFT refuses it too). Use dropout=0.")


def scaling(alpha: float, r: int, rslora: bool) -> float:
    """alpha / r, or alpha / sqrt(r) for rank-stabilized LoRA."""
    return float(alpha) / (math.sqrt(r) if rslora else r)


def pattern_key(patterns: dict[str, Any], name: str) -> str | None:
    """The first key of `patterns` that matches module `name` by PEFT's suffix rule, or None.

    The rule is `re.match(rf"(.*\\.)?({key})$", name)`; a key that is a plain (escaped) module path
    is compared as text, which gives the same answer without running a regex.
    """
    for key in patterns:
        literal, compiled = _compiled(key)
        if literal is not None:
            if name == literal or name.endswith("." + literal):
                return key
        elif compiled.match(name):
            return key
    return None


def name_matches(spec: list[str] | str, name: str) -> bool:
    """PEFT's target rule: a string is a full-match regex; a list matches equal names or dotted suffixes."""
    if isinstance(spec, str):
        return _compiled_full(spec).fullmatch(name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


@functools.lru_cache(maxsize=4096)
def _compiled(key: str) -> tuple[str | None, re.Pattern | None]:
    """(the text of a key with no regex operators, None) or (None, PEFT's suffix regex for the key)."""
    parsed = _parser.parse(key)
    if all(op is _parser.LITERAL for op, _ in parsed) and not parsed.state.flags & re.IGNORECASE:
        return "".join(chr(c) for _, c in parsed), None
    return None, re.compile(rf"(.*\.)?({key})$")


@functools.lru_cache(maxsize=256)
def _compiled_full(spec: str) -> re.Pattern:
    return re.compile(spec)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_rank(r: Any, what: str) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ConfigError(f"{what} must be a positive integer, got {r!r}. Typical ranks are 4 to 64.")


#: the largest finite float32: a larger alpha makes the float32 update infinite
_FLOAT32_MAX = 3.4028234663852886e38


def _check_alpha(alpha: Any, what: str) -> None:
    if not _is_number(alpha) or not 0 < alpha <= _FLOAT32_MAX:
        raise ConfigError(f"{what} must be a positive finite number, got {alpha!r}. The usual choice is 2 * r.")


#: variable-length repeats allowed in one pattern; the matcher's backtracking grows like (name length)^count
MAX_REPEATS = 4


def check_regex(pattern: Any, what: str, suffix_rule: bool = False) -> None:
    """Refuse what is not a regular expression, and expressions whose matching can take exponential or
    high-polynomial time (repeats inside repeats, alternatives inside repeats, backreferences, more than
    MAX_REPEATS variable-length repeats): patterns may come from downloaded files. With `suffix_rule`
    the pattern is checked as used by `pattern_key`, inside PEFT's `(.*\\.)?(...)$`.

    Raises:
        ConfigError: naming `what`, the pattern and the problem.
    """
    if not isinstance(pattern, str):
        raise ConfigError(f"{what} {pattern!r} must be a string (a regular expression).")
    try:
        parsed = _parser.parse(rf"(.*\.)?({pattern})$" if suffix_rule else pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        raise ConfigError(f"{what} {pattern!r} is not a valid regular expression: {exc}.") from exc
    problem = _slow_construct(parsed, inside_repeat=False, counter=[0])
    if problem:
        raise ConfigError(f"{what} {pattern!r} is refused: it has {problem}, which can make matching take "
                          "practically forever. Rewrite it without that, e.g. list the module names.")


_REPEATS = tuple(getattr(_parser, op) for op in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT")
                 if hasattr(_parser, op))


def _slow_construct(items, inside_repeat: bool, counter: list[int]) -> str | None:
    """A description of the first construct of a parsed pattern that can make backtracking blow up, or None."""
    for op, av in items:
        if op in _REPEATS:
            low, high, body = av
            if low != high:
                counter[0] += 1
                if counter[0] > MAX_REPEATS:
                    return f"more than {MAX_REPEATS} variable-length repeats"
            if inside_repeat and low != high:
                return "a repeat inside a repeat"
            found = _slow_construct(body, inside_repeat or high > 1, counter)
        elif op is _parser.BRANCH:
            if inside_repeat:
                return "alternatives inside a repeat"
            found = next((f for b in av[1] if (f := _slow_construct(b, inside_repeat, counter))), None)
        elif op is _parser.SUBPATTERN:
            found = _slow_construct(av[-1], inside_repeat, counter)
        elif op in (_parser.ASSERT, _parser.ASSERT_NOT):
            found = _slow_construct(av[1], inside_repeat, counter)
        elif op in (_parser.GROUPREF, _parser.GROUPREF_EXISTS):
            return "a backreference"
        elif op is getattr(_parser, "ATOMIC_GROUP", None):
            found = _slow_construct(av, inside_repeat, counter)
        else:
            found = None
        if found:
            return found
    return None
