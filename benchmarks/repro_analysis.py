"""The paper's Section 7 on the reproduction's adapters: subspace similarity, spectra, amplification.

    python benchmarks/repro_analysis.py --adapters RAW_DIR/glue/adapters --e2e-adapters RAW_DIR/e2e/adapters

Runs lorakit.analysis.analyze (what `lorakit analyze A B --model M --output DIR` runs) on pairs of
adapters, with the base weights for the amplification factor, writes results/analysis/<pair>/
(analysis.json + PNGs) and prints, per pair and adapted matrix, the paper's quantities:
phi(1,1) (top directions of the two A's), phi(i,i) along the diagonal, the random-subspace baseline,
the effective rank of dW and ||dW|| / ||U^T W V|| (Table 7's amplification factor).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "results" / "analysis"


def base_weights(model: str, task: str) -> dict:
    from lorakit.models import load_model
    m, _ = load_model(model, task=task)
    return {n.rsplit(".", 1)[0]: p.detach() for n, p in m.named_parameters() if n.endswith("weight")}


def summarize(report: dict) -> list[dict]:
    rows = []
    kinds = sorted({m.rsplit(".", 1)[-1] for m in report["modules"]})
    for kind in kinds:
        mods = [e for m, e in report["modules"].items() if m.rsplit(".", 1)[-1] == kind]
        sims = [e["similarity"] for e in mods if "similarity" in e]
        row = {"matrix": kind, "layers": len(mods)}
        for side in ("a", "b"):
            sides = [e[side] for e in mods if side in e]
            if sides:
                row[f"r_{side}"] = sides[0]["r"]
                row[f"eff_rank_{side}"] = statistics.mean(s["spectrum"]["effective_rank"] for s in sides)
                amps = [s["amplification"]["amplification"] for s in sides if s.get("amplification")]
                row[f"amplification_{side}"] = statistics.mean(amps) if amps else None
        if sims:
            n = min(len(s["phi_diagonal"]) for s in sims)
            row["phi_11"] = statistics.mean(s["phi_top1"] for s in sims)
            row["phi_diag"] = [round(statistics.mean(s["phi_diagonal"][k] for s in sims), 3) for k in range(n)]
            row["random_11"] = sims[0]["random_top1"]
        rows.append(row)
    return rows


def main() -> None:
    from lorakit.analysis import analyze

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--adapters", required=True, help="directory of the GLUE adapters (one per run)")
    ap.add_argument("--e2e-adapters", help="directory of the E2E adapters (lorakit_r8, lorakit_r64)")
    args = ap.parse_args()
    g = Path(args.adapters)
    pairs = [("sst2_r8_vs_r64", g / "SST-2_lorakit_r8_lr0.001_s0", g / "SST-2_lorakit_r64_lr0.001_s0", "minilm"),
             ("sst2_r8_seed0_vs_seed1", g / "SST-2_lorakit_r8_lr0.001_s0", g / "SST-2_lorakit_r8_lr0.001_s1", "minilm"),
             ("mrpc_r8_vs_r64", g / "MRPC_lorakit_r8_lr0.001_s0", g / "MRPC_lorakit_r64_lr0.001_s0", "minilm"),
             ("mrpc_lorakit_vs_peft_seed0", g / "MRPC_lorakit_r8_lr0.001_s0", g / "MRPC_peft_r8_lr0.001_s0", "minilm")]
    if args.e2e_adapters:
        e = Path(args.e2e_adapters)
        pairs.append(("e2e_r8_vs_r64", e / "lorakit_r8", e / "lorakit_r64", "smollm2"))
    weights = {}
    table = {}
    for name, a, b, model in pairs:
        if not (a.exists() and b.exists()):
            print(f"{name}: skipped ({a.name if not a.exists() else b.name} missing)")
            continue
        if model not in weights:
            weights[model] = (base_weights("minilm-l6", "sequence-classification") if model == "minilm"
                              else base_weights("smollm2-135m", "causal-lm"))
        report = analyze(a, b, base_weights=weights[model], out_dir=RESULTS / name, progress=False)
        table[name] = summarize(report)
        for row in table[name]:
            amp = "/".join(f"{row[k]:.1f}" if row.get(k) is not None else "-" for k in ("amplification_a", "amplification_b"))
            print(f"{name:<28} {row['matrix']:<7} layers {row['layers']:>2}  phi(1,1) {row.get('phi_11', 0):.3f} "
                  f"(random {row.get('random_11', 0):.4f})  phi(i,i) {row.get('phi_diag')}  eff. rank "
                  f"{row.get('eff_rank_a', 0):.1f}/{row.get('eff_rank_b', 0):.1f}  amplification {amp}")
    (RESULTS / "summary.json").write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
