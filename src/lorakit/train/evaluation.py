"""Evaluation during and after training: task metrics on a held-out split, generation, the best adapter."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from ..data import PadCollator
from ..distributed import Context
from .config import RunConfig, autocast
from .splits import Split


@torch.no_grad()
def generate_texts(model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 16,
                   adapters: list[str | None] | None = None, cuda_graphs: str = "auto", **gen_kwargs) -> list[str]:
    """Complete each prompt (greedy unless gen_kwargs say otherwise); returns only the new text.

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
            enc = tokenizer(chunk, return_tensors="pt", padding=True).to(device)
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
        if data.task == "sft" and cfg.eval_generate and data.prompt_column in split.records[0]:
            records = split.records[:n]
            prompts = [r[data.prompt_column] + data.separator for r in records]
            refs = [r[data.completion_column] for r in records]
            # decoding is bound by reading the weights: large batches cost little more than one prompt
            hyps = generate_texts(model, tokenizer, prompts, cfg.max_new_tokens, batch_size=64,
                                  cuda_graphs=cfg.cuda_graphs)
            if score_fn is not None:
                result["score"] = float(score_fn(hyps, refs))
            else:
                result["exact_match"] = sum(h.strip() == r.strip() for h, r in zip(hyps, refs)) / max(len(refs), 1)
    elif data.task == "classification":
        result.update(metrics.classification_scores(preds, golds))
    else:
        result.update(metrics.regression_scores(preds, golds))
    return result



def metric_key(result: dict[str, float]) -> tuple[str, bool]:
    """The headline metric and whether higher is better."""
    for key in ("score", "exact_match", "accuracy", "pearson"):
        if key in result:
            return key, True
    return "loss", False


def track_best(model, out: Path, result, best, step, full: bool, ctx: Context | None = None):
    key, higher = metric_key(result)
    value = result[key]
    if best is None or (value > best["value"] if higher else value < best["value"]):
        if not full:
            (ctx or Context()).save_adapter(model, out / "best")
        return {"metric": key, "value": value, "step": step}
    return best


def fmt(result: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items())


