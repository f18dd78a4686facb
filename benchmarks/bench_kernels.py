"""How close do the LoRA training kernels come to the GPU's memory bandwidth, and which tiles are best?

The LoRA training step adds three memory-bound Triton kernels per group of linears (1.1B shape,
8 x 1024 tokens): the shrink `dropout(x) @ A.T` (forward), `lora_grads` (one read of g for
`g @ B` and `g.T @ xa`, plus its reduction) and `dropout_backward` (dA and the LoRA input
gradient, x rebuilt from what made it). For each, at the shapes of one Llama layer, this prints
the time of the configuration the library picks, its bandwidth (bytes it must move / time)
against a large device copy, and the best configuration of a sweep, with what the sweep would
save per training step (22 layers).

    PYTHONPATH=src python benchmarks/bench_kernels.py [--tokens 8192] [--layers 22] [--quick]
"""

from __future__ import annotations

import argparse
import itertools

import torch
from triton.testing import do_bench

from lorakit.fast import triton as _triton

# group -> (in features, out features of each linear, where x comes from in backward)
GROUPS = {"q,k,v": (2048, [2048, 256, 256], "norm"), "o": (2048, [2048], "x"),
          "gate,up": (2048, [5632, 5632], "norm"), "down": (5632, [2048], "mul")}
R = 16
P = 0.05


def bench(fn, sets: int = 1) -> float:
    """Microseconds per call of fn(i) (i: which of `sets` copies of the inputs it reads, so that each call
    reads from HBM and not from L2), timed as 24 calls captured in one CUDA graph: the wrappers' CPU
    work (10-60 us a call) would otherwise hide the kernels' own time, which is what a graphed step sees."""
    for i in range(sets):
        fn(i)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(24):
            fn(i % sets)
    ms = do_bench(graph.replay, warmup=3, rep=40, return_mode="median")
    return ms * 1e3 / 24


def copy_bandwidth(dev) -> float:
    """GB/s of a 512 MiB device-to-device copy (read + write)."""
    a = torch.empty(256 * 2 ** 20, dtype=torch.bfloat16, device=dev)
    b = torch.empty_like(a)
    us = bench(lambda i: b.copy_(a))
    return 2 * a.numel() * 2 / us / 1e3


