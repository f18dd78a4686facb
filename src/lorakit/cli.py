"""The `lorakit` command: train | eval | generate | merge | combine | serve | analyze | convert.

`train` and `eval` flags are generated from the fields of TrainConfig, DataConfig and
LoraConfig (`--batch-size` sets TrainConfig.batch_size, `--r` sets LoraConfig.r, ...);
`--config run.yaml` loads the same fields from YAML (flat, or in train/data/lora sections),
and flags given on the command line override it: defaults < YAML < flags.

Values are checked as data before anything loads: a YAML `lr: 1e-3` (which PyYAML reads as text) is the
number it means, and a value of the wrong type is named with its flag and file. `eval` and `generate` list
only the flags that apply to them; `--config` also takes a run's saved run_config.yaml.

Errors a user can fix print as one paragraph (exit code 2) that names flags, not Python fields; a mistyped
flag prints a one-line usage and the error; `--debug` shows the traceback.

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
import types
import typing
import warnings
from pathlib import Path
from typing import Any

from . import combine_cli
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
    docs = _args_section(inspect.getdoc(cls) or "")
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return docs
    body = tree.body[0].body
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr)
                and isinstance(getattr(nxt, "value", None), ast.Constant)):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def _args_section(doc: str) -> dict[str, str]:
    """`name: text` entries of a Google-style `Args:` section, for fields documented there."""
    docs: dict[str, str] = {}
    lines = doc.splitlines()
    if "Args:" not in [line.strip() for line in lines]:
        return docs
    name = None
    for line in lines[[line.strip() for line in lines].index("Args:") + 1:]:
        entry = re.match(r"^    (\w+): (.*)$", line)
        if entry:
            name = entry.group(1)
            docs[name] = entry.group(2).strip()
        elif name and line.startswith("        "):
            docs[name] += " " + line.strip()
        elif line.strip():
            break
    return docs


def _alternatives(kind: Any) -> tuple[Any, ...]:
    """The types of a union (`str | None` -> (str, NoneType)); any other type alone."""
    return typing.get_args(kind) if typing.get_origin(kind) in (typing.Union, types.UnionType) else (kind,)


def _is_bool(kind: Any) -> bool:
    """bool, or bool | None."""
    return kind is bool or set(typing.get_args(kind)) == {bool, type(None)}


def _expected(kind: Any) -> str:
    """What a value of `kind` looks like, for error messages."""
    names = {bool: "true or false", int: "a whole number", float: "a number", str: "text", type(None): "none"}
    parts = []
    for k in _alternatives(kind):
        origin = typing.get_origin(k)
        parts.append(names.get(k) or {list: "a list", dict: "a mapping"}.get(origin, str(k)))
    return " or ".join(dict.fromkeys(parts))


def _parse_value(kind: Any, text: str):
    """Turn a flag string into the field's type (bool, int, float, list/dict as JSON or comma list).

    Raises:
        argparse.ArgumentTypeError: text that is not a value of that type (the message says what was expected).
    """
    origin = typing.get_origin(kind)
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    bad = argparse.ArgumentTypeError(f"expected {_expected(kind)}, got {text!r}")
    if text.lower() in ("none", "null") and type(None) in typing.get_args(kind):
        return None
    if _is_bool(kind):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise bad
    if kind in (int, float):
        try:
            number = float(text)  # (YAML 1.1 reads 1e-3 as text: it arrives here too)
        except ValueError:
            raise bad from None
        if kind is int:
            if not number.is_integer():
                raise bad
            return int(number)
        return number
    if origin is dict or (args and typing.get_origin(args[0]) is dict):
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            raise argparse.ArgumentTypeError(f"expected a JSON mapping such as '{{\"q_proj\": 4}}', "
                                             f"got {text!r}") from None
        if not isinstance(value, dict):
            raise bad
        return value
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


def _coerce(kind: Any, value: Any):
    """A YAML value as the field's type: text goes through the flag parser (so `lr: 1e-3`, which PyYAML reads as
    text, is a number); other values must already be of the type (an int is also a float).

    Raises:
        argparse.ArgumentTypeError: a value of another type (the message says what was expected).
    """
    if isinstance(value, str):
        return _parse_value(kind, value)
    for k in _alternatives(kind):
        origin = typing.get_origin(k) or k
        if value is None and k is type(None):
            return None
        if isinstance(value, bool):
            if k is bool:
                return value
        elif k is float and isinstance(value, (int, float)):
            return float(value)
        elif k is int and (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            return int(value)
        elif origin in (list, dict) and isinstance(value, origin):
            return value
    raise argparse.ArgumentTypeError(f"expected {_expected(kind)}, got {value!r}")


def _flag_parser(kind: Any):
    """The argparse `type` of a field: named, so that argparse's own messages never say `<lambda>`."""
    def parse(text: str):
        return _parse_value(kind, text)
    parse.__name__ = _expected(kind)
    return parse


