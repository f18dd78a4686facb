"""What does an unmerged adapter cost in decode (one token at a time, KV cache)?

Decode through `generate` is bound by per-call CPU work, so
its ratios measure the host. Served decode replays each step as a CUDA graph; this script times
that, for the base model and with an adapter, the same way:

  linear: one adapted linear of the Llama shapes at 1 and 32 rows, as CUDA graphs of 20 calls:
          the base F.linear, lorakit's three-op inference path (x @ A.T, then s * xa @ B.T, then the
          base GEMM adding onto it), and the fused one-kernel path (`_triton.lora_small`) over a
          sweep of tile sizes. Each fused result is checked against a float64 reference first.
  model:  the 1.1B model (random weights), a static KV cache, one decode step (forward, greedy
          token, cache position + 1) captured as a CUDA graph and replayed; ms per token for the
          base model, `lk.inject` unmerged (fused kernel, and the three-op path), merged; plus
          eager `generate` for comparison.
  library: `lk.Decoder` (what `lorakit generate` and eval use on a GPU: prefill, then each token one
          CUDA graph replay) against eager `model.generate`, base and `lk.inject` unmerged, batch 1 and 32,
          and 32 (or 4) adapters mixed, one per prompt (`adapters=`, against `generate` under `lk.route`),
          batch 32;
          ms per new token (slope between a short and a long call), the fixed cost of a call (prefill), the
          first call (which captures), and the share of tokens on which the two agree.
  routed: one linear whose batch rows use different adapters (of 32 or 4), 1 to 32 tokens: the three-launch
          routed path against `_triton.routed_small` (what routed decode runs), with a sweep of its tile sizes.
  sample: `lk.Decoder` (captured), unmerged, greedy against sampling (temperature 0.8, top_p 0.95, generate's
          top_k of 50), batch 1 and 32: ms per new token (the slope between 16 and 16 + new tokens, fastest of 3
          calls), three rounds
  compiled: `generate(cache_implementation="static")`, which transformers runs through torch.compile
          (CUDA graphs), base and unmerged (not in the default parts: it compiles four times).

    PYTHONPATH=src python benchmarks/bench_decode.py [--part linear,model] [--layers 22]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import statistics

import torch
import torch.nn.functional as F

from bench_train import SHAPES, build

LINEARS = {  # (out, in) of the seven adapted linears
    "1b": {"q/o": (2048, 2048), "k/v": (256, 2048), "gate/up": (5632, 2048), "down": (2048, 5632)},
    "8b": {"q/o": (4096, 4096), "k/v": (1024, 4096), "gate/up": (14336, 4096), "down": (4096, 14336)},
}
SWEEP = [dict(BN=bn, SPLIT=sp, BK=bk, num_warps=4, num_stages=3, GEMV=False)
         for bn in (16, 32, 64, 128) for sp in (1, 2, 4, 8) for bk in (128, 256)]
SWEEP_GEMV = [dict(BN=bn, SPLIT=sp, BK=bk, num_warps=4, num_stages=3, GEMV=True)
              for bn in (16, 32, 64) for sp in (1, 2, 4, 8, 16) for bk in (128, 256)]


def capture(fn, calls: int = 1) -> torch.cuda.CUDAGraph:
    """`calls` calls of fn as one CUDA graph, after three warm-up calls on a side stream."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    return g


def graph_us(fn, calls: int = 20, reps: int = 10) -> float:
    """Median µs per call of fn, replayed as one CUDA graph of `calls` calls."""
    g = capture(fn, calls)
    g.replay()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e3 / calls)
    return statistics.median(ts)


