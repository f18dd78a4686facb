"""The paper's Section 7 on the reproduction's adapters: subspace similarity, spectra, amplification.

    python benchmarks/repro_analysis.py --adapters RAW_DIR/glue/adapters --e2e-adapters RAW_DIR/e2e/adapters

Runs lorakit.eval.analysis.analyze (what `lorakit analyze A B --model M --output DIR` runs) on pairs of
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
                amps = [s["amplification"] for s in sides if s.get("amplification")]
                for key in ("amplification", "dW_fro", "W_fro", "proj_dW", "proj_W", "proj_random"):
                    row[f"{key}_{side}"] = statistics.mean(a[key] for a in amps) if amps else None
        if sims:
            n = min(len(s["phi_diagonal"]) for s in sims)
            d = mods[0]["shape"][1]  # phi is over the rows of A: directions in the input space
            row["phi_11"] = statistics.mean(s["phi_top1"] for s in sims)
            row["phi_diag"] = [round(statistics.mean(s["phi_diagonal"][k] for s in sims), 3) for k in range(n)]
            row["random_11"] = sims[0]["random_top1"]
            # how much of A_a's top direction lies in the whole span of A_b (random: r_b / d)
            row["phi_1_rb"] = statistics.mean(s["phi"][0][-1] for s in sims)
            row["random_1_rb"] = len(sims[0]["phi"][0]) / d
        rows.append(row)
    return rows


def main() -> None:
    from lorakit.eval.analysis import analyze

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
            print(f"{name:<27} {row['matrix']:<7} r {row['r_a']}/{row['r_b']}  phi(1,1) {row['phi_11']:.3f} (random "
                  f"{row['random_11']:.4f})  phi(1,r_b) {row['phi_1_rb']:.3f} (random {row['random_1_rb']:.3f})  "
                  f"eff. rank {row['eff_rank_a']:.1f}/{row['eff_rank_b']:.1f}")
            for side in ("a", "b"):
                if row.get(f"amplification_{side}") is not None:
                    print(f"{'':<35} r={row[f'r_{side}']:<3} ||dW|| {row[f'dW_fro_{side}']:.2f}  ||W|| "
                          f"{row[f'W_fro_{side}']:.1f}  ||U'WV|| with U,V of dW {row[f'proj_dW_{side}']:.2f}, of W "
                          f"{row[f'proj_W_{side}']:.2f}, random {row[f'proj_random_{side}']:.2f}  "
                          f"amplification {row[f'amplification_{side}']:.1f}")
    (RESULTS / "summary.json").write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
