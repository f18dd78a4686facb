"""The `lorakit` command: train | eval | generate | merge | analyze | convert.

`train` and `eval` flags are generated from the fields of TrainConfig, DataConfig and
LoraConfig (`--batch-size` sets TrainConfig.batch_size, `--r` sets LoraConfig.r, ...);
`--config run.yaml` loads the same fields from YAML (flat, or in train/data/lora sections),
and flags given on the command line override it: defaults < YAML < flags.

Errors a user can fix print as one paragraph (exit code 2); `--debug` shows the traceback.

`train --nproc N` runs the same command on N processes through torchrun (`torch.distributed.run`);
`torchrun --nproc-per-node N -m lorakit train ...` does the same by hand (see lorakit.distributed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import os
import re
import sys
import typing
from pathlib import Path
from typing import Any

from .config import LoraConfig
from .errors import ConfigError, LoraError

QUANTIZE = ("nf4", "fp4", "int8")  # lorakit.quant.QUANTIZE, named here so that --help imports no torch

SECTIONS = {"train": "TrainConfig", "data": "DataConfig", "lora": "LoraConfig"}


def _section_classes():
    from .data import DataConfig
    from .train import TrainConfig
    return {"train": TrainConfig, "data": DataConfig, "lora": LoraConfig}


def _field_docs(cls) -> dict[str, str]:
    """Docstrings written under dataclass fields ("attribute docstrings"), for --help."""
    import ast
    import inspect
    import textwrap
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr)
                and isinstance(getattr(nxt, "value", None), ast.Constant)):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def _parse_value(kind: Any, text: str):
    """Turn a flag string into the field's type (bool, int, float, list/dict as JSON or comma list)."""
    origin = typing.get_origin(kind)
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if kind is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")
    if kind is int:
        return int(text)
    if kind is float:
        return float(text)
    if origin is dict or (args and typing.get_origin(args[0]) is dict):
        return json.loads(text)
    if text.lower() == "none" and type(None) in typing.get_args(kind):
        return None
    if origin in (list, typing.Union) or args:
        # list[str] | str: "all-linear" and regexes stay strings; "a,b" becomes a list
        if text.startswith("["):
            return json.loads(text)
        if "," in text:
            return [t.strip() for t in text.split(",") if t.strip()]
        if any(typing.get_origin(a) is list for a in args) and str not in args:
            return [text]
        if args and args[0] in (int, float):
            return args[0](text)
        return text
    return text


def add_config_flags(parser: argparse.ArgumentParser, sections=("train", "data", "lora")) -> None:
    classes = _section_classes()
    for section in sections:
        cls = classes[section]
        group = parser.add_argument_group(f"{section} ({cls.__name__})")
        docs = _field_docs(cls)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            kind = hints[f.name]
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            help_text = docs.get(f.name, "")
            help_text = f"{help_text} (default: {default!r})".strip().replace("%", "%%")
            dest = f"{section}.{f.name}"
            if kind is bool:
                group.add_argument(flag, dest=dest, nargs="?", const=True, default=argparse.SUPPRESS, metavar="BOOL",
                                   type=lambda t, k=kind: _parse_value(k, t), help=help_text)
            elif "const" in f.metadata:  # a switch with more states than two: the flag alone means `const`
                group.add_argument(flag, dest=dest, nargs="?", const=f.metadata["const"], default=argparse.SUPPRESS,
                                   metavar=f.name.upper(), type=lambda t, k=kind: _parse_value(k, t), help=help_text)
            else:
                group.add_argument(flag, dest=dest, default=argparse.SUPPRESS, metavar=f.name.upper(),
                                   type=lambda t, k=kind: _parse_value(k, t), help=help_text)


def resolve_config(args: argparse.Namespace, sections=("train", "data", "lora")):
    """defaults < YAML (--config) < flags -> (TrainConfig, DataConfig, LoraConfig)."""
    classes = _section_classes()
    values: dict[str, dict[str, Any]] = {s: {} for s in sections}
    owner = {f.name: s for s in sections for f in dataclasses.fields(classes[s])}
    if getattr(args, "config", None):
        values = _merge_yaml(values, Path(args.config), owner, sections)
    for key, value in vars(args).items():
        if "." in key:
            section, name = key.split(".", 1)
            if section in values:
                values[section][name] = value
    if "train" in values and values["train"].get("train_file") is None:
        # The built-in task brings its own tuned defaults; YAML and flags still override them.
        from .train import builtin_defaults
        for section, fields in builtin_defaults().items():
            if section in values:
                for name, value in fields.items():
                    values[section].setdefault(name, value)
    built = {}
    for s in sections:
        try:
            built[s] = classes[s](**values[s])
        except TypeError as exc:
            raise ConfigError(f"Bad {s} settings: {exc}") from exc
    return built