#: TrainConfig fields that `eval` uses (the rest are about training: a run_config.yaml may hold them all)
EVAL_TRAIN_FIELDS = ("model", "eval_file", "quantize", "batch_size", "seed", "precision", "max_eval_examples",
                     "max_new_tokens", "eval_generate", "threads", "cuda_graphs")


def _eval_data_fields() -> tuple[str, ...]:
    """DataConfig's fields that `eval` takes: all but the training-only ones (packing)."""
    return tuple(f.name for f in dataclasses.fields(_section_classes()["data"]) if f.name != "packing")


def add_config_flags(parser: argparse.ArgumentParser, sections=("train", "data", "lora"),
                     only: dict[str, tuple[str, ...]] | None = None) -> None:
    """One flag per field of each section's dataclass (`--batch-size` sets TrainConfig.batch_size), with the
    field's documentation as help; `only` limits a section to some of its fields."""
    classes = _section_classes()
    for section in sections:
        cls = classes[section]
        group = parser.add_argument_group(f"{section} settings")
        docs = _field_docs(cls)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if only and section in only and f.name not in only[section]:
                continue
            flag = "--" + f.name.replace("_", "-")
            kind = hints[f.name]
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            help_text = docs.get(f.name, "")
            help_text = f"{help_text} (default: {default!r})".strip().replace("%", "%%")
            dest = f"{section}.{f.name}"
            if _is_bool(kind):
                group.add_argument(flag, dest=dest, nargs="?", const=True, default=argparse.SUPPRESS, metavar="BOOL",
                                   type=_flag_parser(kind), help=help_text)
            elif "const" in f.metadata:  # a switch with more states than two: the flag alone means `const`
                group.add_argument(flag, dest=dest, nargs="?", const=f.metadata["const"], default=argparse.SUPPRESS,
                                   metavar=f.name.upper(), type=_flag_parser(kind), help=help_text)
            else:
                group.add_argument(flag, dest=dest, default=argparse.SUPPRESS, metavar=f.name.upper(),
                                   type=_flag_parser(kind), help=help_text)


def resolve_config(args: argparse.Namespace, sections=("train", "data", "lora"), builtin: bool | None = None):
    """defaults < YAML (--config) < flags -> {"train": TrainConfig, "data": DataConfig, "lora": LoraConfig}.

    The built-in demo task's tuned settings replace the defaults when `builtin` is true; None means: when
    training ("lora" in sections) without a train_file.

    Raises:
        ConfigError: an unreadable or unknown YAML file or setting, or a value of the wrong type (named with
            its flag and file).
    """
    classes = _section_classes()
    values: dict[str, dict[str, Any]] = {s: {} for s in sections}
    if getattr(args, "config", None):
        values = _merge_yaml(values, Path(args.config), sections)
    for key, value in vars(args).items():
        if "." in key:
            section, name = key.split(".", 1)
            if section in values:
                values[section][name] = value
    if builtin is None:
        builtin = "lora" in sections and values["train"].get("train_file") is None
    if builtin:
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


