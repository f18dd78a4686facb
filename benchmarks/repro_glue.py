"""GLUE (SST-2, MRPC, RTE) with minilm-l6: full fine-tuning vs lorakit LoRA vs PEFT LoRA.

Every run goes through the same loop (repro_common.fit), data, seeds and evaluation; only how the
model is adapted differs. LoRA: r=8, alpha=16, targets query,value, classifier head trained.

    python benchmarks/repro_glue.py --task MRPC --method lorakit --seed 0 --out runs/glue     # one run
    python benchmarks/repro_glue.py --grid --workers 8 --out runs/glue                        # all runs

Each run writes <out>/json/<run>.json (settings, dev accuracy / F1 after every epoch, predictions,
trainable parameters, saved bytes, wall time) and, for LoRA, its adapter under <out>/adapters/<run>.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"

# Per task: training-set cap (SST-2: its first 20,000 of 67,349 examples), epochs.
TASKS = {"SST-2": {"limit": 20000, "epochs": 3}, "MRPC": {"limit": None, "epochs": 10},
         "RTE": {"limit": None, "epochs": 10}}
LR = {"full": 5e-5, "lorakit": 1e-3, "peft": 1e-3}
BATCH, MAX_LENGTH, SEEDS = 32, 256, (0, 1, 2)


def run_name(job: dict) -> str:
    return f"{job['task']}_{job['method']}_r{job['r']}_lr{job['lr']:g}_s{job['seed']}"


def evaluate(model, examples, pad_id) -> dict:
    import torch

    from lorakit.data import PadCollator
    from lorakit.train import autocast
    device = next(model.parameters()).device
    model.eval()
    collate, preds = PadCollator(pad_id), []
    with torch.no_grad():
        for i in range(0, len(examples), 128):
            batch = {k: v.to(device) for k, v in collate(examples[i:i + 128]).items()}
            with autocast(device, "auto"):
                preds += model(**batch).logits.argmax(-1).tolist()
    gold = [e["labels"] for e in examples]
    tp = sum(p == g == 1 for p, g in zip(preds, gold))
    f1 = 2 * tp / max(1, sum(preds) + sum(gold))
    return {"accuracy": sum(p == g for p, g in zip(preds, gold)) / len(gold), "f1": f1, "predictions": preds}


def run_job(job: dict) -> dict:
    """One training run; returns (and writes) its result. Skipped once the deadline file's time has passed."""
    deadline = Path(job["deadline_file"]) if job.get("deadline_file") else None
    if deadline and deadline.exists() and time.time() > float(deadline.read_text()):
        return {**job, "skipped": "deadline"}
    import torch

    from lorakit.data import DataConfig, load_records, resolve_labels
    from lorakit.models import load_model
    from lorakit.train import read_split
    from repro_common import adapt, environment, fit, seed_everything, sizes

    t0 = time.perf_counter()
    out, name = Path(job["out"]), run_name(job)
    seed_everything(job["seed"])  # the order below follows lorakit.train.run: seed, model, data, adapt
    model, tok = load_model(job["model"], task="sequence-classification", num_labels=2, dtype="float32")
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    data_cfg = DataConfig(task="classification", max_length=MAX_LENGTH)
    task_dir = Path(job["data"]) / job["task"]
    train_records = load_records(task_dir / "train.tsv")[: TASKS[job["task"]]["limit"]]
    _, labels = resolve_labels([r["label"] for r in train_records])
    train = read_split(None, train_records, tok, data_cfg, labels)
    dev = read_split(str(task_dir / "dev.tsv"), None, tok, data_cfg, labels)
    save = adapt(model, job["method"], r=job["r"], alpha=2 * job["r"], heads=["classifier"])
    evals = []

    def on_epoch(epoch):
        evals.append({"epoch": epoch, **evaluate(model, dev.examples, tok.pad_token_id)})

    stats = fit(model, train.examples, tok.pad_token_id, lr=job["lr"], epochs=job["epochs"], batch_size=BATCH,
                seed=job["seed"], on_epoch=on_epoch)
    if not evals or evals[-1]["epoch"] != stats["epochs"]:  # a run that ends inside an epoch
        on_epoch(stats["epochs"])
    saved = out / ("tmp_full" if job["method"] == "full" else "adapters") / name
    result = {**job, "run": name, **stats, **sizes(model, save, saved), "labels": labels,
              "train_examples": len(train.examples), "dev_examples": len(dev.examples),
              "final": {k: v for k, v in evals[-1].items() if k != "predictions"},
              "best": max(({k: v for k, v in e.items() if k != "predictions"} for e in evals),
                          key=lambda e: e["accuracy"]),
              "evals": [{k: v for k, v in e.items() if k != "predictions"} for e in evals],
              "predictions": evals[-1]["predictions"], "wall_seconds": time.perf_counter() - t0,
              "environment": environment()}
    if job["method"] == "full":
        shutil.rmtree(saved, ignore_errors=True)  # 87 MiB each: measured, not kept
    (out / "json").mkdir(parents=True, exist_ok=True)
    (out / "json" / f"{name}.json").write_text(json.dumps(result, indent=1))
    return result