def part_linear(shapes: list[str], sweep: bool) -> None:
    from lorakit.fast import triton as _triton
    from lorakit.fast.ops import _lora_out

    dev, dt = "cuda", torch.bfloat16
    print("\n# one linear, CUDA graphs, µs per call (bf16, r=16)")
    print(f"{'shape':<14} {'M':>3} {'base':>7} {'3 ops':>7} {'fused':>7} {'best':>7}  "
          "best config; 3 ops / base, best / base")
    best_cfgs = {}
    for shape, M in itertools.product(shapes, (1, 32)):
        for name, (N, K) in LINEARS[shape].items():
            g = torch.Generator(device=dev).manual_seed(0)
            x = torch.randn(M, K, device=dev, dtype=dt, generator=g)
            W = (torch.randn(N, K, device=dev, generator=g) / K ** 0.5).to(dt)
            A = (torch.randn(16, K, device=dev, generator=g) / K ** 0.5).to(dt)
            B = (torch.randn(N, 16, device=dev, generator=g) * 0.01).to(dt)
            ref = x.double() @ W.double().t() + 2.0 * (x.double() @ A.double().t()) @ B.double().t()
            base = graph_us(lambda: F.linear(x, W))

            def three():
                y = _lora_out(None, x @ A.t(), B, 2.0)
                y.addmm_(x, W.t())

            t3 = graph_us(three)
            fused = graph_us(lambda: _triton.lora_small(x, W, None, A, B, 2.0))
            results = []
            for cfg in (SWEEP + (SWEEP_GEMV if M == 1 else [])) if sweep else [{}]:
                try:
                    y = _triton.lora_small(x, W, None, A, B, 2.0, cfg)
                except Exception as e:  # a configuration this GPU cannot compile
                    print(f"  {cfg}: {type(e).__name__}")
                    continue
                err = ((y.double() - ref).norm() / ref.norm()).item()
                if err > 1e-2:
                    raise SystemExit(f"lora_small {shape} {name} M={M} {cfg}: relative error {err:.2e}")
                results.append((graph_us(lambda: _triton.lora_small(x, W, None, A, B, 2.0, cfg)), cfg))
            bt, bc = min(results, key=lambda r: r[0])
            best_cfgs[(shape, name, M)] = bc
            cfg_s = f"{'dot' if not bc.get('GEMV', M == 1) else 'gemv'} BN{bc.get('BN', '-')} " \
                f"split{bc.get('SPLIT', '-')} BK{bc.get('BK', '-')}"
            print(f"{shape + ' ' + name:<14} {M:>3} {base:7.2f} {t3:7.2f} {fused:7.2f} {bt:7.2f}  {cfg_s}; "
                  f"{t3 / base:.2f}x, {bt / base:.2f}x", flush=True)


def decode_graph_ms(model, batch: int, prompt: int, new: int, reps: int = 3) -> float:
    """ms per token of greedy decode with a static KV cache, each step replayed as one CUDA graph."""
    from transformers import StaticCache

    dev = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), device=dev,
                        generator=torch.Generator(device=dev).manual_seed(5))
    # Transformers' static cache layers keep their own write position and advance it on every call
    # (whatever cache_position says), so every step timed here gets a slot of its own.
    cache = StaticCache(config=model.config, max_cache_len=prompt + 8 + (reps + 1) * new)
    with torch.no_grad():
        out = model(input_ids=ids, past_key_values=cache, cache_position=torch.arange(prompt, device=dev),
                    use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
        pos = torch.tensor([prompt], device=dev)
        if dev.type == "cuda":  # one eager step first: an error here is not the graph's
            model(input_ids=tok, past_key_values=cache, cache_position=pos, use_cache=True)
            torch.cuda.synchronize()

        def step():
            logits = model(input_ids=tok, past_key_values=cache, cache_position=pos, use_cache=True).logits
            tok.copy_(logits[:, -1:].argmax(-1))
            pos.add_(1)

        if dev.type != "cuda":  # a smoke test of the script: the same steps, eagerly, timed by the clock
            import time

            t0 = time.perf_counter()
            for _ in range(new):
                step()
            return (time.perf_counter() - t0) * 1e3 / new
        g = capture(step)
        ts = []
        for _ in range(reps):
            torch.cuda.synchronize()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(new):
                g.replay()
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b) / new)
    del g
    return statistics.median(ts)


