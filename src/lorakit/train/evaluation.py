"""Evaluation during and after training: task metrics on a held-out split, generation, the best adapter."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from ..data import DataConfig, PadCollator
from ..data.examples import chat_prompt_ids
from ..distributed import Context
from ..errors import ConfigError
from .config import RunConfig, autocast
from .splits import Split


@torch.no_grad()
def generate_texts(model: nn.Module, tokenizer, prompts: list[str | list[int]], max_new_tokens: int,
                   batch_size: int = 16, adapters: list[str | None] | None = None, cuda_graphs: str = "auto",
                   **gen_kwargs) -> list[str]:
    """Complete each prompt (greedy unless gen_kwargs say otherwise); returns only the new text.

    A prompt is text (encoded with the tokenizer's special tokens, as training encodes a prompt column)
    or a list of token ids used as they are (e.g. `chat_prompt_ids` of a conversation).

    With `adapters`, prompt i goes through adapter adapters[i] (None = base), all in one batch.
    Greedy decoding and sampling (temperature, top_k, top_p, min_p) on a GPU run through `lk.Decoder` (each token
    one CUDA graph replay; greedy: the same tokens as `model.generate`, sampling: the same distribution;
    `adapters` included) unless cuda_graphs is "off"; the rest (beams, other settings, CPU) through
    `model.generate`.
    """
    from ..fast.decode import Decoder, decode_unsupported
    from ..inject import route

    model.eval()
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # every prompt ends at the last position
    outputs: list[str] = []
    beams = int(gen_kwargs.get("num_beams", 1))
    kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, do_sample=False)
    kwargs.update(gen_kwargs)
    decoder = None
    if device.type == "cuda" and cuda_graphs != "off" and decode_unsupported(model, kwargs) is None:
        decoder = Decoder(model, cuda_graphs)
    sampling = {k: kwargs.get(k) for k in ("temperature", "top_k", "top_p", "min_p")}
    sampling["do_sample"] = bool(kwargs["do_sample"])
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            enc = {k: v.to(device) for k, v in _left_padded(tokenizer, chunk).items()}
            if decoder is not None:
                out = decoder(enc["input_ids"], enc["attention_mask"], max_new_tokens,
                              pad_token_id=kwargs["pad_token_id"],
                              adapters=None if adapters is None else adapters[start:start + batch_size], **sampling)
            elif adapters is not None:
                names = [n for n in adapters[start:start + batch_size] for _ in range(beams)]
                with route(model, names):
                    out = model.generate(**enc, **kwargs)
            else:
                out = model.generate(**enc, **kwargs)
            new = out[:, enc["input_ids"].shape[1]:]
            outputs.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
    if decoder is not None and decoder.eager_reason:
        warnings.warn(f"decoding ran eagerly: {decoder.eager_reason}", stacklevel=2)
    return outputs


def _left_padded(tokenizer, prompts: list[str | list[int]]) -> dict[str, torch.Tensor]:
    """A batch of prompts (texts or token ids), padded on the left: input_ids, attention_mask (batch, longest)."""
    texts = [p for p in prompts if isinstance(p, str)]
    encoded = iter(tokenizer(texts)["input_ids"] if texts else [])
    ids = [list(next(encoded)) if isinstance(p, str) else list(p) for p in prompts]
    longest = max(len(x) for x in ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return {"input_ids": torch.tensor([[pad] * (longest - len(x)) + x for x in ids], dtype=torch.long),
            "attention_mask": torch.tensor([[0] * (longest - len(x)) + [1] * len(x) for x in ids], dtype=torch.long)}


def generation_pairs(records: list[dict], tokenizer, data: DataConfig,
                     source: str = "the data") -> tuple[list[str | list[int]], list[str]]:
    """(prompts, references) for generating sft completions: a conversation's prompt is the token ids training
    saw before its last assistant turn (turns after it are left out), and that turn's text is the reference; a
    prompt/completion record gives `prompt + separator` and the completion.

    Raises:
        ConfigError: a conversation without an assistant turn, or a record without the columns.
    """
    prompts: list[str | list[int]] = []
    refs: list[str] = []
    from ..data.chat import detect_chat_format, to_messages

    for i, rec in enumerate(records):
        layout = data.chat_format if data.chat_format != "auto" else \
            detect_chat_format(rec, data.messages_column, data.prompt_column)
        messages = to_messages(rec, layout, i, source, data.messages_column) \
            if layout in ("messages", "sharegpt", "alpaca") else None
        if messages is not None:
            last = max((k for k, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "assistant"),
                       default=None) if isinstance(messages, list) else None
            if last is None:
                raise ConfigError(f"Record {i} of {source} has no assistant turn, so there is no reply to score. "
                                  "Add the expected reply as a {'role': 'assistant', 'content': ...} message.")
            prompts.append(chat_prompt_ids(tokenizer, messages[:last + 1], source=f"record {i} of {source}"))
            refs.append(str(messages[last].get("content", "")))
            continue
        missing = [c for c in (data.prompt_column, data.completion_column) if c not in rec]
        if missing:
            raise ConfigError(f"Record {i} of {source} has no column {missing[0]!r}; it has: "
                              f"{', '.join(map(str, rec)) or '(none)'}. Name the input and reference columns with "
                              f"--prompt-column and --completion-column, or give conversations in a "
                              f"{data.messages_column!r} column (--messages-column).")
        prompts.append(str(rec[data.prompt_column]) + data.separator)
        refs.append(str(rec[data.completion_column]))
    return prompts, refs


@torch.no_grad()
def evaluate(model: nn.Module, tokenizer, split: Split, run_cfg: RunConfig, device: torch.device,
             score_fn=None) -> dict[str, float]:
    """Task metrics on a held-out split: loss (+ perplexity) for sft/lm, accuracy/F1/MCC for
    classification, Pearson/Spearman for regression, and, for sft with eval_generate, the
    generation metric (`score_fn(predictions, references)`, or BLEU & co. via lorakit.eval.metrics)."""
    from ..eval import metrics

    cfg, data = run_cfg.train, run_cfg.data
    n = len(split.examples) if not cfg.max_eval_examples else min(cfg.max_eval_examples, len(split.examples))
    examples = split.examples[:n]
    model.eval()
    collate = PadCollator(tokenizer.pad_token_id)
    losses, weights, preds, golds = [], [], [], []
    for start in range(0, n, cfg.batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[start:start + cfg.batch_size]).items()}
        with autocast(device, cfg.precision):
            out = model(**batch)
        if data.task in ("sft", "lm"):
            tokens = int((batch["labels"][:, 1:] != -100).sum())
            losses.append(float(out.loss) * tokens)
            weights.append(tokens)
        elif data.task == "classification":
            preds += out.logits.argmax(-1).tolist()
            golds += batch["labels"].tolist()
        else:
            preds += out.logits.squeeze(-1).float().tolist()
            golds += batch["labels"].tolist()
    result: dict[str, float] = {}
    if data.task in ("sft", "lm"):
        result["loss"] = sum(losses) / max(sum(weights), 1)
        result["perplexity"] = metrics.perplexity(result["loss"])
        if data.task == "sft" and cfg.eval_generate:
            prompts, refs = generation_pairs(split.records[:n], tokenizer, data)
            # decoding is bound by reading the weights: large batches cost little more than one prompt
            hyps = generate_texts(model, tokenizer, prompts, cfg.max_new_tokens, batch_size=64,
                                  cuda_graphs=cfg.cuda_graphs)
            if score_fn is not None:
                result["score"] = float(score_fn(hyps, refs))
            else:
                result["exact_match"] = sum(h.strip() == r.strip() for h, r in zip(hyps, refs)) / max(len(refs), 1)
    elif data.task == "classification":
        result.update(metrics.classification_scores(preds, golds))
        if n > 1 and len(set(preds)) == 1 and len(set(golds)) > 1:
            names = split.stats.label_names
            label = names[preds[0]] if names and preds[0] < len(names) else preds[0]
            warnings.warn(f"every one of the {n} held-out predictions is class {label!r} while the labels hold "
                          f"{len(set(golds))} classes: the classifier collapsed to one class (accuracy "
                          f"{result['accuracy']:.3f} is that class's share; mcc {result['mcc']:.3f}). Try another "
                          "--lr, more steps, or balanced data.", CollapsedPredictions, stacklevel=2)
    else:
        result.update(metrics.regression_scores(preds, golds))
    return result



class CollapsedPredictions(UserWarning):
    """A classifier predicted one class for every held-out example."""


#: metrics where lower is better; every other reported metric is better higher
LOWER_IS_BETTER = ("loss", "perplexity")

#: the official metric of GLUE tasks whose headline is not accuracy, by the task's folder or file name
GLUE_METRICS = {"cola": "mcc", "sts-b": "pearson", "stsb": "pearson", "mrpc": "f1", "qqp": "f1"}

#: the metrics `evaluate` reports, by data task (sft also `score` for the built-in task)
REPORTED = {"sft": ("loss", "perplexity", "exact_match", "score"), "lm": ("loss", "perplexity"),
            "classification": ("accuracy", "f1", "mcc"), "regression": ("pearson", "spearman", "corr")}


def official_metric(task: str, eval_file: str | None) -> str:
    """The task's official metric: GLUE's for a file under a GLUE task's folder (CoLA: mcc, STS-B: pearson,
    MRPC and QQP: f1), else accuracy for classification, pearson for regression, loss for lm, and for sft the
    generation score (exact_match, or the built-in task's score)."""
    if eval_file:
        for part in reversed(Path(eval_file).parts):
            for name, metric in GLUE_METRICS.items():
                if part.lower() == name or part.lower().startswith(name + "."):
                    return metric
    return {"classification": "accuracy", "regression": "pearson", "lm": "loss"}.get(task, "exact_match")


def metric_key(result: dict[str, float], cfg=None, task: str | None = None) -> tuple[str, bool]:
    """The headline metric of `result` and whether higher is better: `cfg.metric_for_best` (a TrainConfig) when
    set, else the task's official metric (`official_metric`), else the loss.

    Raises:
        ConfigError: metric_for_best names a metric that `result` does not hold.
    """
    chosen = getattr(cfg, "metric_for_best", "auto") if cfg is not None else "auto"
    if chosen != "auto":
        if chosen not in result:
            raise ConfigError(f"--metric-for-best {chosen}: the evaluation reports {', '.join(result)}; "
                              "pick one of them.")
        greater = getattr(cfg, "greater_is_better", None)
        return chosen, (chosen not in LOWER_IS_BETTER) if greater is None else bool(greater)
    official = official_metric(task or "sft", getattr(cfg, "eval_file", None))
    for key in (official, "score", "exact_match", "accuracy", "pearson"):
        if key in result:
            return key, key not in LOWER_IS_BETTER
    return "loss", False


def track_best(model, out: Path, result, best, step, full: bool, ctx: Context | None = None, run_cfg=None):
    key, higher = metric_key(result, run_cfg and run_cfg.train, run_cfg and run_cfg.data.task)
    value = result[key]
    if best is None or (value > best["value"] if higher else value < best["value"]):
        if not full:
            (ctx or Context()).save_adapter(model, out / "best")
        return {"metric": key, "value": value, "step": step}
    return best


def fmt(result: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items())