def _merge_yaml(values, path: Path, sections):
    """Settings of a YAML file (flat, or in train/data/lora sections) into `values`, each checked and converted
    to its field's type. Sections this command does not use (the lora section of a run_config.yaml, for
    `eval`) are skipped."""
    import yaml
    classes = _section_classes()
    owner = {f.name: s for s in SECTIONS for f in dataclasses.fields(classes[s])}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--config {path} cannot be read: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path} must hold a mapping of settings.")
    settings = []
    for key, value in data.items():
        if key in SECTIONS and isinstance(value, dict):
            for k, v in value.items():
                if owner.get(k) != key:
                    raise ConfigError(f"--config {path}: unknown {key} setting {k!r}.")
                settings.append((key, k, v))
        elif key in owner:
            settings.append((owner[key], key, value))
        else:
            raise ConfigError(f"--config {path}: unknown setting {key!r}. Known: {', '.join(sorted(owner))}.")
    for section, name, value in settings:
        if section not in sections:
            continue
        kind = typing.get_type_hints(classes[section])[name]
        try:
            values[section][name] = _coerce(kind, value)
        except argparse.ArgumentTypeError as exc:
            raise ConfigError(f"--{name.replace('_', '-')} / `{name}:` in {path}: {exc}.") from None
    return values


# -- subcommands ----------------------------------------------------------------------------------------
def add_decoding_flags(parser: argparse.ArgumentParser) -> None:
    """--length-penalty and --no-repeat-ngram-size: the decoding options of the LoRA paper's E2E recipe."""
    parser.add_argument("--length-penalty", type=float, default=1.0,
                        help="beam search: score = log-probability / length ** this (default 1.0; the paper's E2E "
                             "recipe uses 0.9 with --num-beams 10)")
    parser.add_argument("--no-repeat-ngram-size", type=int, default=0,
                        help="never repeat an n-gram of this many tokens in an output (default 0: off; the paper's "
                             "E2E recipe uses 4)")


def decoding_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """`model.generate` keyword arguments of the decoding flags that differ from the defaults.

    Raises:
        ConfigError: --num-beams below 1, --length-penalty without beams, a negative --no-repeat-ngram-size.
    """
    if args.num_beams < 1:
        raise ConfigError(f"--num-beams must be >= 1, got {args.num_beams}.")
    if args.no_repeat_ngram_size < 0:
        raise ConfigError(f"--no-repeat-ngram-size must be >= 0 (0: off), got {args.no_repeat_ngram_size}.")
    kwargs: dict[str, Any] = {"num_beams": args.num_beams}
    if args.length_penalty != 1.0:
        if args.num_beams == 1:
            raise ConfigError("--length-penalty changes how beam search ranks its beams; it needs --num-beams 2 or "
                              "more (greedy decoding has no ranking to change).")
        kwargs["length_penalty"] = args.length_penalty
    if args.no_repeat_ngram_size:
        kwargs["no_repeat_ngram_size"] = args.no_repeat_ngram_size
    return kwargs


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
        key, _ = metric_key(after, cfg, run_cfg.data.task)
        label = "exact match on held-out examples" if cfg.train_file is None and key == "score" else key
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
    hint = try_it(run_cfg, summary)
    if hint:
        print(f"try it:\n  {hint}")