def decode_eager_ms(model, batch: int, prompt: int, new: int, reps: int = 3) -> float:
    dev = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), device=dev,
                        generator=torch.Generator(device=dev).manual_seed(5))
    ts = []
    with torch.no_grad():
        for i in range(reps + 1):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                           min_new_tokens=new, do_sample=False, pad_token_id=0)
            b.record()
            b.synchronize()
            if i:
                ts.append(a.elapsed_time(b) / new)
    return statistics.median(ts)


ROUTED_SWEEP = [dict(BN=bn, SPLIT=sp, num_warps=w, XSPLIT=xs, XBK=xbk, xwarps=xw)
                for bn in (16, 32) for sp in (1, 2, 4, 8) for w in (4, 8)
                for xs, xbk, xw in ((4, 256, 4), (4, 512, 8), (8, 128, 4), (16, 128, 4))]


def part_routed(shapes: list[str], sweep: bool) -> None:
    """One linear whose batch rows each use their own adapter (of 32 or 4, r=16; one row base only), few
    tokens: the base F.linear, the three-launch routed path (shrink, base GEMM, expand) and
    `_triton.routed_small`, each as CUDA graphs of 20 calls, checked against a float64 reference first."""
    from lorakit.fast import routed
    from lorakit.fast import triton as _triton

    dev, dt = "cuda", torch.bfloat16
    print("\n# routed decode, one linear, CUDA graphs, µs per call (bf16, r=16; M tokens, one per batch row)")
    print(f"{'shape':<14} {'adapters':>8} {'M':>3} {'base':>7} {'3 launches':>10} {'routed_small':>12} {'best':>7}  "
          "best config; ratios to base")
    for shape, n_ad, M in itertools.product(shapes, (32, 4), (32, 8, 1)):
        if n_ad == 4 and M != 32:
            continue
        for name, (N, K) in LINEARS[shape].items():
            g = torch.Generator(device=dev).manual_seed(0)
            x = torch.randn(M, K, device=dev, dtype=dt, generator=g)
            W = (torch.randn(N, K, device=dev, generator=g) / K ** 0.5).to(dt)
            A = (torch.randn(n_ad, 16, K, device=dev, generator=g) / K ** 0.5).to(dt)
            B = (torch.randn(n_ad, N, 16, device=dev, generator=g) * 0.01).to(dt)
            scales = torch.full((n_ad,), 2.0, device=dev)
            rows = torch.arange(M, device=dev) % n_ad
            rows[min(3, M - 1)] = -1
            ref = x.double() @ W.double().t()
            for m in range(M):
                a = int(rows[m])
                if a >= 0:
                    ref[m] += 2.0 * (x[m].double() @ A[a].double().t()) @ B[a].double().t()
            base = graph_us(lambda: F.linear(x, W))
            three = graph_us(lambda: routed._routed_forward_triton(x, rows, W, None, A, B, scales))
            results = []
            for cfg in [{}] + (ROUTED_SWEEP if sweep else []):
                y = _triton.routed_small(x, W, None, A, B, scales, rows, cfg)
                err = ((y.double() - ref).norm() / ref.norm()).item()
                if err > 1e-2:
                    raise SystemExit(f"routed_small {shape} {name} M={M} {cfg}: relative error {err:.2e}")
                results.append((graph_us(lambda: _triton.routed_small(x, W, None, A, B, scales, rows, cfg)), cfg))
            default = results[0][0]
            bt, bc = min(results, key=lambda r: r[0])
            print(f"{shape + ' ' + name:<14} {n_ad:>8} {M:>3} {base:7.2f} {three:10.2f} {default:12.2f} {bt:7.2f}  "
                  f"{bc or 'default'}; {three / base:.2f}x, {default / base:.2f}x, {bt / base:.2f}x", flush=True)


