"""How well and how fast does the built-in default task train on this machine?

Fine-tunes smollm2-135m with LoRA on `lorakit.tasks.builtin_task`, using the installed
`peft` as the LoRA implementation, and prints exact-match accuracy on held-out records
before and after training, time per step, and the wall time of every phase. Settings
default to `lorakit.tasks.DEFAULT_HPARAMS`; flags override them for sweeps.

    python benchmarks/default_task_probe.py [--steps 60 --batch-size 16 --lr 2e-3 ...]

CPU time is printed beside wall time: on a shared machine wall time grows with other
processes' load, CPU time much less so.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

T0 = time.perf_counter()

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402

from lorakit.models import load_model  # noqa: E402
from lorakit.tasks import DEFAULT_HPARAMS, builtin_task, score  # noqa: E402


def parse_args() -> argparse.Namespace:
    h = DEFAULT_HPARAMS
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=h["model"])
    p.add_argument("--r", type=int, default=h["r"])
    p.add_argument("--alpha", type=float, default=h["alpha"])
    targets = h["targets"] if isinstance(h["targets"], str) else ",".join(h["targets"])
    p.add_argument("--targets", default=targets, help="comma-separated module names, or all-linear")
    p.add_argument("--lr", type=float, default=h["lr"])
    p.add_argument("--warmup-steps", type=int, default=h["warmup_steps"])
    p.add_argument("--steps", type=int, default=h["steps"])
    p.add_argument("--batch-size", type=int, default=h["batch_size"])
    p.add_argument("--max-length", type=int, default=h["max_length"])
    p.add_argument("--max-new-tokens", type=int, default=h["max_new_tokens"])
    p.add_argument("--n-eval", type=int, default=h["n_eval"])
    p.add_argument("--seed", type=int, default=h["seed"])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--skip-before", action="store_true", help="skip the evaluation before training")
    return p.parse_args()


def encode(tok, rec: dict, max_length: int) -> tuple[list[int], list[int]]:
    """Token ids of prompt + completion + EOS, and labels that ignore (-100) the prompt."""
    prompt = tok(rec["prompt"])["input_ids"]
    completion = tok(rec["completion"])["input_ids"] + [tok.eos_token_id]
    ids = (prompt + completion)[:max_length]
    return ids, ([-100] * len(prompt) + completion)[:max_length]


def collate(tok, recs: list[dict], max_length: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; padding is masked out of attention and loss."""
    pairs = [encode(tok, r, max_length) for r in recs]
    width = max(len(ids) for ids, _ in pairs)
    batch = {"input_ids": torch.full((len(pairs), width), tok.pad_token_id),
             "attention_mask": torch.zeros((len(pairs), width), dtype=torch.long),
             "labels": torch.full((len(pairs), width), -100)}
    for i, (ids, labels) in enumerate(pairs):
        batch["input_ids"][i, :len(ids)] = torch.tensor(ids)
        batch["attention_mask"][i, :len(ids)] = 1
        batch["labels"][i, :len(labels)] = torch.tensor(labels)
    return batch


@torch.no_grad()
def evaluate(model, tok, records: list[dict], max_new_tokens: int) -> tuple[float, list[str]]:
    """Greedy decoding of every record in one batch (decoding is bound by reading the weights,
    so one wide batch costs little more than one example); stops at the first newline."""
    model.eval()
    tok.padding_side = "left"  # generation appends on the right: prompts must end flush
    batch = tok([r["prompt"] for r in records], return_tensors="pt", padding=True)
    tok.padding_side = "right"
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                         stop_strings=["\n"], tokenizer=tok, pad_token_id=tok.pad_token_id)
    preds = tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return score(preds, [r["completion"] for r in records]), preds


def timed(fn, *args):
    w, c = time.perf_counter(), time.process_time()
    result = fn(*args)
    return result, time.perf_counter() - w, time.process_time() - c


def main() -> None:
    a = parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    load0 = os.getloadavg()[0]
    (model, tok), load_s, load_cpu = timed(load_model, a.model)
    train, held_out = builtin_task(a.steps * a.batch_size, a.n_eval, a.seed)

    before, before_s, before_cpu = (float("nan"), []), 0.0, 0.0
    if not a.skip_before:
        before, before_s, before_cpu = timed(evaluate, model, tok, held_out, a.max_new_tokens)

    targets = a.targets if a.targets == "all-linear" else a.targets.split(",")
    model = get_peft_model(model, LoraConfig(r=a.r, lora_alpha=a.alpha, lora_dropout=0.0,
                                             target_modules=targets, task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    warm = max(1, a.warmup_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * max(0.0, (a.steps - s) / max(1, a.steps - warm + 1)))
    step_wall, step_cpu, losses = [], [], []
    train0 = time.perf_counter()
    model.train()
    for step in range(a.steps):
        w, c = time.perf_counter(), time.process_time()
        batch = collate(tok, train[step * a.batch_size:(step + 1) * a.batch_size], a.max_length)
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step_wall.append(time.perf_counter() - w)
        step_cpu.append(time.process_time() - c)
        losses.append(loss.item())
        if step % 10 == 0 or step == a.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}  {step_wall[-1]:.2f} s", flush=True)
    train_s = time.perf_counter() - train0
    after, after_s, after_cpu = timed(evaluate, model, tok, held_out, a.max_new_tokens)
    total = time.perf_counter() - T0

    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    print()
    print(f"device: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{a.threads} threads, torch {torch.__version__}, float32, load avg at start {load0:.1f}, "
          f"at end {os.getloadavg()[0]:.1f}")
    print(f"settings: r={a.r} alpha={a.alpha} targets={a.targets} lr={a.lr} warmup={a.warmup_steps} "
          f"steps={a.steps} batch={a.batch_size} n_eval={a.n_eval} seed={a.seed} "
          f"trainable={sum(p.numel() for p in params):,}")
    print("| phase | wall s | cpu s | result |\n|---|---|---|---|")
    print(f"| load model | {load_s:.1f} | {load_cpu:.1f} | |")
    print(f"| eval before | {before_s:.1f} | {before_cpu:.1f} | exact match {before[0]:.3f} |")
    print(f"| train {a.steps} steps | {train_s:.1f} | {sum(step_cpu):.1f} | loss {losses[0]:.3f} -> "
          f"{sum(losses[-5:]) / min(5, len(losses)):.4f}; step median {med(step_wall):.2f} s wall, "
          f"{med(step_cpu):.2f} s cpu |")
    print(f"| eval after | {after_s:.1f} | {after_cpu:.1f} | exact match {after[0]:.3f} |")
    print(f"| total (incl. imports) | {total:.1f} | {time.process_time():.1f} | |")
    wrong = [(p, r["completion"]) for p, r in zip(after[1], held_out) if score([p], [r["completion"]]) < 1]
    print("examples:", [(r["prompt"], p) for p, r in list(zip(after[1], held_out))[:3]])
    print("wrong after training (first 5):", wrong[:5])


if __name__ == "__main__":
    main()
