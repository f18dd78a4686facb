"""Where does the CPU time of the fast path go, and why would lk.route cost more than the routed kernels?

Diagnostics for the device machine (CUDA), printed as plain lines:
  launch: host microseconds to enqueue one call of each op (no sync inside the loop)
  route:  a 4-layer Llama-1.1B-shaped model with 32 adapters, batch 32 x 256, kernels-only routed
          vs lk.route: GPU ms, host ms per forward, and the top GPU kernels of each

  step:   cProfile of eager lorakit training steps (4 layers of the 1.1B shape), by function
  host-step: host ms of a whole eager training step (1.1B shape, 22 layers, AdamW) at batch 1 x 1024, where
          the GPU is not what the step waits for: the frozen floor against lorakit (all 7 linears, dropout
          0.05), two rounds of 10 steps; then a cProfile of 3 lorakit steps
  split:  where the host time of one Triton launch goes (lorakit's key, Triton's launcher, its parts)
          for the kernels of a training step and of decode; the host cost of a few tensor ops
  gc:     eager lorakit training steps of the 1.1B shape: host ms per step against the time Python's
          garbage collector took in it (per generation), with the collector as is, frozen after warm-up
          (gc.freeze) and off
  cli:    the CLI's eager step (`lorakit train`: bf16 base, float32 adapters, bf16 autocast, clipping,
          AdamW) on the SmolLM2-135M shape, batch 16 x 128: host ms of each part of the step for the frozen
          floor, lorakit as the CLI runs it and lorakit all in bf16 without autocast; then a cProfile
  calls:  host µs of one forward and one backward of each fused call against the plain F.linear calls it
          replaces (SmolLM2 and 1.1B widths, 2048 rows, bf16), and of the launches inside
  generate: compiled `generate` (static cache) of the 1.1B shape, base and unmerged, stopped after
          16, 64 and 160 tokens of one compiled cache size: per-token slope and fixed cost of each

    PYTHONPATH=src python benchmarks/diag_host.py [launch] [launch-triton] [route] [step] [host-step] [split] [gc]
        [cli] [calls] [generate]
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F


def timed(fn) -> tuple[float, float]:
    """(GPU ms, host ms) of one call of fn: CUDA events around it, the host clock until it returns."""
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    h = time.perf_counter()
    fn()
    host = (time.perf_counter() - h) * 1e3
    b.record()
    b.synchronize()
    return a.elapsed_time(b), host


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
    from lorakit.fast import _triton
    from lorakit.fast.ops import lora_linear, lora_linear_group
    from lorakit.functional import dropout_seed as new_seed

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
            t, h = timed(fwd)
            ts.append(t)
            hs.append(h)
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


def step_host_ms(step, n: int) -> list[float]:
    """Host ms of each of n calls of `step`, the GPU synced after each (so no call waits for an earlier one)."""
    hs = []
    for _ in range(n):
        h = time.perf_counter()
        step()
        hs.append((time.perf_counter() - h) * 1e3)
        torch.cuda.synchronize()
    return hs


def print_cprofile(step, n: int, title: str = "") -> None:
    """The 30 functions with the most own time over n calls of `step` (cProfile)."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        step()
        torch.cuda.synchronize()
    prof.disable()
    if title:
        print(f"  -- {title}")
    pstats.Stats(prof).sort_stats("tottime").print_stats(30)


def host_step() -> None:
    """Host ms of an eager training step of the whole 1.1B shape at batch 1 x 1024 (GPU work of some 20 ms, so the
    step waits for the host): the frozen floor and lorakit, as bench_train.py prepares them."""
    import gc

    from bench_train import SHAPES, build, prepare

    shape = dict(SHAPES["1b"], batch=1)
    ids = torch.randint(0, shape["vocab_size"], (1, shape["seq"]), device="cuda")
    for case in ("floor", "lorakit"):
        model, params, _ = prepare(case, build(shape, None, "cuda"), 16, 32)
        model.train()
        opt = torch.optim.AdamW(params, lr=1e-4) if params else None

        def step():
            model(input_ids=ids, labels=ids).loss.backward()
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)
        for _ in range(4):
            step()
        torch.cuda.synchronize()
        for rnd in range(2):
            hs = step_host_ms(step, 10)
            print(f"  {case:<8} round {rnd}: host ms per step {statistics.median(hs):.1f} (min {min(hs):.1f})",
                  flush=True)
        if case == "lorakit":
            print_cprofile(step, 3, f"{case}: host time of 3 steps by function (own time, cProfile)")
        del model, params, opt
        gc.collect()
        torch.cuda.empty_cache()