def sweep(run, configs, default_us, sets):
    """(best us, best cfg) over configs; configs that fail to compile or launch are skipped."""
    best = (default_us, None)
    for cfg in configs:
        try:
            us = bench(lambda i: run(i, cfg), sets)
        except Exception:  # a tile too large for shared memory or registers
            torch.cuda.synchronize()
            continue
        if us < best[0]:
            best = (us, cfg)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--sets", type=int, default=3, help="copies of the inputs read in turn (more than L2 holds)")
    ap.add_argument("--quick", action="store_true", help="a smaller sweep")
    ap.add_argument("--no-sweep", action="store_true")
    args = ap.parse_args()
    dev, dt, M, S = torch.device("cuda"), torch.bfloat16, args.tokens, args.sets
    torch.manual_seed(0)
    bw = copy_bandwidth(dev)
    print(f"# bench_kernels: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"triton {_triton.triton.__version__}; {M} tokens, r={R}, dropout {P}; copy {bw:.0f} GB/s; "
          f"times per call inside a CUDA graph")
    print(f"{'kernel':<22}{'group':<10}{'us':>8}{'GB/s':>7}{'% copy':>8}{'best us':>9}  best configuration")
    totals = {"default": 0.0, "best": 0.0}
    seed = torch.tensor([1234, 5678], dtype=torch.int64, device=dev)

    def row(name, group, nbytes, us, best):
        totals["default"] += us * args.layers / 1e3
        totals["best"] += best[0] * args.layers / 1e3
        gbs = nbytes / us / 1e3
        print(f"{name:<22}{group:<10}{us:8.1f}{gbs:7.0f}{100 * gbs / bw:7.0f}%{best[0]:9.1f}  {best[1] or '(default)'}")

    def no_sweep(run, configs, us, sets):
        return us, None

    search = no_sweep if args.no_sweep else sweep
    q = args.quick
    for group, (K, outs, src_kind) in GROUPS.items():
        Rg = R * len(outs)
        xs = [torch.randn(M, K, device=dev, dtype=dt) for _ in range(S)]
        A = torch.randn(Rg, K, device=dev, dtype=dt) / K ** 0.5

        # forward: the shrink
        us = bench(lambda i: _triton.shrink(xs[i], A, seed, P), S)
        shrink_cfgs = [dict(BM=bm, BK=bk, num_warps=w, num_stages=s) for bm, bk, w, s in itertools.product(
            (16, 32, 64, 128), (64, 128, 256), (4, 8), (2, 3, 4) if not q else (3,))]
        row("shrink", group, M * K * 2, us,
            search(lambda i, c: _triton.shrink(xs[i], A, seed, P, cfg=c), shrink_cfgs, us, S))
        xs = None  # free the inputs before the next group

        # backward: one read of g per linear
        xa = torch.randn(M, Rg, device=dev, dtype=dt)
        gxa = torch.empty_like(xa)
        for j, N in enumerate(outs):
            gs = [torch.randn(M, N, device=dev, dtype=dt) for _ in range(S)]
            B = torch.randn(N, R, device=dev, dtype=dt)
            xaj, gxaj = xa[:, j * R:(j + 1) * R], gxa[:, j * R:(j + 1) * R]
            us = bench(lambda i: _triton.lora_grads(gs[i], B, xaj, 2.0, gxaj), S)
            grad_cfgs = [dict(BM=bm, BN=bn, num_warps=w, num_stages=s, PER_SM=ps) for bm, bn, w, s, ps in
                         itertools.product((32, 64, 128), (64, 128, 256), (4, 8), (2, 3) if not q else (3,),
                                           (1, 2, 4))]
            best = search(lambda i, c: _triton.lora_grads(gs[i], B, xaj, 2.0, gxaj, cfg=c), grad_cfgs, us, S)
            row(f"lora_grads {N}", group, M * N * 2, us, best)
            cublas = bench(lambda i: (torch.mm(gs[i].t(), xaj), torch.mm(gs[i], B)), S)
            print(f"{'  (cuBLAS g.T@xa, g@B)':<32}{cublas:8.1f}")
            gs = None

        # backward: dA and the LoRA input gradient, x rebuilt from its source
        gx = torch.empty(M, K, device=dev, dtype=dt)
        w = torch.randn(K, device=dev, dtype=dt)
        if src_kind == "norm":
            srcs = [("norm", torch.randn(M, K, device=dev), torch.rand(M, device=dev) + 0.5, w) for _ in range(S)]
            nbytes = M * K * 4 + M * K * 2
        elif src_kind == "mul":
            srcs = [("mul", torch.randn(M, K, device=dev, dtype=dt), torch.randn(M, K, device=dev, dtype=dt), None)
                    for _ in range(S)]
            nbytes = 2 * M * K * 2 + M * K * 2
        else:
            srcs, nbytes = None, 2 * M * K * 2
        xs = [torch.randn(M, K, device=dev, dtype=dt) for _ in range(S)] if srcs is None else [None] * S
        srcs = srcs or [None] * S
        us = bench(lambda i: _triton.dropout_backward(xs[i], gxa, A, gx, seed, P, gx_init=True, src=srcs[i]), S)
        bwd_cfgs = [dict(BM=bm, BK=bk, num_warps=w, num_stages=s, PER_SM=ps) for bm, bk, w, s, ps in
                    itertools.product((32, 64, 128), (32, 64, 128), (4, 8), (2, 3) if not q else (2,), (2, 4, 8))]
        best = search(lambda i, c: _triton.dropout_backward(xs[i], gxa, A, gx, seed, P, gx_init=True, src=srcs[i],
                                                            cfg=c), bwd_cfgs, us, S)
        row("dropout_backward", group, nbytes, us, best)
        xs = srcs = None
    print(f"\nper step ({args.layers} layers): these kernels take {totals['default']:.2f} ms as configured, "
          f"{totals['best']:.2f} ms with the best configurations of the sweep")


if __name__ == "__main__":
    main()
