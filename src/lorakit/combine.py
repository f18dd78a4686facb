"""Adapter arithmetic: combine adapters a model carries into a new one, as PEFT's `add_weighted_adapter`.

    lk.combine(model, {"a": 0.7, "b": -0.3}, name="mix", method="ties", density=0.5)

Every method of PEFT's `add_weighted_adapter`, with its semantics, so that the new adapter gives the
outputs PEFT's would on the same adapters:

- linear, ties, dare_linear, dare_ties, magnitude_prune mix the factors: A and B separately, each
  adapter's A weighted by sign(w*s) * sqrt(|w*s|) and its B by sqrt(|w*s|) (w its weight, s its scale).
  This is not the weighted sum of the updates (B_mix @ A_mix has cross terms), and it needs adapters of
  one rank. ties / dare_* / magnitude_prune prune each factor first (see the functions below).
- cat stacks the factors: A_mix = [w_i*s_i*A_i ; ...], B_mix = [B_i | ...], rank = the sum of the ranks,
  so B_mix @ A_mix is exactly sum_i w_i * dW_i.
- svd and the *_svd methods mix the updates dW_i = s_i * B_i @ A_i (pruned as their name says) and take
  the top `svd_rank` singular directions of the result as the new B and A.

The new adapter has scale 1 (alpha = r, no rslora): the sources' scales are folded into its factors.
A single adapter is combined linearly whatever the method (PEFT's rule): the result is exactly w * dW.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .config import LoraConfig
from .errors import ConfigError, ShapeMismatchError
from .inject import _NAME_RE, _require, active_adapters, configs, delete_adapter, inject, lora_layers, set_adapter
from .layers import LoraLayer

METHODS = ("linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
           "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd")
#: the methods that mix A and B factor by factor, so every adapter must have the same rank at a module
FACTOR_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
#: the methods that prune, and so need a density
PRUNING_METHODS = ("ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd",
                   "magnitude_prune", "magnitude_prune_svd")
#: how ties and dare_ties elect the sign of an entry
SIGN_RULES = ("total", "frequency")
SVD_DRIVERS = (None, "gesvd", "gesvdj", "gesvda")


def combine(model: nn.Module, weights: Mapping[str, float], name: str, method: str = "linear", *,
            density: float | None = None, seed: int = 0, svd_rank: int | None = None,
            svd_clamp: float | None = None, svd_full_matrices: bool = True, svd_driver: str | None = None,
            majority_sign_method: str = "total") -> nn.Module:
    """Create adapter `name` from the adapters `weights` names, weighted by its values (negative weights
    subtract an adapter: task negation), by `method` (one of `METHODS`, see the module docstring).
    The new adapter is made active, as `inject` makes a new adapter active; the others keep their
    weights, and the model's other parameters are left as they were. Returns `model`.

    `density` (in (0, 1]; 1 prunes nothing) is the fraction of entries each pruning method keeps:
    the largest by magnitude for ties and magnitude_prune, a random draw for dare_*, whose kept entries
    are divided by `density`. `majority_sign_method` elects the sign of an entry for ties and dare_ties:
    "total" (the sign of the sum) or "frequency" (the sign most adapters have). The svd methods keep
    `svd_rank` directions (default: the largest rank among the sources; at most min(out, in) at a module),
    clamp both factors to +-q where q is the `svd_clamp` quantile of their entries (when it is given), and
    pass `svd_full_matrices` / `svd_driver` to `torch.linalg.svd` (the full SVD is PEFT's default; the
    reduced one, `svd_full_matrices=False`, gives the same factors in far less memory for large modules
    such as embeddings).

    DARE's draw is reproducible: the same `seed`, adapters and device give the same adapter. Each module
    draws from a generator seeded by (`seed`, module path), so it cannot equal PEFT's draw from torch's
    global generator; its statistics do (each entry kept with probability `density`, kept entries
    rescaled by 1 / `density`).

    Raises:
        ConfigError: an unknown method or sign rule; `weights` empty or not finite numbers; `name` taken or
            not a plain name; `density` missing for a pruning method, given for one that does not prune,
            or outside (0, 1]; a bad svd_rank, svd_clamp or svd_driver; a source adapter that is DoRA, PiSSA
            (initialized from the weights), targets parameters, or trains biases or modules_to_save.
        AdapterNotFoundError: a name in `weights` that the model does not have.
        ShapeMismatchError: the adapters adapt different modules, or (for the methods that mix factors)
            have different ranks at a module.
    Nothing is changed when it raises.
    """
    sources = _check_arguments(model, weights, name, method, density, seed, svd_rank, svd_clamp,
                               svd_full_matrices, svd_driver, majority_sign_method)
    if len(sources) == 1:  # PEFT's rule: one adapter is only weighted, and exactly so by `linear`
        method = "linear"
    modules = _modules(model, sources, method)
    if method.endswith("svd"):
        rank = svd_rank or max(A.shape[0] for per_module in modules.values() for A, _, _ in per_module.values())
    mixed: dict[str, tuple[Tensor, Tensor]] = {}
    for path, per_module in modules.items():
        factors = [per_module[a] for a in sources]
        w = [float(weights[a]) for a in sources]
        g = _generator(seed, path, factors[0][0].device) if method.startswith("dare") else None
        if method == "cat":
            mixed[path] = _cat(factors, w)
        elif method.endswith("svd"):
            mixed[path] = _svd(factors, w, method.removesuffix("_svd"), rank, density, majority_sign_method, g,
                               svd_clamp, svd_full_matrices, svd_driver)
        else:
            mixed[path] = _mix_factors(factors, w, method, density, majority_sign_method, g)
    _install(model, name, mixed, configs(model)[sources[0]].dropout)
    return model


# -- checks -----------------------------------------------------------------------------------------------
def _check_arguments(model, weights, name, method, density, seed, svd_rank, svd_clamp, svd_full_matrices,
                     svd_driver, majority_sign_method) -> list[str]:
    """The source adapters' names, in the order given, once every argument has been checked."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"combine expects a torch.nn.Module as model, got {type(model).__name__}.")
    if not isinstance(method, str) or method not in METHODS:
        raise ConfigError(f"Unknown combine method {method!r}; use one of {', '.join(METHODS)}.")
    if not isinstance(weights, Mapping) or not weights:
        raise ConfigError(f"combine needs the adapters to combine and their weights as a dict {{name: weight}}, "
                          f"e.g. {{'a': 0.7, 'b': -0.3}}; got {weights!r}.")
    for adapter, weight in weights.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ConfigError(f"The weight of adapter {adapter!r} must be a finite number (negative subtracts the "
                              f"adapter), got {weight!r}.")
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ConfigError(f"Adapter name {name!r} must be letters, digits, '_' or '-' (it is used in file keys).")
    if name in configs(model):
        raise ConfigError(f"The model already has an adapter named {name!r}; pick another name for the combined "
                          f"adapter, or lk.delete_adapter(model, {name!r}) first.")
    sources = list(weights)
    _require(model, sources)
    if method in PRUNING_METHODS and len(sources) > 1 and density is None:
        raise ConfigError(f"method {method!r} prunes each adapter and needs density= (the fraction of entries to "
                          "keep, in (0, 1]; e.g. 0.5).")
    if density is not None:
        if method not in PRUNING_METHODS:
            raise ConfigError(f"method {method!r} does not prune, so density={density!r} would do nothing; drop it, "
                              f"or pick a pruning method ({', '.join(PRUNING_METHODS)}).")
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
            raise ConfigError(f"density must be a number in (0, 1] (the fraction of entries each adapter keeps; 1 "
                              f"prunes nothing), got {density!r}.")
    if majority_sign_method not in SIGN_RULES:
        raise ConfigError(f"majority_sign_method must be one of {', '.join(SIGN_RULES)}, got {majority_sign_method!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an integer, got {seed!r}.")
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank <= 0):
        raise ConfigError(f"svd_rank must be a positive integer (or None for the largest source rank), "
                          f"got {svd_rank!r}.")
    if svd_clamp is not None and (isinstance(svd_clamp, bool) or not isinstance(svd_clamp, (int, float))
                                  or not 0 <= svd_clamp <= 1):
        raise ConfigError(f"svd_clamp must be a quantile in [0, 1] (e.g. 0.99), or None; got {svd_clamp!r}.")
    if not isinstance(svd_full_matrices, bool):
        raise ConfigError(f"svd_full_matrices must be True or False, got {svd_full_matrices!r}.")
    if svd_driver not in SVD_DRIVERS:
        raise ConfigError(f"svd_driver must be one of {SVD_DRIVERS} (the drivers other than None are CUDA's), "
                          f"got {svd_driver!r}.")
    for adapter in sources:
        cfg = configs(model)[adapter]
        leave_out = "Leave it out of the combination."
        refused = [(what, fix) for what, fix, on in (
            ("is DoRA (dora=True), whose magnitudes cannot be mixed as LoRA factors", leave_out,
             getattr(cfg, "dora", False)),
            ("was initialized by PiSSA (init='pissa'), so its factors act on the residual weight",
             "Save it (it is written as a plain LoRA of the original weights), load it back under another name and "
             "combine that.", cfg.init == "pissa"),
            (f"adapts parameters (target_parameters={getattr(cfg, 'target_parameters', None)!r}), not modules",
             leave_out, getattr(cfg, "target_parameters", None)),
            (f"trains biases too (bias={cfg.bias!r}), which combine does not mix", leave_out, cfg.bias != "none"),
            (f"trains whole modules too (modules_to_save={cfg.modules_to_save!r}), which combine does not mix",
             leave_out, cfg.modules_to_save)) if on]
        if refused:
            what, fix = refused[0]
            raise ConfigError(f"Adapter {adapter!r} {what}; combine mixes LoRA factors only. {fix}")
    return sources


