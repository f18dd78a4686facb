"""Can the forward LoRA output skip memory? One GEMM for `x @ W.T + s * xa @ B.T` against the two the fast path runs.

In a training forward with dropout, each adapted linear writes its (rows, out) LoRA output
`s * xa @ B.T` (a memory-bound K=r GEMM) and the base GEMM reads it back in its epilogue. On the
1.1B shape that is about 3.3 ms of a 143 ms step. This times, at the shapes of one Llama layer:

  floor    F.linear(x, W) for each linear (what the frozen model runs)
  current  y = s * xa @ B.T written first, then y += x @ W.T in the base GEMM's epilogue (the fast
           path where `expand_gemm` does not serve)
  fusedW   the group's W's concatenated, one F.linear (no LoRA): what grouping alone would give
  concat   one F.linear over [x | s * xa] @ [W | B].T for the group (B's block-diagonal):
           needs x and xa side by side in memory, and W beside B
  expand   `_triton.expand_gemm`: one persistent Triton GEMM for the group, the LoRA product as the
           last step of each tile's K loop (what the fast path runs on Hopper); "best": a tile sweep

    PYTHONPATH=src python benchmarks/bench_fused_gemm.py [--tokens 8192] [--shape 1b|8b] [--quick]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from lorakit.fast import triton as _triton

R = 16
SCALE = 2.0


def bench(fn, sets: int) -> float:
    """Microseconds per call, 12 calls captured in one CUDA graph, inputs rotated over `sets` copies."""
    for i in range(sets):
        fn(i)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(12):
            fn(i % sets)
    return do_bench(g.replay, warmup=5, rep=60, return_mode="median") * 1e3 / 12


SHAPES = {"1b": (2048, 2048, 5632), "8b": (4096, 1024, 14336)}  # hidden, k/v width, MLP width


def groups(shape: str) -> dict:
    h, kv, mlp = SHAPES[shape]
    return {"q,k,v": (h, [h, kv, kv]), "o": (h, [h]), "gate,up": (h, [mlp, mlp]), "down": (mlp, [h])}


def sweep_cfgs(quick: bool) -> list[dict]:
    tiles = [(128, 256, 64, 8, 3), (128, 128, 64, 4, 4), (128, 128, 64, 8, 4), (128, 256, 64, 8, 4),
             (256, 128, 64, 8, 3), (128, 128, 128, 8, 3), (64, 256, 64, 4, 4), (128, 64, 64, 4, 4)]
    if quick:
        tiles = tiles[:3]
    return [dict(BM=bm, BN=bn, BK=bk, num_warps=w, num_stages=st, GROUP_M=gm)
            for bm, bn, bk, w, st in tiles for gm in ((8,) if quick else (8, 16))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--sets", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="a smaller sweep")
    ap.add_argument("--no-sweep", action="store_true")
    args = ap.parse_args()
    dev, dt, M, S = torch.device("cuda"), torch.bfloat16, args.tokens, args.sets
    torch.manual_seed(0)
    print(f"# bench_fused_gemm: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"triton {triton.__version__}; "
          f"{args.shape} shape, {M} tokens, r={R}; us per call for one layer's group; per step: x {args.layers} layers")
    totals: dict[str, float] = {}
    print("| group | floor | current | fusedW | concat | expand | expand best (cfg) | err current / expand |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (in_f, outs) in groups(args.shape).items():
        J = len(outs)
        xs = [torch.randn(M, in_f, device=dev, dtype=dt) for _ in range(S)]
        Ws = [torch.randn(o, in_f, device=dev, dtype=dt) / in_f ** 0.5 for o in outs]
        Bs = [torch.randn(o, R, device=dev, dtype=dt) * 0.1 for o in outs]
        As = torch.randn(R * J, in_f, device=dev, dtype=dt) / in_f ** 0.5
        xas = [x @ As.t() for x in xs]
        z = torch.zeros((), device=dev, dtype=dt)
        row = {"floor": bench(lambda i: [F.linear(xs[i], W) for W in Ws], S)}

        def current(i):
            return [torch.addmm(z, xas[i][:, j * R:(j + 1) * R], Bs[j].t(), beta=0, alpha=SCALE).addmm_(xs[i], W.t())
                    for j, W in enumerate(Ws)]
        row["current"] = bench(current, S)
        Wg = torch.cat(Ws)
        row["fusedW"] = bench(lambda i: F.linear(xs[i], Wg), S)
        Wcat = torch.zeros(sum(outs), in_f + R * J, device=dev, dtype=dt)
        Wcat[:, :in_f] = Wg
        off = 0
        for j, o in enumerate(outs):
            Wcat[off:off + o, in_f + j * R:in_f + (j + 1) * R] = Bs[j]
            off += o
        xcats = [torch.cat([x, xa * SCALE], 1) for x, xa in zip(xs, xas)]
        row["concat"] = bench(lambda i: F.linear(xcats[i], Wcat), S)
        scales = [SCALE] * J
        row["expand"] = bench(lambda i: _triton.expand_gemm(xs[i], Ws, [None] * J, xas[i], Bs, scales), S)
        best = (row["expand"], None)
        if not args.no_sweep:
            for cfg in sweep_cfgs(args.quick):
                try:
                    us = bench(lambda i: _triton.expand_gemm(xs[i], Ws, [None] * J, xas[i], Bs, scales, cfg), S)
                except Exception:  # noqa: BLE001 - a tile too large for shared memory or registers
                    torch.cuda.synchronize()
                    continue
                if us < best[0]:
                    best = (us, cfg)
        row["expand best"] = best[0]
        ref = torch.cat([F.linear(xs[0].double(), W.double()) + SCALE * xas[0][:, j * R:(j + 1) * R].double()
                         @ Bs[j].double().t() for j, W in enumerate(Ws)], 1)
        err = [(torch.cat(ys, 1).double() - ref).norm().item() / ref.norm().item()
               for ys in (current(0), _triton.expand_gemm(xs[0], Ws, [None] * J, xas[0], Bs, scales))]
        cfg = "default" if best[1] is None else ",".join(f"{k}={v}" for k, v in best[1].items())
        print(f"| {name} | " + " | ".join(f"{row[k]:.1f}" for k in ("floor", "current", "fusedW", "concat", "expand"))
              + f" | {best[0]:.1f} ({cfg}) | {err[0]:.2e} / {err[1]:.2e} |")
        for k, v in row.items():
            totals[k] = totals.get(k, 0.0) + v
    print("per step, ms (forward of the adapted linears): " +
          ", ".join(f"{k} {v * args.layers / 1e3:.2f}" for k, v in totals.items()))


if __name__ == "__main__":
    main()