def _merge_yaml(values, path: Path, owner, sections):
    import yaml
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file.") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path} must hold a mapping of settings.")
    for key, value in data.items():
        if key in sections and isinstance(value, dict):
            for k, v in value.items():
                if k not in {f.name for f in dataclasses.fields(_section_classes()[key])}:
                    raise ConfigError(f"--config {path}: unknown {key} setting {k!r}.")
                values[key][k] = v
        elif key in owner:
            values[owner[key]][key] = value
        else:
            raise ConfigError(f"--config {path}: unknown setting {key!r}. Known: {', '.join(sorted(owner))}.")
    return values


# -- subcommands ----------------------------------------------------------------------------------------
def adapter_spec(spec: str) -> tuple[str, str]:
    """`--adapter DIR` or `--adapter NAME=DIR` -> (name, directory); a bare DIR is adapter "default".

    A value that is an existing path is a directory, whatever it holds (`runs/lr=1e-3/adapter`); otherwise
    the text before the first `=` is a name if it is a valid adapter name (letters, digits, _ and -).
    """
    if Path(spec).exists():
        return "default", spec
    name, sep, path = spec.partition("=")
    if sep and _ADAPTER_NAME.fullmatch(name):
        return name, path
    return "default", spec


_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_\-]+")


def cmd_train(args) -> int:
    from . import distributed
    from . import train as T
    parts = resolve_config(args)
    if args.nproc is not None and not distributed.launched():
        # Settings were checked above, once; each of the N processes parses the same flags again.
        return distributed.launch(_without_nproc(args.argv), args.nproc)
    from .models import KNOWN_MODELS  # noqa: F401  (fail early with a clear message if models is broken)
    run_cfg = T.RunConfig(parts["train"], parts["data"], parts["lora"])
    summary = T.run(run_cfg)
    if distributed.env_rank() == 0:
        print_summary(run_cfg, summary)
    return 0