def step_profile() -> None:
    """cProfile of eager lorakit training steps (1.1B layer shapes, 4 layers, batch 8 x 1024): where the
    host time of a step goes, by function (tottime), against the frozen floor's host time."""
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
            model.zero_grad(set_to_none=True)
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        hs = step_host_ms(step, 5)
        print(f"  step {'lorakit' if lora else 'floor':<8} host {statistics.median(hs):7.2f} ms (4 layers)", flush=True)
        if lora:
            print_cprofile(step, 5)
        del model


def cli_step() -> None:
    """Host ms of the parts of the CLI's eager step (forward, backward, the loss read, clipping, AdamW) for
    the floor and lorakit, and where lorakit's host time goes by function (cProfile)."""
    import cProfile
    import pstats

    from transformers import LlamaConfig, LlamaForCausalLM

    import lorakit as lk
    from bench_cli import SHAPES

    hidden, layers, heads, kv, mlp = SHAPES["smollm2"]
    cfg = LlamaConfig(vocab_size=50257, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=True)
    ids = torch.randint(0, 50257, (16, 128), device="cuda")
    for case in ("floor", "lorakit (CLI: autocast, fp32 adapters)", "lorakit bf16, no autocast"):
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16)
        cast = case.startswith("lorakit (CLI")
        if case == "floor":
            model.requires_grad_(False)
            model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_(True))
        else:
            lk.inject(model, lk.LoraConfig(r=16, alpha=32, dropout=0.05, targets="all-linear"))
            if cast:
                for p in model.parameters():
                    if p.requires_grad:
                        p.data = p.data.float()
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4) if case != "floor" else None
        parts = {"forward": [], "backward": [], "loss read": [], "clip": [], "optimizer": [], "step": []}

        def step():
            t0 = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cast or case == "floor"):
                loss = model(input_ids=ids, labels=ids).loss
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            float(loss.detach())
            t3 = time.perf_counter()
            if opt is not None:
                torch.nn.utils.clip_grad_norm_(params, 1.0)
            t4 = time.perf_counter()
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)
            t5 = time.perf_counter()
            del loss
            return [t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t5 - t0]
        for _ in range(5):
            step()
        for _ in range(20):
            for k, v in zip(parts, step()):
                parts[k].append(v * 1e3)
        print(f"  {case:<40} " + "  ".join(f"{k} {statistics.median(v):6.2f}" for k, v in parts.items()), flush=True)
        if cast:
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(10):
                step()
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(45)
            pstats.Stats(prof).sort_stats("cumtime").print_stats("lorakit", 30)
        del model, opt
        torch.cuda.empty_cache()