def try_it(run_cfg, summary) -> str | None:
    """A `lorakit generate` command line that asks the trained adapter what the first held-out (else training)
    record asks, in the form it was trained on: a chat turn for conversations (--system for their system
    message, --input-file for several turns), --raw text for prompt/completion data. None: not an sft adapter,
    or no record to show."""
    cfg = run_cfg.train
    if cfg.full or run_cfg.data.task != "sft":
        return None
    words = ["lorakit", "generate", "--model", shlex.quote(cfg.model),
             "--adapter", shlex.quote(summary["adapter_dir"])]
    if summary.get("example_messages") is not None:
        turns = summary["example_messages"]
        system = [m for m in turns if m.get("role") == "system"]
        rest = [m for m in turns if m.get("role") != "system"]
        if len(system) <= 1 and len(rest) == 1 and rest[0].get("role") == "user":
            if system:
                words += ["--system", shell_quote(str(system[0].get("content", "")))]
            words += ["--prompt", shell_quote(str(rest[0].get("content", "")))]
        else:  # several turns: the data file holds them as one conversation per line
            words += ["--input-file", shlex.quote(cfg.eval_file or cfg.train_file or "")]
    elif summary.get("example_prompt") is not None:
        # trained on plain text: --raw keeps a chat model's template out, as in training
        words += ["--raw", "--prompt", shell_quote(summary["example_prompt"])]
    else:
        return None
    return " ".join(words + ["--max-new-tokens", str(cfg.max_new_tokens)])


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
    parts = resolve_config(args, ("train", "data"), builtin=args.builtin_task)
    run_cfg = T.RunConfig(parts["train"], parts["data"])
    cfg, data = run_cfg.train.validate(), run_cfg.data.validate()
    if cfg.eval_file is not None and args.builtin_task:
        raise ConfigError(f"--builtin-task scores the built-in demo task, but --eval-file {cfg.eval_file} is set "
                          "(perhaps by --config): drop one of them.")
    if cfg.eval_file is None and not args.builtin_task:
        raise ConfigError("Nothing to evaluate: pass --eval-file FILE (held-out data in the training format), or "
                          "--config RUN_DIR/run_config.yaml of a run trained with --eval-file. --builtin-task "
                          "scores the built-in demo task's held-out examples instead.")
    adapters = [adapter_spec(spec) for spec in args.adapter or []]
    if len(adapters) > 1:
        raise ConfigError(f"{len(adapters)} --adapter given; eval scores one adapter at a time: run it once per "
                          "adapter (or `lorakit combine` them into one adapter first).")
    score_fn, eval_records = None, None
    if cfg.eval_file is None:
        from . import tasks
        _, eval_records = tasks.builtin_task(int(tasks.DEFAULT_HPARAMS["n_train"]),
                                             int(tasks.DEFAULT_HPARAMS["n_eval"]), seed=cfg.seed)
        score_fn = tasks.score
        if data.task != "sft":
            raise ConfigError(f"--builtin-task is an sft task; drop --task {data.task}.")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    label_names = data.labels
    num_labels = len(label_names) if label_names else None
    if data.task == "classification" and label_names is None:
        from .data import read_records, resolve_labels
        recs = read_records(cfg.eval_file, data)
        _, label_names = resolve_labels([r.get(data.label_column) for r in recs], None, source=cfg.eval_file,
                                        column=data.label_column)
        num_labels = len(label_names)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    model, tokenizer = load_model(cfg.model, task=T.model_task(data), num_labels=num_labels, quantize=cfg.quantize)
    for name, path in adapters:  # (unmerged: nothing merges into a quantized layer)
        load_adapter(model, path, name=name)
    if cfg.quantize is None:  # a quantized model was loaded onto its device
        model.to(device)
    split = T.read_split(cfg.eval_file, eval_records, tokenizer, data, label_names)
    print(_eval_header(cfg, data, split, adapters), file=sys.stderr)  # (stdout holds the JSON result only)
    result = T.evaluate(model, tokenizer, split, run_cfg, device, score_fn)
    if args.generation_metrics and data.task == "sft":
        result.update(_generation_metrics(model, tokenizer, split, cfg, data, args))
    stats = split.stats
    result.update(examples_scored=min(cfg.max_eval_examples or stats.num_examples, stats.num_examples),
                  examples_read=stats.num_records, examples_truncated=stats.num_truncated,
                  examples_dropped=stats.num_dropped)
    print(json.dumps(result, indent=2))
    return 0


def _eval_header(cfg, data, split, adapters) -> str:
    """What `eval` scores: the model and adapter, the data, how many examples, truncated and dropped."""
    stats = split.stats
    scored = min(cfg.max_eval_examples or stats.num_examples, stats.num_examples)
    what = f"adapter {adapters[0][1]} on {cfg.model}" if adapters else f"{cfg.model} (no adapter)"
    source = cfg.eval_file or "the built-in demo task's held-out examples"
    cap = f" (--max-eval-examples {cfg.max_eval_examples}; 0 scores all)" if scored < stats.num_examples else ""
    return (f"lorakit eval: {what} on {source} ({data.task}): scoring {scored} of {stats.num_examples} "
            f"examples{cap}; of {stats.num_records} records read, {stats.num_truncated} truncated to "
            f"--max-length {data.max_length} and {stats.num_dropped} dropped (no completion token left)")