def _modules(model: nn.Module, sources: list[str], method: str) -> dict[str, dict[str, tuple[Tensor, Tensor, float]]]:
    """{module path: {adapter: (A, B, scale)}} for every module the sources adapt; A (r, in[, *kernel]) and
    B (out, r[, 1, ...]) as the adapter holds them (B full-width for sliced adapters).

    Raises:
        ShapeMismatchError: a module that only some sources adapt, or different ranks at a module for a
            method that mixes factors.
    """
    found: dict[str, dict[str, tuple[Tensor, Tensor, float]]] = {}
    for path, layer in lora_layers(model):
        here = [a for a in sources if a in layer.adapters]
        if not here:
            continue
        if len(here) < len(sources):
            missing = [a for a in sources if a not in here]
            raise ShapeMismatchError(
                f"Adapters {here} adapt module {path!r} but {missing} do not; combine needs adapters of the same "
                "target modules. Combine adapters trained with the same targets.")
        found[path] = {a: _factors(layer, a) for a in sources}
    if method in FACTOR_METHODS:
        for path, per_module in found.items():
            ranks = {a: A.shape[0] for a, (A, _, _) in per_module.items()}
            if len(set(ranks.values())) > 1:
                raise ShapeMismatchError(
                    f"Method {method!r} mixes the factors A and B, which needs one rank, but at module {path!r} the "
                    f"adapters have ranks {ranks}. Use method 'cat' or 'svd' (or a *_svd method), which take "
                    "adapters of any ranks.")
    return found