def calls() -> None:
    """Host µs of a forward and of a backward of q/k/v (one group), o (one linear) and gate/up: plain F.linear,
    lorakit with bf16 adapters, with float32 adapters under autocast (cast inside the Function), and the
    casts autograd would make for them; then the launches inside one group call."""
    from lorakit.fast import _triton
    from lorakit.fast.ops import lora_linear, lora_linear_group
    from lorakit.functional import dropout_seed as new_seed

    dev, bf = "cuda", torch.bfloat16
    M = 2048

    def fwd_bwd(make):
        """(host µs of the forward, of the backward) of make() -> outputs, median over 50 calls."""
        f, b = [], []
        for i in range(60):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            ys = make()
            t1 = time.perf_counter()
            torch.autograd.backward(ys, grads(ys))
            t2 = time.perf_counter()
            if i >= 10:
                f.append((t1 - t0) * 1e6)
                b.append((t2 - t1) * 1e6)
        return statistics.median(f), statistics.median(b)

    gcache = {}

    def grads(ys):
        key = tuple(y.shape for y in ys)
        if key not in gcache:
            gcache[key] = [torch.randn_like(y) for y in ys]
        return gcache[key]

    for name, hidden, outs in (("SmolLM2 q/k/v", 576, (576, 192, 192)), ("SmolLM2 gate/up", 576, (1536, 1536)),
                               ("1.1B q/k/v", 2048, (2048, 256, 256)), ("1.1B o", 2048, (2048,))):
        x = torch.randn(M, hidden, device=dev, dtype=bf, requires_grad=True)
        Ws = [torch.randn(o, hidden, device=dev, dtype=bf) / hidden ** 0.5 for o in outs]
        A32 = [(torch.randn(16, hidden, device=dev) / hidden ** 0.5).requires_grad_(True) for _ in outs]
        B32 = [(torch.randn(o, 16, device=dev) * 0.01).requires_grad_(True) for o in outs]
        Abf = [a.detach().to(bf).requires_grad_(True) for a in A32]
        Bbf = [b.detach().to(bf).requires_grad_(True) for b in B32]
        J = len(outs)
        sc = [2.0] * J

        def call(As, Bs):
            if J == 1:
                return (lora_linear(x, Ws[0], None, As[0], Bs[0], 2.0, 0.05, True),)
            return lora_linear_group(x, Ws, [None] * J, As, Bs, sc, 0.05, True)

        def casts_outside():  # what the calls did before: autograd casts, then the same-dtype Function
            with torch.autocast("cuda", enabled=False):
                return call([a.to(bf) for a in A32], [b.to(bf) for b in B32])

        def autocast_inside():
            with torch.autocast("cuda", dtype=bf):
                return call(A32, B32)

        rows = [("F.linear (floor)", lambda: tuple(F.linear(x, W) for W in Ws)),
                ("lorakit, bf16 adapters", lambda: call(Abf, Bbf)),
                ("lorakit, fp32 adapters, autocast", autocast_inside),
                ("  the same with autograd casts", casts_outside)]
        for label, make in rows:
            f, b = fwd_bwd(make)
            print(f"  {name:<16} {label:<36} forward {f:7.1f} us  backward {b:7.1f} us", flush=True)

    # the launches inside one SmolLM2 q/k/v group call, and the tensor ops around them
    hidden, outs = 576, (576, 192, 192)
    x = torch.randn(M, hidden, device=dev, dtype=bf)
    Ws = [torch.randn(o, hidden, device=dev, dtype=bf) for o in outs]
    Bs = [torch.randn(o, 16, device=dev, dtype=bf) for o in outs]
    A = torch.randn(48, hidden, device=dev, dtype=bf)
    xa = torch.randn(M, 48, device=dev, dtype=bf)
    gs = [torch.randn(M, o, device=dev, dtype=bf) for o in outs]
    gxa = torch.empty(M, 48, device=dev, dtype=bf)
    gx = torch.empty(M, hidden, device=dev, dtype=bf)
    seed = new_seed(dev)
    parts = {
        "shrink (dropout)": lambda: _triton.shrink(x, A, seed, 0.05),
        "expand_gemm_ok": lambda: _triton.expand_gemm_ok(x, Ws, [None] * 3, xa, Bs),
        "expand_gemm": lambda: _triton.expand_gemm(x, Ws, [None] * 3, xa, Bs, [2.0] * 3),
        "lora_grads_group": lambda: _triton.lora_grads_group(gs, Bs, xa, [2.0] * 3, gxa),
        "dropout_backward": lambda: _triton.dropout_backward(x, gxa, A, gx, seed, 0.05, gx_init=True),
        "new_seed": lambda: new_seed(dev),
        "torch.cat of 3 A": lambda: torch.cat([A[:16], A[16:32], A[32:]]),
        "addmm_ (gx += g @ W)": lambda: gx.addmm_(gs[1], Ws[1]),
        "torch.empty": lambda: torch.empty(M, 48, device=dev, dtype=bf),
        "F.linear": lambda: F.linear(x, Ws[1]),
    }
    for label, fn in parts.items():
        print(f"  part {label:<24} {host_us(fn):7.1f} us", flush=True)