def adapt(model) -> None:
    """r=16 alpha=32 on all linears, with small random B (a trained adapter's shape, not PEFT's zero start)."""
    import lorakit as lk

    lk.inject(model, lk.LoraConfig(r=16, alpha=32, targets="all-linear"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 1e-2)


def part_library(layers: int | None, new: int, reps: int = 5) -> None:
    import time

    import lorakit as lk

    model = build(SHAPES["1b"], layers, "cuda", torch.bfloat16).eval()
    model.generation_config.eos_token_id = None  # every call makes all its tokens
    short = max(1, new // 4)
    rows, base = [], {}
    for label in ("base", "unmerged", "32 adapters routed", "4 adapters routed"):
        if label == "unmerged":
            adapt(model)
        names = None
        if label == "32 adapters routed":  # one adapter per prompt (the step is captured on the first call)
            with torch.no_grad():
                for i in range(1, 32):
                    lk.inject(model, lk.LoraConfig(r=16, alpha=32, targets="all-linear"), name=f"a{i}")
                    for n, p in model.named_parameters():
                        if f"adapters.a{i}.lora_B" in n:
                            p.normal_(0, 1e-2)
            names = ["default"] + [f"a{i}" for i in range(1, 32)]
        if label == "4 adapters routed":  # the same 32 adapters injected, 4 of them used, 8 prompts each
            names = ["default", "a1", "a2", "a3"] * 8
        for batch in ((1, 32) if names is None else (32,)):
            ids = torch.randint(0, model.config.vocab_size, (batch, 16), device="cuda",
                                generator=torch.Generator(device="cuda").manual_seed(5))
            mask = torch.ones_like(ids)
            decoder = lk.Decoder(model)
            def generate(n):
                with contextlib.ExitStack() as stack:
                    if names:
                        stack.enter_context(lk.route(model, names))
                    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                                          pad_token_id=0)

            calls = {"decoder": lambda n: decoder(ids, mask, n, pad_token_id=0, adapters=names), "generate": generate}
            per, fixed, outs, first = {}, {}, {}, {}
            for name, call in calls.items():
                t = {}
                for n in (new, short):
                    ts = []
                    for i in range(reps + (n == new)):
                        torch.cuda.synchronize()
                        t0 = time.perf_counter()
                        out = call(n)
                        torch.cuda.synchronize()
                        ts.append((time.perf_counter() - t0) * 1e3)
                    if n == new:
                        outs[name], first[name], ts = out, ts[0], ts[1:]
                    t[n] = statistics.median(ts)
                per[name] = (t[new] - t[short]) / (new - short)  # ms per token, the prefill and setup apart
                fixed[name] = t[new] - new * per[name]
            base.setdefault(batch, per["decoder"])
            agree = float((outs["decoder"] == outs["generate"])[:, 16:].float().mean())
            rows.append((f"{label}, batch {batch}", per["decoder"], per["generate"], per["generate"] / per["decoder"],
                         per["decoder"] / base[batch], fixed["decoder"], fixed["generate"], first["decoder"], agree))
            print("  " + " ".join(str(round(v, 3)) if isinstance(v, float) else v for v in rows[-1]), flush=True)
    print(f"\n# lk.Decoder vs model.generate after a 16-token prompt: ms per new token (the slope between calls "
          f"of {short} and {new} tokens, median of {reps} calls each), fixed ms per call (prefill, setup), the "
          f"first call (which captures), the share of the {new} tokens on which the two agree")
    print(f"{'case':<20} {'decoder':>8} {'generate':>9} {'speedup':>8} {'x base':>7} {'fixed':>6} {'gen fixed':>9} "
          f"{'1st call':>8} {'agree':>6}")
    for name, d, g, sp, xb, f, gf, first_ms, agree in rows:
        print(f"{name:<20} {d:8.3f} {g:9.3f} {sp:7.2f}x {xb:7.3f} {f:6.1f} {gf:9.1f} {first_ms:8.0f} {agree:6.3f}")


def decoder_ms(decoder, ids, new: int, **kw) -> float:
    """ms per new token of `decoder` on prompts `ids` (no end token; `kw`: sampling settings): the slope between
    16 and 16 + new tokens, fastest of 3 calls each, after a call that captures the step if it is new."""
    import time

    mask = torch.ones_like(ids)
    decoder(ids, mask, 8, eos_token_id=[], **kw)
    ts: dict[int, list[float]] = {16: [], 16 + new: []}
    for _ in range(3):
        for n in ts:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            decoder(ids, mask, n, eos_token_id=[], **kw)
            torch.cuda.synchronize()
            ts[n].append(time.perf_counter() - t0)
    return (min(ts[16 + new]) - min(ts[16])) / new * 1e3


def part_sample(layers: int | None, new: int) -> None:
    import lorakit as lk

    model = build(SHAPES["1b"], layers, "cuda", torch.bfloat16).eval()
    adapt(model)
    decoder = lk.Decoder(model, cuda_graphs="on")
    modes = {"greedy": {}, "sample": dict(do_sample=True, temperature=0.8, top_p=0.95)}
    print("\n# lk.Decoder, unmerged, ms per new token by round: greedy, sampling, and their ratio")
    for batch in (1, 32):
        ids = torch.randint(0, model.config.vocab_size, (batch, 16), device="cuda")
        per: dict[str, list[float]] = {}
        for _ in range(3):
            for name, kw in modes.items():
                per.setdefault(name, []).append(decoder_ms(decoder, ids, new, **kw))
        ratio = statistics.median(s / g for s, g in zip(per["sample"], per["greedy"]))
        print(f"  batch {batch}: greedy {[round(x, 3) for x in per['greedy']]}, sampling "
              f"{[round(x, 3) for x in per['sample']]}, sampling / greedy {ratio:.3f}", flush=True)


def part_compiled(layers: int | None, new: int, profile: bool = False) -> None:
    """`generate` with a static cache, which transformers serves by compiling the forward with
    torch.compile ("reduce-overhead": CUDA graphs); the fused kernel is one custom op in that graph."""
    model = build(SHAPES["1b"], layers, "cuda", torch.bfloat16).eval()
    rows = []

    def gen_ms(batch: int) -> float:
        ids = torch.randint(0, model.config.vocab_size, (batch, 16), device="cuda",
                            generator=torch.Generator(device="cuda").manual_seed(5))
        ts = []
        with torch.no_grad():
            for i in range(5):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                               min_new_tokens=new, do_sample=False, pad_token_id=0, cache_implementation="static")
                b.record()
                b.synchronize()
                if i >= 2:  # the first calls compile
                    ts.append(a.elapsed_time(b) / new)
        return statistics.median(ts)

    def host_profile(label: str) -> None:  # where the CPU time of 16 compiled decode steps goes
        import cProfile
        import pstats

        ids = torch.randint(0, model.config.vocab_size, (1, 16), device="cuda")
        pr = cProfile.Profile()
        with torch.no_grad():
            pr.enable()
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16,
                           min_new_tokens=16, do_sample=False, pad_token_id=0, cache_implementation="static")
            torch.cuda.synchronize()
            pr.disable()
        print(f"\n# host profile, {label}, 16 tokens at batch 1")
        pstats.Stats(pr).sort_stats("tottime").print_stats(12)

    def gpu_profile(label: str) -> None:  # where the GPU time of 16 compiled decode steps goes
        from torch.profiler import ProfilerActivity, profile as prof

        ids = torch.randint(0, model.config.vocab_size, (1, 16), device="cuda")
        with prof(activities=[ProfilerActivity.CUDA]) as p, torch.no_grad():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16,
                           min_new_tokens=16, do_sample=False, pad_token_id=0, cache_implementation="static")
        print(f"\n# GPU profile, {label}, 16 tokens at batch 1 (prefill included)")
        print(p.key_averages().table(sort_by="cuda_time_total", row_limit=16, max_name_column_width=70))

    base = {b: gen_ms(b) for b in (1, 32)}
    if profile:
        host_profile("base")
        gpu_profile("base")
    adapt(model)
    torch._dynamo.reset()
    for b in (1, 32):
        rows.append((f"compiled generate batch {b}, base", base[b], 1.0))
        ms = gen_ms(b)
        rows.append((f"compiled generate batch {b}, unmerged", ms, ms / base[b]))
        if profile and b == 1:
            host_profile("unmerged")
            gpu_profile("unmerged")
    print(f"\n{'case':<50} {'ms/token':>9} {'x base':>7}")
    for name, ms, ratio in rows:
        print(f"{name:<50} {ms:9.3f} {ratio:7.3f}", flush=True)


