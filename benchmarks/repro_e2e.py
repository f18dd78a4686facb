"""E2E NLG with smollm2-135m: zero-shot base vs lorakit LoRA vs full fine-tuning, beam search on the test MRs.

    python benchmarks/repro_e2e.py --method lorakit --out runs/e2e     # train 1 epoch (q_proj,v_proj, r=8), decode
    python benchmarks/repro_e2e.py --method full --out runs/e2e        # full fine-tuning, decode
    python benchmarks/repro_e2e.py --method zero-shot --out runs/e2e   # the instruct model as is, chat prompt
    python benchmarks/repro_e2e.py --method lorakit --recipe paper --seed 1 --out runs/e2e-paper
    python benchmarks/repro_e2e.py --method lorakit --recipe paper-rslora --seed 1 --out runs/e2e-paper
    python benchmarks/repro_e2e.py --method full --recipe paper --seed 1 --out runs/e2e-paper

--recipe paper is the LoRA paper's Table 11 for GPT-2 on E2E: AdamW, weight decay 0.01, LoRA dropout 0.1,
batch 8, 5 epochs, 500 warmup steps, linear schedule, label smoothing 0.1, learning rate 2e-4, r=4 on q and v,
alpha 32; full fine-tuning takes the same settings with its own learning rate (5e-5). paper-rslora: the same
on all linear layers at r=16 with rsLoRA (alpha 32). Runs are named by recipe and seed.

Training pairs are "<MR>\\n" -> "<reference>" + EOS (loss on the reference only), one epoch of the
42,061 training pairs. Decoding follows the paper (Appendix D.3): beam 10, length penalty 0.9,
no repeated 4-grams, on the 630 unique test MRs in file order. Writes <out>/<run>.predictions.txt
(one line per MR) and <out>/<run>.json; benchmarks/repro_report.py scores them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "e2e"
LR = {"full": 5e-5, "lorakit": 1e-3}
# the LoRA paper's Table 11 (GPT-2 on E2E); full fine-tuning keeps its own learning rate
RECIPES = {
    "default": dict(r=8, alpha=16, targets=("q_proj", "v_proj"), dropout=0.0, rslora=False, lr=None, epochs=1.0,
                    batch_size=32, weight_decay=0.0, label_smoothing=0.0, warmup_steps=None),
    "paper": dict(r=4, alpha=32, targets=("q_proj", "v_proj"), dropout=0.1, rslora=False, lr=2e-4, epochs=5.0,
                  batch_size=8, weight_decay=0.01, label_smoothing=0.1, warmup_steps=500),
    "paper-rslora": dict(r=16, alpha=32, targets="all-linear", dropout=0.1, rslora=True, lr=2e-4, epochs=5.0,
                         batch_size=8, weight_decay=0.01, label_smoothing=0.1, warmup_steps=500),
}
BEAM = {"num_beams": 10, "length_penalty": 0.9, "no_repeat_ngram_size": 4, "early_stopping": True}
ZERO_SHOT = "Write one sentence that describes this restaurant, using all of the following facts: {mr}"


def test_mrs(data: Path) -> list[tuple[str, list[str]]]:
    from lorakit.data import group_references, load_records
    return group_references(load_records(data / "testset_w_refs.csv"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", choices=["zero-shot", "lorakit", "full"], default="lorakit")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--out", default="runs/e2e")
    ap.add_argument("--recipe", choices=sorted(RECIPES), default="default",
                    help="training settings: default (1 epoch, r=8) or the paper's (see the module docstring)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--r", type=int, help="overrides the recipe's rank")
    ap.add_argument("--lr", type=float, help="overrides the recipe's learning rate")
    ap.add_argument("--epochs", type=float, help="overrides the recipe's epochs")
    ap.add_argument("--batch-size", type=int, help="overrides the recipe's batch size")
    ap.add_argument("--limit", type=int, help="decode only the first N test MRs (smoke tests)")
    ap.add_argument("--train-limit", type=int, help="train on the first N pairs only (smoke tests)")
    ap.add_argument("--no-decode", action="store_true", help="train and save only")
    args = ap.parse_args()

    import torch

    from lorakit.data import DataConfig, load_records
    from lorakit.models import load_model
    from lorakit.train import generate_texts, read_split
    from repro_common import adapt, environment, fit, seed_everything, sizes

    data, out = Path(args.data), Path(args.out)
    recipe = dict(RECIPES[args.recipe])
    for key in ("r", "lr", "epochs", "batch_size"):
        if getattr(args, key) is not None:
            recipe[key] = getattr(args, key)
    if args.method == "full" or recipe["lr"] is None:
        recipe["lr"] = args.lr or LR.get(args.method)
    name = f"lorakit_r{recipe['r']}" if args.method == "lorakit" else args.method
    if args.recipe != "default" or args.seed:
        name += f"_{args.recipe}_seed{args.seed}"
    lr = recipe["lr"]
    t0 = time.perf_counter()
    seed_everything(args.seed)
    model, tok = load_model(args.model, task="causal-lm", dtype="float32")
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    result: dict = {"run": name, "method": args.method, "environment": environment(), "decoding": BEAM}
    if args.method != "zero-shot":
        cfg = DataConfig(task="sft", separator="\n", max_length=128)
        train = read_split(None, load_records(data / "trainset.csv.gz")[: args.train_limit], tok, cfg)
        alpha = recipe["alpha"] if args.recipe != "default" else 2 * recipe["r"]
        save = adapt(model, args.method, r=recipe["r"], alpha=alpha, targets=recipe["targets"],
                     dropout=recipe["dropout"], rslora=recipe["rslora"])
        stats = fit(model, train.examples, tok.pad_token_id, lr=lr, epochs=recipe["epochs"],
                    batch_size=recipe["batch_size"], seed=args.seed, weight_decay=recipe["weight_decay"],
                    label_smoothing=recipe["label_smoothing"], warmup_steps=recipe["warmup_steps"])
        saved = out / ("tmp_full" if args.method == "full" else "adapters") / name
        settings = {k: (v if isinstance(v, (str, int, float, bool, type(None))) else list(v))
                    for k, v in recipe.items() if k != "epochs"}  # (stats holds the epochs run)
        result.update(recipe=args.recipe, seed=args.seed, **settings, train_examples=len(train.examples), **stats,
                      **sizes(model, save, saved))
        prompts_of = lambda mr: mr + "\n"  # noqa: E731
    else:
        prompts_of = lambda mr: tok.apply_chat_template(  # noqa: E731
            [{"role": "user", "content": ZERO_SHOT.format(mr=mr)}], add_generation_prompt=True, tokenize=False)
    if not args.no_decode:
        mrs = [mr for mr, _ in test_mrs(data)][: args.limit]
        t = time.perf_counter()
        hyps = generate_texts(model, tok, [prompts_of(mr) for mr in mrs], max_new_tokens=80, batch_size=64, **BEAM)
        hyps = [next((line.strip() for line in h.splitlines() if line.strip()), "") for h in hyps]  # first line
        result.update(decode_seconds=time.perf_counter() - t, test_mrs=len(mrs))
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.predictions.txt").write_text("\n".join(hyps) + "\n")
        print("\n".join(f"{mr}\n  -> {h}" for mr, h in list(zip(mrs, hyps))[:3]))
    result["wall_seconds"] = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "loss_curve"}, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