def split() -> None:
    """Host microseconds of the parts of one launch, for the kernels a training step and decode launch."""
    import triton

    from lorakit.fast import _triton as T

    dev, bf = "cuda", torch.bfloat16
    M, K, r = 1024, 2048, 16
    x = torch.randn(M, K, device=dev, dtype=bf)
    Ws = [torch.randn(n, K, device=dev, dtype=bf) for n in (2048, 256, 256)]
    Bs = [torch.randn(n, r, device=dev, dtype=bf) for n in (2048, 256, 256)]
    A = torch.randn(r, K, device=dev, dtype=bf)
    xa = torch.randn(M, 3 * r, device=dev, dtype=bf)
    g = torch.randn(M, 2048, device=dev, dtype=bf)
    gxa = torch.empty(M, r, device=dev, dtype=bf)
    seed = torch.zeros(2, dtype=torch.int64, device=dev)
    x1 = torch.randn(1, K, device=dev, dtype=bf)
    cases = {
        "expand_gemm (q, k, v)": lambda: T.expand_gemm(x, Ws, [None] * 3, xa, Bs, [2.0] * 3),
        "lora_grads (q)": lambda: T.lora_grads(g, Bs[0], xa[:, :r], 2.0, gxa),
        "shrink (dropout)": lambda: T.shrink(x, A, seed, 0.05),
        "dropout_backward": lambda: T.dropout_backward(x, gxa, A, None, seed, 0.05),
        "lora_small (1 row)": lambda: T.lora_small(x1, Ws[0], None, A, Bs[0], 2.0),
    }
    real = T._launch
    for name, fn in cases.items():
        calls = []
        T._launch = lambda kernel, grid, args, consts: (calls.append((kernel, grid, args, consts)),
                                                         real(kernel, grid, args, consts))
        fn()
        T._launch = real
        print(f"  split  {name:<26} wrapper {host_us(fn):7.1f} us for {len(calls)} launch(es)", flush=True)
        kernel, grid, args, consts = calls[0]
        hit = T._COMPILED.get(T._key(kernel, args[0].base.device if type(args[0]) is T._DESCRIPTOR else args[0].device,
                                     args, consts))
        g3 = grid + (1,) * (3 - len(grid))
        parts = {"_specs (key)": lambda: T._specs(args), "_launch": lambda: real(kernel, grid, args, consts)}
        if hit is not None:
            c = hit[0]
            parts["compiled[grid](*args)"] = lambda: c[g3](*args, *hit[1])
            stream = torch.cuda.current_stream().cuda_stream
            parts["compiled.run(...) direct"] = lambda: c.run(g3[0], g3[1], g3[2], stream, c.function,
                                                               c.packed_metadata, None, None, None, *args, *hit[1])
        else:
            print("    (no direct-launch cache entry)")
        for part, f in parts.items():
            try:
                print(f"    {part:<28} {host_us(f):7.1f} us", flush=True)
            except Exception as e:  # noqa: BLE001 - a diagnostic: report and go on
                print(f"    {part:<28} failed: {type(e).__name__}: {str(e)[:120]}")
    small = torch.empty(M, r, device=dev, dtype=bf)
    ops = {
        "triton.cdiv": lambda: triton.cdiv(M, 64),
        "torch.empty (1024, 16)": lambda: torch.empty(M, r, device=dev, dtype=bf),
        "t.new_empty": lambda: small.new_empty(small.shape),
        "t[:, 0:8] (slice)": lambda: small[:, 0:8],
        "t.view(-1)": lambda: small.view(-1),
        "torch.cuda.current_stream()": lambda: torch.cuda.current_stream(),
        "is_current_stream_capturing": lambda: torch.cuda.is_current_stream_capturing(),
        "torch.randint (new_seed)": lambda: torch.randint(0, 2 ** 32, (2,), dtype=torch.int64, device=dev),
        "torch.empty(2).random_(0, 2**32)": lambda: torch.empty(2, dtype=torch.int64, device=dev).random_(0, 2 ** 32),
    }
    for name, f in ops.items():
        print(f"  op     {name:<28} {host_us(f):7.1f} us", flush=True)


