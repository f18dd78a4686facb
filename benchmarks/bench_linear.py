"""How much does one adapted Llama-1.1B linear cost over the frozen linear, reference vs fused Function?

For each linear shape of the 1.1B model (and the q/k/v and gate/up groups), forward+backward
(gradients for x, A, B; W frozen) of:
  base       F.linear only (the frozen floor of this layer)
  reference  F.linear + s * (F.dropout(x) @ A.T) @ B.T through autograd (what PEFT does)
  fast/torch the fused Function with the PyTorch backend
  fast/triton the fused Function with the Triton kernels (CUDA)
  group      q/k/v (gate/up) as one lora_linear_group call
Prints median ms and the activation bytes saved for backward beyond x itself.

    PYTHONPATH=src python benchmarks/bench_linear.py [--tokens 8192] [--rank 16] [--device cuda]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from lorakit.fast.ops import lora_linear, lora_linear_group
from lorakit.functional import dropout_seed
from lorakit.functional import lora_linear as reference_lora_linear
from lorakit.fast import triton as _triton

SHAPES = {"q/o 2048->2048": (2048, [2048]), "k/v 2048->256": (2048, [256]), "gate/up 2048->5632": (2048, [5632]),
          "down 5632->2048": (5632, [2048]),
          "group q,k,v": (2048, [2048, 256, 256]), "group gate,up": (2048, [5632, 5632])}


def timer(fn, device: str) -> float:
    """Median ms of fn()."""
    if device == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=200, return_mode="median")
    for _ in range(2):
        fn()
    ts = []
    for _ in range(7):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def saved_bytes(fn, exclude: list[torch.Tensor]) -> int:
    """Bytes of distinct storages autograd saves while running fn(), not counting `exclude`'s storages."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
        return t.detach()  # returning t itself would make a saved output keep its own graph alive (a leak)

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def run(args) -> list[dict]:
    dev, dt = args.device, getattr(torch, args.dtype)
    torch.manual_seed(0)
    rows = []
    for label, (in_f, outs) in SHAPES.items():
        x = torch.randn(args.tokens, in_f, device=dev, dtype=dt, requires_grad=True)
        Ws = [torch.randn(o, in_f, device=dev, dtype=dt) / in_f ** 0.5 for o in outs]
        As = [(torch.randn(args.rank, in_f, device=dev, dtype=dt) / in_f ** 0.5).requires_grad_(True) for _ in outs]
        Bs = [(torch.randn(o, args.rank, device=dev, dtype=dt) * 1e-2).requires_grad_(True) for o in outs]
        gys = [torch.randn(args.tokens, o, device=dev, dtype=dt) for o in outs]
        s = 2.0
        params = [x, *As, *Bs]

        def fwd_base():
            return [F.linear(x, W) for W in Ws]

        def fwd_ref(p):
            seed = dropout_seed(x.device) if p > 0 else None
            return lambda: [reference_lora_linear(x, W, None, A, B, s, p, seed) for W, A, B in zip(Ws, As, Bs)]

        def fwd_fast(p, backend):
            return lambda: [lora_linear(x, W, None, A, B, s, p, True, backend=backend) for W, A, B in zip(Ws, As, Bs)]

        def fwd_group(p, backend):
            return lambda: list(lora_linear_group(x, Ws, [None] * len(Ws), As, Bs, [s] * len(Ws), p, True,
                                                  backend=backend))

        def step(fwd, wrt):
            def go():
                ys = fwd()
                torch.autograd.grad(ys, wrt, gys)
            return go

        backends = ["torch"] + (["triton"] if _triton.available_for(x) else [])
        base_ms = timer(step(fwd_base, [x]), dev)
        rows.append(dict(shape=label, p="-", variant="base (frozen)", ms=base_ms, ratio=1.0,
                         saved=saved_bytes(fwd_base, [x, *Ws])))
        for p in (0.0, 0.05):
            # "auto": Triton kernels for dropout on CUDA, cuBLAS otherwise; the PyTorch mask path
            # (integer hashing in eager ops) is only a fallback and is timed on CPU alone.
            names = backends if dev == "cpu" else ["auto"]
            variants = [("reference (autograd)", fwd_ref(p))]
            variants += [(f"fast/{b}", fwd_fast(p, b)) for b in names]
            if len(outs) > 1:
                variants += [(f"group/{b}", fwd_group(p, b)) for b in names]
            for name, fwd in variants:
                ms = timer(step(fwd, params), dev)
                rows.append(dict(shape=label, p=p, variant=name, ms=ms, ratio=ms / base_ms,
                                 saved=saved_bytes(fwd, [x, *Ws, *As, *Bs])))
        x = Ws = As = Bs = gys = None  # free them before the next shape
        if dev == "cuda":
            torch.cuda.empty_cache()
    return rows


