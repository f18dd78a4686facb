"""`lorakit combine`: combine saved adapters into a new one (`lorakit.combine`) and write it in PEFT's format.

    lorakit combine --model M --adapter a=DIR --adapter b=DIR --weights a=0.7,b=-0.3 \\
        --method ties --density 0.5 --output-dir OUT

Nothing here imports torch at module level, so `lorakit --help` stays quick.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from .errors import ConfigError

METHODS = ("linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
           "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd")  # lorakit.combine.METHODS, without torch


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `lorakit combine` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "combine", help="combine adapters into a new one (PEFT's add_weighted_adapter), written in PEFT's format",
        description="Load adapters onto one base model, combine them with weights (negative weights subtract an "
                    "adapter) by one of PEFT's add_weighted_adapter methods, and save the result.")
    p.add_argument("--model", required=True, help="the base model the adapters were trained on")
    p.add_argument("--adapter", action="append", required=True, metavar="NAME=DIR",
                   help="an adapter directory under a name (repeatable)")
    p.add_argument("--weights", required=True, metavar="NAME=W,...",
                   help="the weight of each adapter, e.g. a=0.7,b=-0.3")
    p.add_argument("--method", default="linear", choices=METHODS, metavar="METHOD",
                   help=f"how the adapters combine (default linear): {', '.join(METHODS)}")
    p.add_argument("--density", type=float, default=None,
                   help="fraction of entries each adapter keeps, in (0, 1]: ties, dare_*, magnitude_prune*")
    p.add_argument("--majority-sign-method", default="total", choices=("total", "frequency"),
                   help="how ties and dare_ties elect the sign of an entry")
    p.add_argument("--svd-rank", type=int, default=None, help="rank of the result for the *svd methods "
                   "(default: the largest rank among the adapters)")
    p.add_argument("--svd-clamp", type=float, default=None, help="clamp the svd factors at this quantile")
    p.add_argument("--seed", type=int, default=0, help="seed of DARE's random pruning")
    p.add_argument("--name", default="combined", help="name of the new adapter (default: combined)")
    p.add_argument("--output-dir", required=True, help="directory to write the new adapter to")
    p.add_argument("--task", default="causal-lm", choices=["causal-lm", "classification", "regression"],
                   help="the kind of model to load (default causal-lm)")
    p.add_argument("--num-labels", type=int, default=None, help="classes of a classification model's head")
    p.set_defaults(func=run)
    return p


def parse_adapters(specs: list[str]) -> dict[str, str]:
    """{name: directory} from NAME=DIR strings.

    Raises:
        ConfigError: a spec without a name, or a name given twice.
    """
    adapters: dict[str, str] = {}
    for spec in specs:
        name, sep, directory = spec.partition("=")
        if not sep or not name or not directory:
            raise ConfigError(f"--adapter {spec!r} must be NAME=DIR (e.g. --adapter sst2=runs/sst2/adapter).")
        if name in adapters:
            raise ConfigError(f"--adapter names {name!r} twice; give each adapter its own name.")
        adapters[name] = directory
    return adapters


def parse_weights(text: str, names: list[str]) -> dict[str, float]:
    """{name: weight} from "a=0.7,b=-0.3", in the order of `names`; every adapter needs one weight.

    Raises:
        ConfigError: a malformed entry, a weight that is not a finite number, a name that no --adapter
            gives, or an adapter without a weight.
    """
    weights: dict[str, float] = {}
    for item in (part.strip() for part in text.split(",")):
        name, sep, value = item.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = math.nan
        if not sep or not name or not math.isfinite(weight):
            raise ConfigError(f"--weights entry {item!r} must be NAME=NUMBER (e.g. --weights a=0.7,b=-0.3).")
        if name not in names:
            raise ConfigError(f"--weights gives a weight to {name!r}, which no --adapter names; adapters: {names}.")
        weights[name] = weight
    missing = [n for n in names if n not in weights]
    if missing:
        raise ConfigError(f"--weights gives no weight to adapter(s) {missing}; add e.g. {missing[0]}=1.0.")
    return {n: weights[n] for n in names}


def run(args) -> int:
    from .combine import combine
    from .io import load_adapter, save_adapter
    from .models import load_model
    from .train.rundir import check_output_dir

    adapters = parse_adapters(args.adapter)
    weights = parse_weights(args.weights, list(adapters))
    out = Path(args.output_dir)
    check_output_dir(out, "--output-dir")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty; pick a new --output-dir.")
    if args.name in adapters:
        raise ConfigError(f"--name {args.name!r} is also the name of an --adapter; pick another --name.")
    task = {"classification": "sequence-classification"}.get(args.task, args.task)
    model, _ = load_model(args.model, task=task, num_labels=args.num_labels)
    for name, directory in adapters.items():
        load_adapter(model, directory, name=name)
    combine(model, weights, name=args.name, method=args.method, density=args.density, seed=args.seed,
            svd_rank=args.svd_rank, svd_clamp=args.svd_clamp, majority_sign_method=args.majority_sign_method)
    save_adapter(model, out, name=args.name)
    mix = ", ".join(f"{w:g} * {n}" for n, w in weights.items())
    print(f"combined {mix} by {args.method} -> {out} (PEFT format)")
    return 0