def _factors(layer: LoraLayer, adapter: str) -> tuple[Tensor, Tensor, float]:
    a = layer.adapters[adapter]
    return a.lora_A.detach(), a.full_B().detach(), a.scale


# -- the methods --------------------------------------------------------------------------------------------
def _cat(factors: list[tuple[Tensor, Tensor, float]], w: list[float]) -> tuple[Tensor, Tensor]:
    """A (sum r_i, in) = [w_i * s_i * A_i ; ...] and B (out, sum r_i) = [B_i | ...]: B @ A = sum_i w_i * dW_i."""
    A = torch.cat([A.float() * wi * s for (A, _, s), wi in zip(factors, w)], dim=0)
    B = torch.cat([B.float() for _, B, _ in factors], dim=1)
    return A, B


def _mix_factors(factors: list[tuple[Tensor, Tensor, float]], w: list[float], method: str, density: float | None,
                 sign_rule: str, g: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Mix the A's and the B's separately by `method`: A's weighted by sign(w*s) * sqrt(|w*s|), B's by
    sqrt(|w*s|), so that one adapter's B @ A gets w * s, and a negative weight flips it once."""
    weighted = [wi * s for wi, (_, _, s) in zip(w, factors)]
    w_A = torch.tensor([math.sqrt(abs(x)) * (1 if x >= 0 else -1) for x in weighted], dtype=torch.float32)
    w_B = torch.tensor([math.sqrt(abs(x)) for x in weighted], dtype=torch.float32)
    A = _merge_tensors([A.float() for A, _, _ in factors], w_A, method, density, sign_rule, g)
    B = _merge_tensors([B.float() for _, B, _ in factors], w_B, method, density, sign_rule, g)
    return A, B


def _svd(factors: list[tuple[Tensor, Tensor, float]], w: list[float], method: str, rank: int, density: float | None,
         sign_rule: str, g: torch.Generator | None, clamp: float | None, full_matrices: bool,
         driver: str | None) -> tuple[Tensor, Tensor]:
    """The top-`rank` SVD factors of the `method`-merged updates: B (out, k) = U * S, A (k, in) = Vh, with
    k = min(rank, out, in); convolution updates are flattened to (out, in * kernel) and back."""
    A0, B0, _ = factors[0]
    # dW_i = s_i * B_i @ A_i in float32, flattened: (out, in * prod(kernel))
    deltas = [(B.float().flatten(1) @ A.float().flatten(1)).mul_(s) for A, B, s in factors]
    method = {"svd": "linear", "ties": "ties", "dare_linear": "dare_linear", "dare_ties": "dare_ties",
              "magnitude_prune": "magnitude_prune"}[method]
    delta = _merge_tensors(deltas, torch.tensor(w, dtype=torch.float32), method, density, sign_rule, g)
    U, S, Vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    k = min(rank, S.shape[0])
    U = U[:, :k] @ torch.diag(S[:k])  # (out, k)
    Vh = Vh[:k, :]  # (k, in * prod(kernel))
    if clamp is not None:
        high = torch.quantile(torch.cat([U.flatten(), Vh.flatten()]), clamp)
        U, Vh = U.clamp(-high, high), Vh.clamp(-high, high)
    return Vh.reshape(k, *A0.shape[1:]), U.reshape(B0.shape[0], k, *B0.shape[2:])


def _merge_tensors(tensors: list[Tensor], weights: Tensor, method: str, density: float | None, sign_rule: str,
                   g: torch.Generator | None) -> Tensor:
    """Merge same-shaped task tensors by `method` (PEFT's `merge_utils`, with the same operations in the same
    order): prune each (magnitude or random), stack, weight, then sum (linear, magnitude_prune,
    dare_linear) or keep per entry only the tensors that agree with the elected sign and average them
    (ties, dare_ties)."""
    if method in ("ties", "magnitude_prune"):
        tensors = [_prune_magnitude(t, density) for t in tensors]
    elif method.startswith("dare"):
        tensors = [_prune_random(t, density, g) for t in tensors]
    stacked = torch.stack(tensors, dim=0)
    weighted = stacked * weights.to(stacked.device).view(-1, *(1,) * (stacked.dim() - 1))
    if method not in ("ties", "dare_ties"):
        return weighted.sum(dim=0)
    # TIES: the sign of each entry is elected on the pruned, unweighted tensors
    sign = stacked.sign()
    votes = stacked.sum(dim=0) if sign_rule == "total" else sign.sum(dim=0)
    agrees = sign == torch.where(votes >= 0, 1, -1)
    return (weighted * agrees).sum(dim=0) / torch.clamp(agrees.sum(dim=0), min=1.0)


def _prune_magnitude(t: Tensor, density: float) -> Tensor:
    """Keep the int(density * numel) entries of largest magnitude; zero the rest (density 1: all kept)."""
    if density >= 1:
        return t
    mask = torch.zeros_like(t).reshape(-1)
    mask[torch.topk(t.abs().reshape(-1), k=int(density * t.numel()), largest=True)[1]] = 1
    return t * mask.reshape(t.shape)


def _prune_random(t: Tensor, density: float, g: torch.Generator) -> Tensor:
    """DARE: keep each entry with probability `density` and divide the kept ones by it (density 1: all kept)."""
    if density >= 1:
        return t
    mask = torch.bernoulli(torch.full_like(t, density), generator=g)
    return t * mask / density


def _generator(seed: int, path: str, device: torch.device) -> torch.Generator:
    """A generator on `device` seeded by (seed, module path), so a module's draw does not depend on the others."""
    digest = hashlib.sha256(f"{seed}:{path}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") & (2 ** 63 - 1))


