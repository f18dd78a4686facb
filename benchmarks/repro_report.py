"""Tables and plots of the reproduction from the runs' JSON and prediction files (CPU; Java for METEOR).

    python benchmarks/repro_report.py --raw RAW_DIR     # RAW_DIR holds glue/json/*.json and e2e/*

Checks every GLUE run's dev accuracy / F1 again with lorakit.eval.metrics from its saved predictions,
scores the E2E predictions with lorakit.eval.metrics.generation_scores against all references of each
test MR, copies the small files to results/ and writes results/glue_summary.json,
results/e2e_scores.json, results/glue_accuracy.png, results/glue_curves.png and results/e2e_loss.png.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from repro_e2e import DATA as E2E_DATA, test_mrs  # noqa: E402
from repro_glue import DATA as GLUE_DATA, LR, TASKS  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results"
METHODS = ("full", "lorakit", "peft")
PAPER_GLUE = {"full": {"SST-2": 94.8, "MRPC": 90.2, "RTE": 78.7}, "lora": {"SST-2": 95.1, "MRPC": 89.7, "RTE": 86.6}}
PAPER_E2E = {"GPT-2 M (FT), paper": [68.2, 8.62, 46.2, 71.0, 2.47],
             "GPT-2 M (LoRA), paper": [70.4, 8.85, 46.8, 71.8, 2.53]}


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def check_glue(runs: list[dict]) -> None:
    """Recompute accuracy / F1 from the saved predictions with lorakit.eval.metrics."""
    from lorakit.data import load_records, resolve_labels
    from lorakit.eval.metrics import classification_scores
    gold = {}
    for r in runs:
        if r["task"] not in gold:
            recs = load_records(GLUE_DATA / r["task"] / "dev.tsv")
            gold[r["task"]] = resolve_labels([x["label"] for x in recs], r["labels"])[0]
        s = classification_scores(r["predictions"], gold[r["task"]])
        assert abs(s["accuracy"] - r["final"]["accuracy"]) < 1e-9, r["run"]
        assert abs(s["f1"] - r["final"]["f1"]) < 1e-9, r["run"]


def glue_summary(runs: list[dict]) -> dict:
    main = [r for r in runs if r["r"] == 8 and r["lr"] == LR[r["method"]]]
    cells = defaultdict(list)
    for r in main:
        cells[r["task"], r["method"]].append(r)
    table = {}
    for (task, method), rs in sorted(cells.items()):
        acc = [100 * r["final"]["accuracy"] for r in rs]
        table[f"{task}/{method}"] = {
            "seeds": sorted(r["seed"] for r in rs), "lr": rs[0]["lr"], "epochs": rs[0]["epochs"],
            "accuracy": mean_std(acc), "accuracy_runs": acc,
            "f1": mean_std([100 * r["final"]["f1"] for r in rs]),
            "best_epoch_accuracy": mean_std([100 * r["best"]["accuracy"] for r in rs]),
            "trainable_parameters": rs[0]["trainable_parameters"], "total_parameters": rs[0]["total_parameters"],
            "saved_bytes": rs[0]["saved_bytes"], "train_seconds": mean_std([r["train_seconds"] for r in rs]),
            "ms_per_step": statistics.mean(1000 * r["train_seconds"] / r["steps"] for r in rs),
            "steps": rs[0]["steps"]}
    for method in METHODS:  # average over the three tasks, seed by seed
        per_seed = defaultdict(dict)
        for r in main:
            if r["method"] == method:
                per_seed[r["seed"]][r["task"]] = 100 * r["final"]["accuracy"]
        avgs = [statistics.mean(v.values()) for v in per_seed.values() if len(v) == len(TASKS)]
        if avgs:
            table[f"average/{method}"] = {"seeds": len(avgs), "accuracy": mean_std(avgs)}
    extra = [{k: r[k] for k in ("task", "method", "seed", "r", "lr")} | {"accuracy": 100 * r["final"]["accuracy"],
             "f1": 100 * r["final"]["f1"], "train_seconds": r["train_seconds"]}
             for r in runs if r not in main]
    return {"main": table, "other_runs": extra}


def print_glue(summary: dict) -> None:
    print("| task | method | dev acc (mean ± std) | MRPC F1 | best-epoch acc | trainable params | saved | train s "
          "| ms/step |")
    print("|---|---|---|---|---|---|---|---|---|")
    for key, c in summary["main"].items():
        task, method = key.split("/")
        a = c["accuracy"]
        if task == "average":
            print(f"| **avg** | {method} | **{a[0]:.2f} ± {a[1]:.2f}** ({c['seeds']} seeds) | | | | | | |")
            continue
        f1 = f"{c['f1'][0]:.2f} ± {c['f1'][1]:.2f}" if task == "MRPC" else ""
        b = c["best_epoch_accuracy"]
        print(f"| {task} | {method} | {a[0]:.2f} ± {a[1]:.2f} (n={len(c['seeds'])}) | {f1} | {b[0]:.2f} ± {b[1]:.2f} "
              f"| {c['trainable_parameters']:,} | {c['saved_bytes'] / 2**20:.2f} MiB | {c['train_seconds'][0]:.0f} "
              f"| {c['ms_per_step']:.1f} |")
    for r in summary["other_runs"]:
        print(f"  other: {r['task']} {r['method']} r={r['r']} lr={r['lr']:g} seed {r['seed']}: "
              f"acc {r['accuracy']:.2f} f1 {r['f1']:.2f}")


def plot_glue(runs: list[dict], summary: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tasks = list(TASKS)
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for i, method in enumerate(METHODS):
        cells = [summary["main"].get(f"{t}/{method}") for t in tasks]
        ax.bar([k + 0.27 * (i - 1) for k in range(len(tasks))], [c["accuracy"][0] if c else 0 for c in cells],
               0.27, yerr=[c["accuracy"][1] if c else 0 for c in cells], capsize=3, label=method)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylim(50, 100)
    ax.set_ylabel("dev accuracy (%)")
    ax.set_title("minilm-l6 on GLUE: full FT vs LoRA (r=8, q,v), mean ± std over seeds")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "glue_accuracy.png", dpi=110)
    fig, axes = plt.subplots(1, len(tasks), figsize=(11, 3.2))
    for ax, task in zip(axes, tasks):
        for method in METHODS:
            rs = [r for r in runs if r["task"] == task and r["method"] == method and r["r"] == 8
                  and r["lr"] == LR[method]]
            if rs:
                n = min(len(r["evals"]) for r in rs)
                ax.plot([rs[0]["evals"][k]["epoch"] for k in range(n)],
                        [100 * statistics.mean(r["evals"][k]["accuracy"] for r in rs) for k in range(n)],
                        marker=".", label=method)
        ax.set_title(task)
        ax.set_xlabel("epoch")
    axes[0].set_ylabel("dev accuracy (%), mean over seeds")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "glue_curves.png", dpi=110)


def e2e_scores(raw: Path) -> dict:
    from lorakit.eval.metrics import generation_scores
    refs = [r for _, r in test_mrs(E2E_DATA)]
    out = {}
    for pred in sorted(raw.glob("*.predictions.txt")):
        name = pred.name.removesuffix(".predictions.txt")
        hyps = pred.read_text().splitlines()
        s = generation_scores(hyps, refs[: len(hyps)])
        meta = json.loads((raw / f"{name}.json").read_text())
        out[name] = {**s.as_dict(), "notes": s.notes, "test_mrs": len(hyps),
                     **{k: meta.get(k) for k in ("trainable_parameters", "total_parameters", "saved_bytes",
                                                 "train_seconds", "steps", "decode_seconds", "lr", "r")}}
    return out


def print_e2e(scores: dict) -> None:
    print("| model | BLEU | NIST | METEOR | ROUGE-L | CIDEr | trainable params | train s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, s in scores.items():
        met = f"{s['METEOR']:.1f}" if s["METEOR"] is not None else "n/a"
        tp = f"{s['trainable_parameters']:,}" if s.get("trainable_parameters") else "0"
        ts = f"{s['train_seconds']:.0f}" if s.get("train_seconds") else ""
        print(f"| SmolLM2-135M {name} | {s['BLEU']:.1f} | {s['NIST']:.2f} | {met} | {s['ROUGE_L']:.1f} | "
              f"{s['CIDEr']:.2f} | {tp} | {ts} |")
    for name, row in PAPER_E2E.items():
        print(f"| {name} | " + " | ".join(str(v) for v in row) + " | | |")


def plot_e2e_loss(raw: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for f in sorted(raw.glob("*.json")):
        curve = json.loads(f.read_text()).get("loss_curve")
        if curve:
            ax.plot(*zip(*curve), label=f.stem)
    ax.set_xlabel("step (batch 32)")
    ax.set_ylabel("training loss (one batch / 50 steps)")
    ax.set_ylim(0, None)
    ax.set_title("SmolLM2-135M on E2E, one epoch")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "e2e_loss.png", dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--raw", required=True, help="directory with glue/json/ and e2e/ from the runs")
    args = ap.parse_args()
    raw = Path(args.raw)
    RESULTS.mkdir(exist_ok=True)
    runs = [json.loads(f.read_text()) for f in sorted((raw / "glue" / "json").glob("*.json"))]
    if runs:
        check_glue(runs)
        (RESULTS / "glue").mkdir(exist_ok=True)
        for f in (raw / "glue" / "json").glob("*.json"):
            shutil.copy(f, RESULTS / "glue" / f.name)
        summary = glue_summary(runs)
        summary["paper_roberta_base"] = PAPER_GLUE
        (RESULTS / "glue_summary.json").write_text(json.dumps(summary, indent=1))
        print_glue(summary)
        plot_glue(runs, summary)
    if (raw / "e2e").exists():
        scores = e2e_scores(raw / "e2e")
        (RESULTS / "e2e").mkdir(exist_ok=True)
        for f in list((raw / "e2e").glob("*.predictions.txt")) + list((raw / "e2e").glob("*.json")):
            shutil.copy(f, RESULTS / "e2e" / f.name)
        (RESULTS / "e2e_scores.json").write_text(json.dumps(scores, indent=1))
        print_e2e(scores)
        plot_e2e_loss(raw / "e2e")


if __name__ == "__main__":
    main()