def _generation_metrics(model, tokenizer, split, cfg, data, args) -> dict[str, Any]:
    """BLEU, NIST, METEOR, ROUGE-L, CIDEr with every reference of a prompt (E2E-style data); for conversations,
    of the last assistant turn, generated from the turns before it as training saw them.

    References of one prompt are consecutive records, grouped as the official E2E scorer does."""
    from .eval import metrics
    from .train import generate_texts
    from .train.evaluation import generation_pairs
    prompts, refs = generation_pairs(split.records, tokenizer, data, source=str(cfg.eval_file or "the data"))
    groups: list[tuple[Any, list[str]]] = []
    for prompt, ref in zip(prompts, refs):
        if groups and groups[-1][0] == prompt:
            groups[-1][1].append(ref)
        else:
            groups.append((prompt, [ref]))
    groups = groups[: cfg.max_eval_examples or None]
    hyps = generate_texts(model, tokenizer, [p for p, _ in groups], cfg.max_new_tokens, cuda_graphs=cfg.cuda_graphs,
                          **decoding_kwargs(args))
    scores = metrics.generation_scores(hyps, [r for _, r in groups])
    if args.predictions:
        Path(args.predictions).write_text("\n".join(h.strip() for h in hyps) + "\n")
    return scores.as_dict()