def gc_steps() -> None:
    """Host time of eager lorakit steps (1.1B shape, 22 layers, AdamW) and the garbage collector's share."""
    import gc

    import lorakit as lk
    from bench_train import SHAPES, build

    shape = SHAPES["1b"]
    ids = torch.randint(0, shape["vocab_size"], (8, 1024), device="cuda")
    model = build(shape, None, "cuda")
    lk.inject(model, lk.LoraConfig(r=16, alpha=32, dropout=0.05, targets="all-linear"))
    model.train()
    opt = torch.optim.AdamW(lk.trainable_parameters(model), lr=1e-4)
    spent = {0: 0.0, 1: 0.0, 2: 0.0}
    count = {0: 0, 1: 0, 2: 0}
    started = [0.0]

    def cb(phase, info):
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            spent[info["generation"]] += time.perf_counter() - started[0]
            count[info["generation"]] += 1

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    gc.callbacks.append(cb)
    for mode in ("as is", "frozen", "off", "as is"):
        if mode == "frozen":
            gc.collect()
            gc.freeze()
        if mode == "off":
            gc.disable()
        hosts, gcs, ts = [], [], []
        for _ in range(15):
            for g in spent:
                spent[g], count[g] = 0.0, 0
            t, h = timed(step)
            ts.append(t)
            hosts.append(h)
            gcs.append((sum(spent.values()) * 1e3, dict(count), spent[2] * 1e3))
        gc.enable()
        gc.unfreeze()
        print(f"  gc {mode:<7} step {statistics.median(ts):7.1f} ms (min {min(ts):6.1f}, max {max(ts):6.1f})  "
              f"host {statistics.median(hosts):7.1f} ms (max {max(hosts):6.1f})  gc per step: "
              f"{statistics.mean(g[0] for g in gcs):6.2f} ms mean, max {max(g[0] for g in gcs):6.2f} ms; full "
              f"collections {sum(g[1][2] for g in gcs)} in 15 steps ({sum(g[2] for g in gcs):.1f} ms); "
              f"objects tracked {len(gc.get_objects())}", flush=True)
    gc.callbacks.remove(cb)


def generate_scaling() -> None:
    """Compiled `generate` (static cache, max 160 new tokens: one cache size, one compile per batch size),
    stopped after 16, 64 and 160 tokens: the per-token slope and the fixed cost, base and unmerged."""
    from bench_decode import adapt
    from bench_train import SHAPES, build
    from transformers import StoppingCriteria, StoppingCriteriaList

    class After(StoppingCriteria):
        def __init__(self, n):
            self.n, self.seen = n, 0

        def __call__(self, input_ids, scores, **kwargs):
            self.seen += 1
            return torch.full((input_ids.shape[0],), self.seen >= self.n, dtype=torch.bool, device=input_ids.device)

    model = build(SHAPES["1b"], None, "cuda").eval()
    ids = torch.randint(0, 32000, (1, 16), device="cuda", generator=torch.Generator(device="cuda").manual_seed(5))

    def run(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        h = time.perf_counter()
        a.record()
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=160, do_sample=False,
                             pad_token_id=0, cache_implementation="static",
                             stopping_criteria=StoppingCriteriaList([After(n)]))
        b.record()
        host = (time.perf_counter() - h) * 1e3
        b.synchronize()
        return a.elapsed_time(b), host, out.shape[1] - ids.shape[1]

    def measure(label):
        with torch.no_grad():
            for _ in range(3):
                run(16)  # compiles (the first calls), then warm
            rows = {}
            for n in (16, 64, 160):
                ts = [run(n) for _ in range(3)]
                rows[n] = (statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts), ts[0][2])
        slope = (rows[160][0] - rows[16][0]) / 144
        print(f"  generate {label:<10} " + "  ".join(f"{n} tok: {ms:7.1f} ms (host {h:7.1f}, got {got})"
                                                    for n, (ms, h, got) in rows.items())
              + f"  -> {slope:.3f} ms/token + {rows[16][0] - 16 * slope:.1f} ms fixed", flush=True)

    measure("base")
    adapt(model)
    torch._dynamo.reset()
    measure("unmerged")


if __name__ == "__main__":
    import sys

    parts = sys.argv[1:] or ["launch", "route"]
    print(f"# diag_host: {torch.cuda.get_device_name()}, torch {torch.__version__}; {' '.join(parts)}", flush=True)
    if "launch" in parts:
        launch()
    if "launch-triton" in parts:  # Triton's own launch path, then lorakit's direct launches of compiled kernels
        from lorakit.fast import _triton

        for direct in (False, True):
            _triton._DIRECT["on"] = direct
            print(f"  -- direct launches {'on' if direct else 'off'}")
            launch()
    for name, fn in (("route", route), ("step", step_profile), ("host-step", host_step), ("cli", cli_step),
                     ("calls", calls), ("split", split), ("gc", gc_steps), ("generate", generate_scaling)):
        if name in parts:
            fn()