# -- the new adapter ------------------------------------------------------------------------------------------
def _install(model: nn.Module, name: str, mixed: dict[str, tuple[Tensor, Tensor]], dropout: float) -> None:
    """Inject adapter `name` with scale 1 (alpha = r) on exactly the modules of `mixed`, at each module's
    rank, and copy the factors in; put the model back as it was if that fails."""
    esc = {path: re.escape(path) for path in mixed}
    ranks = {path: A.shape[0] for path, (A, _) in mixed.items()}
    first = next(iter(ranks.values()))
    cfg = LoraConfig(r=first, alpha=first, dropout=dropout, targets="|".join(esc.values()), init="zeros",
                     rank_pattern={esc[p]: r for p, r in ranks.items()},
                     alpha_pattern={esc[p]: r for p, r in ranks.items()})
    grads = [(p, p.requires_grad) for p in model.parameters()]
    active = active_adapters(model)
    inject(model, cfg, name)
    try:
        with torch.no_grad():
            for path, (A, B) in mixed.items():
                a = model.get_submodule(path).adapters[name]
                a.lora_A.copy_(A.reshape(a.lora_A.shape))
                a.lora_B.copy_(B.reshape(a.lora_B.shape))
    except BaseException:
        delete_adapter(model, name)
        set_adapter(model, active)
        raise
    finally:
        for p, flag in grads:  # inject freezes every base parameter; the model's others keep their setting
            p.requires_grad_(flag)