def part_model(layers: int | None, new: int) -> None:
    import lorakit as lk
    from lorakit.fast import triton as _triton

    model = build(SHAPES["1b"], layers, "cuda", torch.bfloat16).eval()
    rows = []

    def report(name, ms, base):
        rows.append((name, ms, ms / base))
        print(f"  {name:<48} {ms:8.3f} ms/token {ms / base:6.3f}x base", flush=True)

    base = {b: decode_graph_ms(model, b, 16, new) for b in (1, 32)}
    for b in (1, 32):
        report(f"graphed decode batch {b}, base", base[b], base[b])
    eager = {b: decode_eager_ms(model, b, 16, new) for b in (1, 32)}
    for b in (1, 32):
        report(f"eager generate batch {b}, base", eager[b], eager[b])
    adapt(model)
    for b in (1, 32):
        report(f"graphed decode batch {b}, unmerged (fused kernel)", decode_graph_ms(model, b, 16, new), base[b])
    limit = _triton.decode.SMALL_MAX_ROWS
    _triton.decode.SMALL_MAX_ROWS = 0
    for b in (1, 32):
        report(f"graphed decode batch {b}, unmerged (three ops)", decode_graph_ms(model, b, 16, new), base[b])
    _triton.decode.SMALL_MAX_ROWS = limit
    for b in (1, 32):
        report(f"eager generate batch {b}, unmerged (fused kernel)", decode_eager_ms(model, b, 16, new), eager[b])
    lk.merge(model)
    for b in (1, 32):
        report(f"graphed decode batch {b}, merged", decode_graph_ms(model, b, 16, new), base[b])
    print(f"\n{'case':<50} {'ms/token':>9} {'x base':>7}")
    for name, ms, ratio in rows:
        print(f"{name:<50} {ms:9.3f} {ratio:7.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", default="linear,model")
    ap.add_argument("--shapes", default="1b,8b")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--profile", action="store_true",
                    help="compiled: host and kernel tables of the base and adapted batch-1 decode")
    ap.add_argument("--no-sweep", action="store_true", help="linear: the default tile sizes only")
    args = ap.parse_args()
    import transformers
    import triton

    print(f"# bench_decode: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"transformers {transformers.__version__}", flush=True)
    parts = args.part.split(",")
    if "linear" in parts:
        part_linear(args.shapes.split(","), not args.no_sweep)
    if "model" in parts:
        part_model(args.layers, args.new_tokens)
    if "routed" in parts:
        part_routed(args.shapes.split(","), not args.no_sweep)
    if "library" in parts:
        part_library(args.layers, args.new_tokens)
    if "sample" in parts:
        part_sample(args.layers, args.new_tokens)
    if "compiled" in parts:
        part_compiled(args.layers, args.new_tokens, args.profile)


if __name__ == "__main__":
    main()