def read_prompts(path: str) -> list[str | list[dict]]:
    """The prompts of a --input-file: a line holding a JSON object with "messages" (or a ShareGPT
    "conversations" list, or Alpaca's "instruction" and "output") is a conversation, one with "prompt" is that
    text, any other line is a prompt as it stands (blank lines skipped).

    Raises:
        ConfigError: a missing file, or a line that looks like a JSON object (starts with "{") but is not valid
            JSON or holds neither "messages" nor "prompt".
    """
    from .data.chat import detect_chat_format, to_messages
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        raise ConfigError(f"--input-file {path}: no such file.") from None
    prompts: list[str | list[dict]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if not line.lstrip().startswith("{"):
            prompts.append(line)
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        layout = detect_chat_format(record, "messages", "prompt") if isinstance(record, dict) else None
        if layout in ("sharegpt", "alpaca") or (layout == "messages" and isinstance(record["messages"], list)):
            prompts.append(to_messages(record, layout, number, f"--input-file {path} (line {number})"))
        elif isinstance(record, dict) and isinstance(record.get("prompt"), str):
            prompts.append(record["prompt"])
        else:
            raise ConfigError(f"--input-file {path}, line {number}: expected a JSON object with \"messages\" "
                              "(a list of {\"role\", \"content\"}) or \"prompt\", or a plain-text prompt; got "
                              f"{line[:80]!r}.")
    return prompts


def chat_prompts(tokenizer, prompts: list[str | list[dict]], system: str | None, raw: bool,
                 model: str) -> list[str | list[int]]:
    """What the model reads for each prompt: with a chat template (and not --raw), a text becomes a user turn
    (after a --system turn) and a conversation is rendered as training renders it (`chat_prompt_ids`: the same
    template, special tokens and token ids); with --raw, or a tokenizer without a template, texts stay as they
    are.

    Raises:
        ConfigError: --system or a conversation where no chat template applies.
    """
    from .data.examples import chat_prompt_ids
    templated = bool(getattr(tokenizer, "chat_template", None)) and not raw
    if not templated:
        why = "--raw is set" if raw else f"the tokenizer of {model} has no chat template"
        if system is not None:
            raise ConfigError(f"--system needs a chat template, but {why}: drop --system (or --raw), or write the "
                              "instruction into the prompt.")
        if any(not isinstance(p, str) for p in prompts):
            raise ConfigError(f"--input-file holds conversations (\"messages\"), which need a chat template, but "
                              f"{why}: give plain prompts, or a chat model.")
        return list(prompts)
    out: list[str | list[int]] = []
    for i, p in enumerate(prompts):
        turns = [{"role": "user", "content": p}] if isinstance(p, str) else list(p)
        if system is not None and not any(isinstance(m, dict) and m.get("role") == "system" for m in turns):
            turns = [{"role": "system", "content": system}, *turns]
        out.append(chat_prompt_ids(tokenizer, turns, source=f"prompt {i + 1}"))
    return out


def cmd_generate(args) -> int:
    import torch

    from .inject import set_adapter
    from .io import load_adapter
    from .models import load_model
    from .train import generate_texts
    prompts: list[str | list[dict]] = list(args.prompt or [])
    if args.input_file:
        prompts += read_prompts(args.input_file)
    if not prompts:
        raise ConfigError("Nothing to generate from: pass --prompt TEXT (repeatable) or --input-file FILE.")
    adapters = [adapter_spec(spec) for spec in args.adapter or []]
    names = [name for name, _ in adapters]
    if len(set(names)) < len(names):
        raise ConfigError(f"Two --adapter share the name {sorted(n for n in names if names.count(n) > 1)[0]!r}: "
                          "name each one, e.g. --adapter a=DIR1 --adapter b=DIR2.")
    routes = None
    if args.route:
        routes = [None if n in ("", "none", "base") else n for n in args.route.split(",")]
        if len(routes) != len(prompts):
            raise ConfigError(f"--route names {len(routes)} adapters but there are {len(prompts)} prompts; "
                              "give one name (or 'base') per prompt.")
    elif len(names) > 1:
        print(f"lorakit generate: warning: {len(names)} adapters ({', '.join(names)}) and no --route: every prompt "
              "goes through their sum (their updates add). Pass --route with one adapter name (or 'base') per "
              "prompt to use them apart.", file=sys.stderr)
    model, tokenizer = load_model(args.model, quantize=args.quantize)
    for name, path in adapters:
        load_adapter(model, path, name=name)
    if args.quantize is None:  # a quantized model was loaded onto its device
        model.to("cuda" if torch.cuda.is_available() else "cpu")
    if not routes and len(names) > 1:
        set_adapter(model, names)
    inputs = chat_prompts(tokenizer, prompts, args.system, args.raw, args.model)
    kwargs = decoding_kwargs(args)
    if args.sample:
        kwargs.update(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                      min_p=args.min_p)
        torch.manual_seed(args.seed)
    outs = generate_texts(model, tokenizer, inputs, args.max_new_tokens, adapters=routes,
                          cuda_graphs=args.cuda_graphs, **kwargs)
    for i, (p, o) in enumerate(zip(prompts, outs)):
        tag = f" [{routes[i] or 'base'}]" if routes else ""
        shown = p if isinstance(p, str) else next((str(m.get("content")) for m in reversed(p)
                                                   if isinstance(m, dict) and m.get("role") == "user"), "")
        print(f"### prompt{tag}: {shown}\n{o.strip()}\n")
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

    from .inject import active_adapters, eject, lora_layers, merge
    from .io import load_adapter, umask_mode
    from .models import load_model
    from .quant import dequantize_model
    from .train.rundir import check_output_dir
    out = Path(args.output)
    check_output_dir(out, "--output")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty; pick a new --output directory.")
    task = {"causal-lm": "causal-lm", "classification": "sequence-classification"}.get(args.task, args.task)
    if args.requantize and not args.quantize:
        raise ConfigError("--requantize needs --quantize: the adapter's update is measured against the quantized "
                          "base it was trained on. Pass --quantize with the kind the adapter was trained with.")
    model, tokenizer = load_model(args.model, task=task, num_labels=args.num_labels, quantize=args.quantize)
    load_adapter(model, args.adapter)
    model.eval()
    # the quantized layers as they are before the merge (their packed weights and adapters), for --requantize
    quantized = {path: layer for path, layer in lora_layers(model) if layer.quantized}
    active = active_adapters(model)
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
        if args.requantize:  # quantized again as transformers loads it, then saved in its quantized form
            from .quant import requantize_loss
            requantized, _ = load_model(str(tmp), task=task, num_labels=args.num_labels, quantize=args.requantize)
            loss = requantize_loss(quantized, active, model, requantized)
            for f in list(tmp.iterdir()):
                if f.name.startswith("model") and f.suffix in (".safetensors", ".json") and f.name != "config.json":
                    f.unlink()
            requantized.save_pretrained(str(tmp), safe_serialization=True)
        for f in tmp.rglob("*"):  # transformers writes model.safetensors 0600 through a temp file
            if f.is_file() and not f.is_symlink():
                os.chmod(f, umask_mode())
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"merged model written to {out}" + (f", quantized again ({args.requantize})" if args.requantize else ""))
    print(f"max |merged - unmerged| logit difference on a sample: {diff:.3e}")
    if args.requantize:
        print(f"requantized {loss['layers']} adapted layers: weight error against the 16-bit merge max "
              f"{loss['max_abs_error']:.3e}, mean {loss['mean_abs_error']:.3e}; share of the adapter's update kept "
              f"{loss['update_kept']:.3f} (16-bit merge: {loss['update_kept_16bit']:.3f})")
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