def grid(common: dict) -> list[dict]:
    """Main comparison first (seed by seed), then r=64 adapters for the rank analysis, then lr sensitivity."""
    jobs = [dict(common, task=t, method=m, seed=s, r=8, lr=LR[m], epochs=TASKS[t]["epochs"])
            for s in SEEDS for t in TASKS for m in ("full", "lorakit", "peft")]
    jobs += [dict(common, task=t, method="lorakit", seed=0, r=64, lr=LR["lorakit"], epochs=TASKS[t]["epochs"])
             for t in ("SST-2", "MRPC")]
    jobs += [dict(common, task=t, method=m, seed=0, r=8, lr=lr, epochs=TASKS[t]["epochs"])
             for t in TASKS for m, lr in (("full", 2e-5), ("full", 1e-4), ("lorakit", 5e-4), ("lorakit", 2e-3))]
    return jobs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="minilm-l6", help="bundled name or model directory")
    ap.add_argument("--data", default=str(DATA), help="directory with SST-2/, MRPC/, RTE/ GLUE TSVs")
    ap.add_argument("--out", default="runs/glue")
    ap.add_argument("--grid", action="store_true", help="run every configuration (see `grid`)")
    ap.add_argument("--workers", type=int, default=1, help="runs at a time (processes sharing the GPU)")
    ap.add_argument("--deadline-file", help="a file holding a UNIX time after which no new run starts")
    ap.add_argument("--task", choices=list(TASKS), default="MRPC")
    ap.add_argument("--method", choices=["full", "lorakit", "peft"], default="lorakit")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--epochs", type=float)
    args = ap.parse_args()
    common = {"model": args.model, "data": args.data, "out": args.out, "deadline_file": args.deadline_file}
    if args.grid:
        jobs = grid(common)
    else:
        jobs = [dict(common, task=args.task, method=args.method, seed=args.seed, r=args.r,
                     lr=args.lr or LR[args.method], epochs=args.epochs or TASKS[args.task]["epochs"])]
    print(f"{'run':<36} {'acc':>6} {'f1':>6} {'trainable':>11} {'saved MiB':>9} {'train s':>8} {'ms/step':>7}")
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
        for fut in as_completed([pool.submit(run_job, j) for j in jobs]):
            try:
                r = fut.result()
            except Exception as exc:  # one failed run must not stop the others
                print(f"run failed: {exc!r}", flush=True)
                continue
            if r.get("skipped"):
                print(f"{run_name(r):<36} skipped ({r['skipped']})", flush=True)
                continue
            print(f"{r['run']:<36} {r['final']['accuracy']:6.4f} {r['final']['f1']:6.4f} "
                  f"{r['trainable_parameters']:11,} {r['saved_bytes'] / 2**20:9.2f} {r['train_seconds']:8.1f} "
                  f"{1000 * r['train_seconds'] / r['steps']:7.1f}", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