def _without_nproc(argv: list[str]) -> list[str]:
    """The command line minus `--nproc N` / `--nproc=N` (the processes it starts must not start more)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def print_summary(run_cfg, summary) -> None:
    cfg = run_cfg.train
    before, after = summary["before"], summary["after"]
    print("\n== lorakit train: done ==")
    if after:
        from .train import metric_key
        key, _ = metric_key(after)
        label = "exact match on held-out examples" if cfg.train_file is None else key
        print(f"{label}: before {before.get(key, float('nan')):.3f} -> after {after[key]:.3f}")
        extra = {k: v for k, v in after.items() if k != key}
        if extra:
            print("other metrics after: " + ", ".join(f"{k} {v:.4f}" for k, v in extra.items()))
    tr, tot = summary["trainable_parameters"], summary["total_parameters"]
    print(f"trainable parameters: {tr:,} of {tot:,} ({100 * tr / tot:.2f}%)")
    size = summary["adapter_bytes"] / 2**20
    if summary.get("base_bytes"):
        base = summary["base_bytes"] / 2**20
        print(f"adapter on disk: {size:.2f} MiB vs base model {base:.1f} MiB ({100 * size / base:.2f}%)")
    else:
        print(f"adapter on disk: {size:.2f} MiB")
    print(f"trained {summary['steps']} steps in {summary['train_seconds']:.0f} s; saved to {summary['adapter_dir']}")
    if not cfg.full and run_cfg.data.task == "sft":
        prompt = summary.get("example_prompt") or "..."
        print("try it:\n  lorakit generate --model {} --adapter {} --prompt {}".format(
            shlex.quote(cfg.model), shlex.quote(summary["adapter_dir"]), shell_quote(prompt)))


def shell_quote(text: str) -> str:
    """Quote for bash; newlines and tabs as $'...' escapes so the command stays on one line."""
    if "\n" not in text and "\t" not in text:
        return shlex.quote(text)
    body = text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n").replace("\t", "\\t")
    return f"$'{body}'"


def cmd_eval(args) -> int:
    import torch

    from . import train as T
    from .io import load_adapter
    from .models import load_model
    parts = resolve_config(args)
    run_cfg = T.RunConfig(parts["train"], parts["data"], parts["lora"])
    cfg, data = run_cfg.train, run_cfg.data
    score_fn, eval_records = None, None
    if cfg.eval_file is None:
        from . import tasks
        _, eval_records = tasks.builtin_task(int(tasks.DEFAULT_HPARAMS["n_train"]),
                                             int(tasks.DEFAULT_HPARAMS["n_eval"]), seed=cfg.seed)
        score_fn = tasks.score
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    label_names = data.labels
    num_labels = len(label_names) if label_names else None
    if data.task == "classification" and label_names is None:
        from .data import load_records, resolve_labels
        recs = load_records(cfg.eval_file, format=data.format)
        _, label_names = resolve_labels([r.get(data.label_column) for r in recs], None, source=cfg.eval_file,
                                        column=data.label_column)
        num_labels = len(label_names)
    model, tokenizer = load_model(cfg.model, task=T.model_task(data), num_labels=num_labels, quantize=cfg.quantize)
    for spec in args.adapter or []:  # (unmerged: nothing merges into a quantized layer)
        name, path = adapter_spec(spec)
        load_adapter(model, path, name=name)
    if cfg.quantize is None:  # a quantized model was loaded onto its device
        model.to(device)
    split = T.read_split(cfg.eval_file, eval_records, tokenizer, data, label_names)
    result = T.evaluate(model, tokenizer, split, run_cfg, device, score_fn)
    if args.generation_metrics and data.task == "sft":
        result.update(_generation_metrics(model, tokenizer, split, cfg, data, args))
    print(json.dumps(result, indent=2))
    return 0


def _generation_metrics(model, tokenizer, split, cfg, data, args) -> dict[str, Any]:
    """BLEU, NIST, METEOR, ROUGE-L, CIDEr with every reference of a prompt (E2E-style data).

    References of one prompt are consecutive records, grouped as the official E2E scorer does."""
    from .eval import metrics
    from .data import group_references
    from .train import generate_texts
    groups = group_references(split.records, data.prompt_column, data.completion_column)
    groups = groups[: cfg.max_eval_examples or None]
    hyps = generate_texts(model, tokenizer, [p + data.separator for p, _ in groups], cfg.max_new_tokens,
                          num_beams=args.num_beams, cuda_graphs=cfg.cuda_graphs)
    scores = metrics.generation_scores(hyps, [refs for _, refs in groups])
    if args.predictions:
        Path(args.predictions).write_text("\n".join(h.strip() for h in hyps) + "\n")
    return scores.as_dict()


def cmd_generate(args) -> int:
    import torch

    from .inject import set_adapter
    from .io import load_adapter
    from .models import load_model
    from .train import generate_texts
    model, tokenizer = load_model(args.model, quantize=args.quantize)
    names = []
    for spec in args.adapter or []:
        name, path = adapter_spec(spec)
        load_adapter(model, path, name=name)
        names.append(name)
    if args.quantize is None:  # a quantized model was loaded onto its device
        model.to("cuda" if torch.cuda.is_available() else "cpu")
    prompts = list(args.prompt or [])
    if args.input_file:
        prompts += [line.rstrip("\n") for line in Path(args.input_file).read_text().splitlines() if line.strip()]
    if not prompts:
        raise ConfigError("Nothing to generate from: pass --prompt TEXT (repeatable) or --input-file FILE.")
    routes = None
    if args.route:
        routes = [None if n in ("", "none", "base") else n for n in args.route.split(",")]
        if len(routes) != len(prompts):
            raise ConfigError(f"--route names {len(routes)} adapters but there are {len(prompts)} prompts; "
                              "give one name (or 'base') per prompt.")
    elif len(names) > 1:
        set_adapter(model, names)
    kwargs = {"num_beams": args.num_beams}
    if args.sample:
        kwargs.update(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                      min_p=args.min_p)
        torch.manual_seed(args.seed)
    outs = generate_texts(model, tokenizer, prompts, args.max_new_tokens, adapters=routes,
                          cuda_graphs=args.cuda_graphs, **kwargs)
    for i, (p, o) in enumerate(zip(prompts, outs)):
        tag = f" [{routes[i] or 'base'}]" if routes else ""
        print(f"### prompt{tag}: {p}\n{o.strip()}\n")
    return 0


#: the temporary folder `lorakit merge` writes the model into, beside --output: .<output name>.<this>-<host>-<pid>-...
MERGE_TMP = "lorakit-merge"


def _clean_stale_merges(out: Path) -> list[Path]:
    """Delete the temporary folders that killed `lorakit merge` runs left beside `out`: only folders named
    by `cmd_merge` for this output, made on this host by a process that no longer runs. Returns them."""
    import glob
    import shutil
    import socket

    host = socket.gethostname().replace("-", "_")
    removed = []
    prefix = f".{out.name}.{MERGE_TMP}-{host}-"
    for tmp in out.parent.glob(f".{glob.escape(out.name)}.{MERGE_TMP}-*"):
        pid = tmp.name[len(prefix):].split("-", 1)[0] if tmp.name.startswith(prefix) else ""
        if not pid.isdigit() or not tmp.is_dir() or tmp.is_symlink() or _running(int(pid)):
            continue
        shutil.rmtree(tmp, ignore_errors=True)
        removed.append(tmp)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def cmd_merge(args) -> int:
    import shutil
    import socket
    import tempfile

    import torch

    from .inject import eject, merge
    from .io import load_adapter, umask_mode
    from .models import load_model
    from .quant import dequantize_model
    from .train.rundir import check_output_dir
    out = Path(args.output)
    check_output_dir(out, "--output")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty; pick a new --output directory.")
    task = {"causal-lm": "causal-lm", "classification": "sequence-classification"}.get(args.task, args.task)
    model, tokenizer = load_model(args.model, task=task, num_labels=args.num_labels, quantize=args.quantize)
    load_adapter(model, args.adapter)
    model.eval()
    sample = tokenizer(["The quick brown fox jumps over the lazy dog."] * 2, return_tensors="pt").to(model.device)
    with torch.no_grad():
        unmerged = model(**sample).logits.float()
        if args.quantize:  # nothing merges into a quantized layer: dequantize(Wq) + s*B@A, then the rest dequantized
            eject(model, merge=True)
            model = dequantize_model(model)
        else:
            merge(model)
        merged = model(**sample).logits.float()
    diff = (merged - unmerged).abs().max().item()
    eject(model, merge=True)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty; pick a new --output directory.")
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in _clean_stale_merges(out):
        print(f"removed {stale}, left by an interrupted lorakit merge")
    host = socket.gethostname().replace("-", "_")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{MERGE_TMP}-{host}-{os.getpid()}-", dir=out.parent))
    try:
        os.chmod(tmp, umask_mode(directory=True))  # mkdtemp makes it 0700; it becomes the user's folder
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        for f in tmp.rglob("*"):  # transformers writes model.safetensors 0600 through a temp file
            if f.is_file() and not f.is_symlink():
                os.chmod(f, umask_mode())
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"merged model written to {out}")
    print(f"max |merged - unmerged| logit difference on a sample: {diff:.3e}")
    return 0


def cmd_convert(args) -> int:
    from .io import load_adapter, save_adapter
    from .models import load_model
    from .train.rundir import check_output_dir
    check_output_dir(Path(args.output), "--output")
    task = {"classification": "sequence-classification"}.get(args.task, args.task)
    model, _ = load_model(args.model, task=task, num_labels=args.num_labels)
    slices = [s.strip().lower() in ("1", "true", "t") for s in args.slices.split(",")] if args.slices else None
    load_adapter(model, args.checkpoint, alpha=args.alpha, slices=slices)
    out = save_adapter(model, args.output)
    print(f"converted {args.checkpoint} -> {out} (PEFT format)")
    return 0


def cmd_analyze(args) -> int:
    from .eval import analysis
    base_weights = None
    if args.model:
        from .models import load_model
        try:
            model, _ = load_model(args.model)
        except ConfigError:  # an encoder (e.g. minilm-l6): adapters were trained on its classification model
            model, _ = load_model(args.model, task="sequence-classification")
        base_weights = {n.rsplit(".", 1)[0]: p.detach() for n, p in model.named_parameters() if n.endswith("weight")}
    report = analysis.analyze(args.adapter, args.other, base_weights=base_weights, out_dir=args.output)
    summary = report.get("summary", report) if isinstance(report, dict) else report
    print(json.dumps(summary, indent=2, default=str)[:4000])
    if args.output:
        print(f"report and plots written to {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lorakit", description="LoRA fine-tuning: train, evaluate, generate, merge, "
                                "analyze and convert adapters. `lorakit train` with no flags runs a built-in demo.")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser("train", help="fine-tune a model with LoRA (or --full)",
                       description="Fine-tune with LoRA. With no flags: SmolLM2-135M on a built-in task, on CPU.")
    t.add_argument("--config", help="YAML file with settings (flags override it)")
    t.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="train data-parallel on N processes of this machine (one per GPU; gloo on CPU), "
                        "launched through torchrun; see --strategy")
    add_config_flags(t)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate a model (+ adapters) on held-out data")
    e.add_argument("--config", help="YAML file with settings (flags override it)")
    e.add_argument("--adapter", action="append", help="adapter directory, or name=dir (repeatable)")
    e.add_argument("--generation-metrics", action="store_true",
                   help="sft: also BLEU, NIST, METEOR, ROUGE-L, CIDEr against all references of each prompt")
    e.add_argument("--num-beams", type=int, default=1, help="beam width for --generation-metrics")
    e.add_argument("--predictions", help="write the generated texts here, one per line")
    add_config_flags(e, ("train", "data"))
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser("generate", help="generate text with a model and adapters")
    g.add_argument("--model", default="smollm2-135m")
    g.add_argument("--adapter", action="append", help="adapter directory, or name=dir (repeatable)")
    g.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    g.add_argument("--input-file", help="one prompt per line")
    g.add_argument("--route", help="comma-separated adapter name per prompt ('base' for none), in one batch")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--num-beams", type=int, default=1, help="beam search width (1: greedy)")
    g.add_argument("--sample", action="store_true", help="sample instead of greedy/beam decoding")
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--top-k", type=int, default=None,
                   help="sample from the k most likely tokens only (0: all; default: the model's setting, else 50)")
    g.add_argument("--min-p", type=float, default=None,
                   help="sample only tokens at least this fraction as likely as the most likely one (default: none)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--cuda-graphs", choices=("auto", "on", "off"), default="auto",
                   help="greedy decoding and sampling on a GPU: each token one CUDA graph replay "
                        "(auto: where it can be captured)")
    g.add_argument("--quantize", choices=QUANTIZE, default=None,
                   help="load the base quantized with bitsandbytes (adapters stay unmerged in float32)")
    g.set_defaults(func=cmd_generate)

    m = sub.add_parser("merge", help="merge an adapter into its base: a plain Hugging Face model directory")
    m.add_argument("--model", required=True)
    m.add_argument("--adapter", required=True)
    m.add_argument("--output", required=True)
    m.add_argument("--task", default="causal-lm", choices=["causal-lm", "classification", "regression"])
    m.add_argument("--num-labels", type=int, default=None)
    m.add_argument("--quantize", choices=QUANTIZE, default=None,
                   help="load the base quantized (bitsandbytes), as the adapter was trained on it; the merged model "
                        "holds dequantize(Wq) + s*B@A in the dequantized dtype")
    m.set_defaults(func=cmd_merge)

    a = sub.add_parser("analyze", help="the paper's Section 7: subspace similarity, amplification, spectra")
    a.add_argument("adapter", help="adapter directory")
    a.add_argument("other", nargs="?", help="a second adapter to compare with (e.g. another rank or seed)")
    a.add_argument("--model", help="base model, for the amplification factor")
    a.add_argument("--output", help="directory for analysis.json and PNG plots")
    a.set_defaults(func=cmd_analyze)

    c = sub.add_parser("convert", help="loralib checkpoint -> PEFT-format adapter directory")
    c.add_argument("checkpoint", help="loralib .pt/.bin file")
    c.add_argument("--model", required=True, help="the base model the checkpoint was trained on")
    c.add_argument("--alpha", type=float, required=True, help="lora_alpha used in training")
    c.add_argument("--output", required=True)
    c.add_argument("--task", default="causal-lm", choices=["causal-lm", "classification", "regression"])
    c.add_argument("--num-labels", type=int, default=None)
    c.add_argument("--slices", help="MergedLinear enabled slices, e.g. true,false,true")
    c.set_defaults(func=cmd_convert)
    from .serve.cli import add_parser as add_serve_parser  # imports argparse and pathlib only, until run
    add_serve_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except LoraError as exc:
        if args.debug:
            raise
        world = int(os.environ.get("WORLD_SIZE", 1))
        where = f" [rank {os.environ.get('RANK', 0)} of {world}]" if world > 1 else ""
        print(f"lorakit {args.command}{where}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        from .train.checkpoints import disk_full
        if args.debug or not disk_full(exc):
            raise
        where = getattr(exc, "filename", None) or getattr(args, "output", None) or getattr(args, "output_dir", None)
        print(f"lorakit {args.command}: error: No space left on device{f' writing {where}' if where else ''}. "
              "Free space on that disk, or write to another one.", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