class Parser(argparse.ArgumentParser):
    """argparse with short errors: one usage line and the message, not the whole usage of every flag."""

    def error(self, message: str):
        self.exit(2, f"usage: {self.prog} [options]   (see {self.prog} --help)\n{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    p = Parser(prog="lorakit", description="LoRA fine-tuning: train, evaluate, generate, merge, "
               "analyze and convert adapters. `lorakit train` with no flags runs a built-in demo.")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    p.add_argument("--version", action="version", version=f"lorakit {__version__}", help="print the version and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser("train", help="fine-tune a model with LoRA (or --full)",
                       description="Fine-tune with LoRA. With no flags: SmolLM2-135M on a built-in task, on CPU.")
    t.add_argument("--config", help="YAML file with settings (flags override it)")
    t.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="train data-parallel on N processes of this machine (one per GPU; gloo on CPU), "
                        "launched through torchrun; see --strategy")
    add_config_flags(t)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate a model (+ an adapter) on held-out data",
                       description="Score a model, with an adapter, on held-out data. Settings resolve as for train: "
                                   "defaults < --config (a run's run_config.yaml works) < flags.")
    e.add_argument("--config", help="YAML file with settings, e.g. RUN_DIR/run_config.yaml (flags override it)")
    e.add_argument("--adapter", action="append", help="adapter directory (or name=dir) to score")
    e.add_argument("--builtin-task", action="store_true",
                   help="score the built-in demo task's held-out examples (with its settings) instead of --eval-file")
    e.add_argument("--generation-metrics", action="store_true",
                   help="sft: also BLEU, NIST, METEOR, ROUGE-L, CIDEr against all references of each prompt "
                        "(conversations: of their last assistant turn)")
    e.add_argument("--num-beams", type=int, default=1, help="beam width for --generation-metrics")
    add_decoding_flags(e)
    e.add_argument("--predictions", help="write the generated texts here, one per line")
    add_config_flags(e, ("train", "data"), only={"train": EVAL_TRAIN_FIELDS, "data": _eval_data_fields()})
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser("generate", help="generate text with a model and adapters",
                       description="Generate replies. With a chat model (its tokenizer has a chat template) each "
                                   "prompt is a user turn, rendered as training renders conversations; --raw "
                                   "feeds the text as it is (as prompt/completion data was trained).")
    g.add_argument("--model", default="smollm2-135m", help="bundled model name or model directory "
                   "(default: smollm2-135m)")
    g.add_argument("--adapter", action="append", help="adapter directory, or name=dir (repeatable; several without "
                   "--route are summed)")
    g.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    g.add_argument("--input-file", help="prompts: one per line, or JSON lines of {\"messages\": [...]} "
                   "conversations (a last assistant turn is generated anew) or {\"prompt\": ...}")
    g.add_argument("--system", help="a system message before each prompt (chat models)")
    g.add_argument("--raw", action="store_true",
                   help="feed prompts as plain text, without the chat template (as prompt/completion data trains)")
    g.add_argument("--route", help="comma-separated adapter name per prompt ('base' for none), in one batch")
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt (default: 64)")
    g.add_argument("--num-beams", type=int, default=1, help="beam search width (1: greedy)")
    add_decoding_flags(g)
    g.add_argument("--sample", action="store_true", help="sample instead of greedy/beam decoding")
    g.add_argument("--temperature", type=float, default=0.8, help="--sample: softmax temperature (default: 0.8)")
    g.add_argument("--top-p", type=float, default=0.95,
                   help="--sample: nucleus sampling, keep the most likely tokens up to this mass (default: 0.95)")
    g.add_argument("--top-k", type=int, default=None,
                   help="sample from the k most likely tokens only (0: all; default: the model's setting, else 50)")
    g.add_argument("--min-p", type=float, default=None,
                   help="sample only tokens at least this fraction as likely as the most likely one (default: none)")
    g.add_argument("--seed", type=int, default=0, help="--sample: random seed (default: 0)")
    g.add_argument("--cuda-graphs", choices=("auto", "on", "off"), default="auto",
                   help="greedy decoding and sampling on a GPU: each token one CUDA graph replay "
                        "(auto: where it can be captured)")
    g.add_argument("--quantize", choices=QUANTIZE, default=None,
                   help="load the base quantized with bitsandbytes (adapters stay unmerged in float32)")
    g.set_defaults(func=cmd_generate)

    m = sub.add_parser("merge", help="merge an adapter into its base: a plain Hugging Face model directory")
    m.add_argument("--model", required=True, help="the base model the adapter was trained on")
    m.add_argument("--adapter", required=True, help="adapter directory")
    m.add_argument("--output", required=True, help="new directory for the merged model")
    m.add_argument("--task", default="causal-lm", choices=["causal-lm", "classification", "regression"],
                   help="the model head the adapter was trained with (default: causal-lm)")
    m.add_argument("--num-labels", type=int, default=None, help="classification: number of classes")
    m.add_argument("--quantize", choices=QUANTIZE, default=None,
                   help="load the base quantized (bitsandbytes), as the adapter was trained on it; the merged model "
                        "holds dequantize(Wq) + s*B@A in the dequantized dtype (without --quantize, the same "
                        "update goes onto the original 16-bit weights)")
    m.add_argument("--requantize", choices=QUANTIZE, default=None,
                   help="with --quantize: write the merged model quantized again, and report what that loses "
                        "(weight error, share of the adapter's update kept)")
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
    c.add_argument("--output", required=True, help="new adapter directory")
    c.add_argument("--task", default="causal-lm", choices=["causal-lm", "classification", "regression"],
                   help="the model head the checkpoint was trained with (default: causal-lm)")
    c.add_argument("--num-labels", type=int, default=None, help="classification: number of classes")
    c.add_argument("--slices", help="MergedLinear enabled slices, e.g. true,false,true")
    c.set_defaults(func=cmd_convert)
    combine_cli.add_parser(sub)
    from .serve.cli import add_parser as add_serve_parser  # imports argparse and pathlib only, until run
    add_serve_parser(sub)
    return p