def kernel_rows(args) -> list[str]:
    """The Triton dropout kernels alone: ms and achieved GB/s (bytes that must move / time)."""
    dev, dt = args.device, getattr(torch, args.dtype)
    out = []
    for K, R in [(2048, 16), (2048, 48), (5632, 16)]:
        x = torch.randn(args.tokens, K, device=dev, dtype=dt)
        A = torch.randn(R, K, device=dev, dtype=dt)
        g = torch.randn(args.tokens, R, device=dev, dtype=dt)
        gx = torch.randn(args.tokens, K, device=dev, dtype=dt)
        seed = torch.tensor([1, 2], device=dev)
        nb = x.numel() * x.element_size()
        cases = [("shrink p=0.05 (reads x)", lambda: _triton.shrink(x, A, seed, 0.05), nb),
                 ("shrink p=0 (reads x)", lambda: _triton.shrink(x, A), nb),
                 ("cuBLAS x @ A.T (reads x)", lambda: x @ A.t(), nb),
                 ("dropout bwd, gx in place (x, gx r/w)", lambda: _triton.dropout_backward(x, g, A, gx, seed, 0.05),
                  3 * nb),
                 ("cuBLAS g.T @ x + gx.addmm_ (p=0)", lambda: (g.t() @ x, gx.addmm_(g, A)), 3 * nb)]
        for name, fn, nbytes in cases:
            ms = timer(fn, dev)
            out.append(f"{K:>6} {R:>4} {name:<40} {ms:8.4f} ms {nbytes / ms / 1e6:9.0f} GB/s")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=None, help="rows of x (default 8192 on CUDA, 512 on CPU)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default bfloat16 on CUDA, float32 on CPU (CPU bf16 GEMMs "
                                                  "without native support are pathologically slow)")
    args = ap.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.tokens is None:
        args.tokens = 8192 if args.device == "cuda" else 512
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    tri = getattr(_triton.triton, "__version__", "none")
    print(f"# bench_linear: {gpu}, torch {torch.__version__}, triton {tri}, {args.dtype}, tokens {args.tokens}, "
          f"r {args.rank}; fwd+bwd (grads x, A, B), median ms; saved = activation MiB kept for backward beyond x")
    if _triton.available_for(torch.empty(0, device=args.device)):
        print(f"{'K':>6} {'R':>4} kernel (tokens {args.tokens})")
        for line in kernel_rows(args):
            print(line, flush=True)
    rows = run(args)
    print(f"{'shape':<20} {'p':>5} {'variant':<22} {'ms':>8} {'x base':>7} {'saved MiB':>10}")
    for r in rows:
        p = r["p"] if isinstance(r["p"], str) else f"{r['p']:.2f}"
        print(f"{r['shape']:<20} {p:>5} {r['variant']:<22} {r['ms']:8.3f} {r['ratio']:7.2f} "
              f"{r['saved'] / 2**20:10.1f}")


if __name__ == "__main__":
    main()
