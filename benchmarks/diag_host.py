"""Where does the CPU time of the fast path go, and why would lk.route cost more than the routed kernels?

Diagnostics for the device machine (CUDA), printed as plain lines:
  launch: host microseconds to enqueue one call of each op (no sync inside the loop)
  route:  a 4-layer Llama-1.1B-shaped model with 32 adapters, batch 32 x 256, kernels-only routed
          vs lk.route: GPU ms, host ms per forward, and the top GPU kernels of each

  step:   cProfile of eager lorakit training steps (4 layers of the 1.1B shape), by function

    PYTHONPATH=src python benchmarks/diag_host.py [launch] [launch-triton] [route] [step]
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F


def host_us(fn, n: int = 200) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    dt = (time.perf_counter() - t) / n * 1e6
    torch.cuda.synchronize()
    return dt


def launch() -> None:
    from lorakit.kernels import _triton, lora_linear, lora_linear_group, new_seed

    dev, bf = "cuda", torch.bfloat16
    x = torch.randn(64, 2048, device=dev, dtype=bf)
    A = torch.randn(16, 2048, device=dev, dtype=bf)
    B = torch.randn(2048, 16, device=dev, dtype=bf)
    W = torch.randn(2048, 2048, device=dev, dtype=bf)
    g = torch.randn(64, 16, device=dev, dtype=bf)
    gx = torch.randn(64, 2048, device=dev, dtype=bf)
    seed = new_seed(dev)
    xb = torch.randn(8192, 2048, device=dev, dtype=bf)
    h32 = torch.randn(64, 2048, device=dev)
    rstd = torch.ones(64, 1, device=dev)
    cases = {
        "F.linear (64 tokens)": lambda: F.linear(x, W),
        "torch.randint (new_seed)": lambda: new_seed(dev),
        "x.add_(1)": lambda: gx.add_(1),
        "triton shrink, fixed config": lambda: _triton.shrink(x, A, seed, 0.05),
        "triton shrink, autotuned (8192 rows)": lambda: _triton.shrink(xb, A, seed, 0.05),
        "triton dropout_backward, fixed": lambda: _triton.dropout_backward(x, g, A, gx, seed, 0.05),
        "triton norm_apply": lambda: _triton.norm_apply(h32, rstd, W[0]),
    }
    xr = x.clone().requires_grad_(True)
    Ar, Br = A.clone().requires_grad_(True), B.clone().requires_grad_(True)
    cases["lora_linear fwd (grad, p=0.05)"] = lambda: lora_linear(xr, W, None, Ar, Br, 2.0, 0.05, True)
    cases["lora_linear fwd (grad, p=0)"] = lambda: lora_linear(xr, W, None, Ar, Br, 2.0, 0.0, True)
    Ws = [W, W[:256], W[:256]]
    Bs = [B, B[:256].clone().requires_grad_(True), B[:256].clone().requires_grad_(True)]
    cases["lora_linear_group fwd, 3 linears (p=0.05)"] = lambda: lora_linear_group(
        xr, Ws, [None] * 3, [Ar] * 3, Bs, [2.0] * 3, 0.05, True)

    def fwd_bwd(p):
        def f():
            ys = lora_linear_group(xr, Ws, [None] * 3, [Ar] * 3, Bs, [2.0] * 3, p, True)
            torch.autograd.backward(ys, [torch.ones_like(y) for y in ys])
        return f
    cases["lora_linear_group fwd+bwd, 3 linears (p=0.05)"] = fwd_bwd(0.05)
    cases["lora_linear_group fwd+bwd, 3 linears (p=0)"] = fwd_bwd(0.0)
    for name, fn in cases.items():
        print(f"  launch  {name:<48} {host_us(fn, 100):8.1f} us host per call", flush=True)


def route() -> None:
    import lorakit as lk
    from bench_infer import swap, set_rows
    from bench_train import SHAPES, build
    from torch.profiler import ProfilerActivity, profile

    shape = SHAPES["1b"]
    ids = torch.randint(0, shape["vocab_size"], (32, 256), device="cuda")

    def measure(name, model):
        fwd = lambda: model(input_ids=ids)  # noqa: E731
        for _ in range(3):
            fwd()
        torch.cuda.synchronize()
        ts, hs = [], []
        for _ in range(10):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            h = time.perf_counter()
            fwd()
            hs.append((time.perf_counter() - h) * 1e3)
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b))
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fwd()
            torch.cuda.synchronize()
        ev = sorted(prof.key_averages(), key=lambda e: -getattr(e, "self_device_time_total", 0))
        total = sum(getattr(e, "self_device_time_total", 0) for e in ev) / 1e3
        print(f"  route  {name:<30} {statistics.median(ts):8.2f} ms  host {statistics.median(hs):8.2f} ms  "
              f"GPU kernels {total:8.2f} ms", flush=True)
        for e in ev[:8]:
            print(f"          {getattr(e, 'self_device_time_total', 0) / 1e3:8.2f} ms {e.count:5d}x  {e.key[:80]}")

    with torch.no_grad():
        model = build(shape, 4, "cuda").eval()
        measure("base", model)
        mods = swap(model, 32, 16, 32)
        set_rows(mods, torch.arange(32, device="cuda"))
        measure("kernels routed, 32 adapters", model)
        del model, mods
        model = build(shape, 4, "cuda").eval()
        names = [f"a{i}" for i in range(32)]
        for n in names:
            lk.inject(model, lk.LoraConfig(r=16, alpha=32, targets="all-linear"), name=n)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 1e-2)
        with lk.route(model, names):
            measure("lk.route, 32 adapters", model)
        with lk.route(model, [names[i % 4] for i in range(32)]):
            measure("lk.route, 4 adapters", model)


def step_profile() -> None:
    """cProfile of eager lorakit training steps (1.1B layer shapes, 4 layers, batch 8 x 1024): where the
    host time of a step goes, by function (tottime), against the frozen floor's host time."""
    import cProfile
    import pstats

    import lorakit as lk
    from bench_train import SHAPES, build

    shape = SHAPES["1b"]
    ids = torch.randint(0, shape["vocab_size"], (8, 1024), device="cuda")
    for lora in (False, True):
        model = build(shape, 4, "cuda")
        if lora:
            lk.inject(model, lk.LoraConfig(r=16, alpha=32, dropout=0.05, targets="all-linear"))
        else:
            model.requires_grad_(False)
            model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_(True))
        model.train()

        def step():
            model(input_ids=ids, labels=ids).loss.backward()
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        hs = []
        for _ in range(5):
            h = time.perf_counter()
            step()
            hs.append((time.perf_counter() - h) * 1e3)
            torch.cuda.synchronize()
        print(f"  step {'lorakit' if lora else 'floor':<8} host {statistics.median(hs):7.2f} ms (4 layers)", flush=True)
        if lora:
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(5):
                step()
                torch.cuda.synchronize()
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(30)
        del model


if __name__ == "__main__":
    import sys

    parts = sys.argv[1:] or ["launch", "route"]
    print(f"# diag_host: {torch.cuda.get_device_name()}, torch {torch.__version__}; {' '.join(parts)}", flush=True)
    if "launch" in parts:
        launch()
    if "launch-triton" in parts:  # Triton's own launch path, then lorakit's direct launches of compiled kernels
        from lorakit.kernels import _triton

        for direct in (False, True):
            _triton._DIRECT["on"] = direct
            print(f"  -- direct launches {'on' if direct else 'off'}")
            launch()
    if "route" in parts:
        route()
    if "step" in parts:
        step_profile()