def flag_words(message: str) -> str:
    """A library message in the command line's words: settings named as fields (`DataConfig.prompt_column`,
    `max_length=`, `format='tsv'`) become their flags (`--prompt-column`, `--max-length `, `--format tsv`)."""
    classes = _section_classes()
    fields = {f.name for cls in classes.values() for f in dataclasses.fields(cls)}

    def flag(name: str) -> str:
        return "--" + name.replace("_", "-")

    message = re.sub(r"\b(?:DataConfig|TrainConfig|LoraConfig)\.(\w+)",
                     lambda m: flag(m.group(1)) if m.group(1) in fields else m.group(0), message)
    message = re.sub(r"\bformat=\s*'(\w+)'", r"--format \1", message)
    message = re.sub(r"\b(format|source|target)= ", lambda m: "--format " if m.group(1) == "format" else m.group(0),
                     message)
    # a field that "must be" something is a setting whatever its name (`dropout must be a number in [0, 1)`)
    message = re.sub(r"(?<![-\w'\"`/.])(\w+)(?= must )",
                     lambda m: flag(m.group(1)) if m.group(1) in fields else m.group(0), message)
    named = sorted((f for f in fields if "_" in f), key=len, reverse=True)
    # (not inside a path, a quoted column name or a flag already)
    return re.sub(r"(?<![-\w'\"`/.])(" + "|".join(named) + r")\b(=?)",
                  lambda m: flag(m.group(1)) + (" " if m.group(2) else ""), message)


_FORMAT_WARNING = warnings.formatwarning


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """lorakit's own warnings as one line; those of other libraries as Python shows them."""
    if category.__module__.startswith("lorakit"):
        return f"lorakit: warning: {message}\n"
    return _FORMAT_WARNING(message, category, filename, lineno, line)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    warnings.formatwarning = _one_line_warning
    try:
        return args.func(args)
    except LoraError as exc:
        if args.debug:
            raise
        world = int(os.environ.get("WORLD_SIZE", 1))
        where = f" [rank {os.environ.get('RANK', 0)} of {world}]" if world > 1 else ""
        print(f"lorakit {args.command}{where}: error: {flag_words(str(exc))}", file=sys.stderr)
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
