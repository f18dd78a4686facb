"""Does LoRA training cost what the frozen model costs? Step time and peak memory vs the frozen floor.

The DESIGN.md setup: a random-init Llama-shaped model (1.1B: hidden 2048, 22 layers, GQA 32/4,
MLP 5632, vocab 32000; or --shape 8b), bf16, batch 8 x 1024, AdamW, LoRA r=16 alpha=32.
All cases run in one process on the same model weights, batch and seed:

  full          every weight trains (AdamW over 1.1B parameters)
  floor         nothing trains; forward + backward through the frozen model (the embedding
                output requires grad so the backward runs through every layer)
  peft-all      PEFT LoRA on all 7 linears, dropout 0.05 (and peft-all-p0: dropout 0)
  peft-qv       PEFT LoRA on q_proj, v_proj, dropout 0.05
  lorakit       lk.inject(model, lk.LoraConfig(r=16, alpha=32, dropout=0.05, targets="all-linear")), then
                lk.fuse(model) (q/k/v and gate/up in one call, LoRA inputs rebuilt from the RMSNorm / MLP
                tensors); lorakit-p0: dropout 0; lorakit-qv: q,v only;
                lorakit-unfused: the fast path per linear, without lk.fuse; lorakit-routed4(-p0):
                4 adapters trained at once, the batch rows dealt round-robin (`lk.route`)
  <case>-dora   any peft or lorakit case above as DoRA (PEFT's use_dora=True, lk.LoraConfig(dora=True));
                --dora adds the -dora twin of every peft/lorakit case chosen

    PYTHONPATH=src python benchmarks/bench_train.py [--layers 22] [--shape 1b|8b] [--cases floor,lorakit]
        [--compile] [--graphs] [--attn sdpa|causal] [--profile CASES] [--cprofile CASES] [--dora]

DoRA against LoRA, lorakit against PEFT (dropout 0: lorakit's fused DoRA path takes no dropout):
    PYTHONPATH=src python benchmarks/bench_train.py --cases floor,lorakit-p0,peft-all-p0 --dora

--graphs captures each case's whole step (forward, backward, AdamW with capturable=True) as one
CUDA graph with `lk.graphed_step` and times its replays: what the GPU needs with no CPU work per
op, for every case alike (--attn causal keeps the attention kernels those of the eager step).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import time

import torch

SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000, batch=8, seq=1024),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, batch=2, seq=1024),
}
CASES = ["full", "floor", "peft-all", "peft-all-p0", "peft-qv", "lorakit", "lorakit-p0", "lorakit-qv",
         "lorakit-unfused", "lorakit-routed4", "lorakit-routed4-p0"]
ROUTED = 4  # lorakit-routed4: this many adapters trained at once, batch rows dealt round-robin (`lk.route`)


def register_causal_attention() -> str:
    """Register "lk_causal": PyTorch SDPA with is_causal=True and no mask tensor, ever.

    Transformers' own "sdpa" makes the same call in an eager step of this benchmark (no padding: no
    mask, is_causal=True), but while a CUDA graph is being captured it builds a mask tensor instead,
    and the masked attention backward is more than twice as slow. With this,
    eager and graphed steps run the same attention kernels. Only valid without padding.
    """
    import torch.nn.functional as F
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, scale=scaling, is_causal=True,
                                             enable_gqa=query.shape[1] != key.shape[1])
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register("lk_causal", attention)
    AttentionMaskInterface.register("lk_causal", lambda *args, **kwargs: None)
    return "lk_causal"


def build(shape: dict, layers: int | None, device: str, dtype: torch.dtype = torch.bfloat16, attn: str = "sdpa"):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = {k: v for k, v in shape.items() if k not in ("batch", "seq")}
    if layers is not None:
        cfg["num_hidden_layers"] = layers
    if attn == "causal":
        attn = register_causal_attention()
    config = LlamaConfig(**cfg, max_position_embeddings=4096, attn_implementation=attn)
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(prev)
    return model


def randomize_lora_B(model) -> None:
    # PEFT starts B at zero; timings on zeros can flatter a GEMM, so every LoRA case gets small random B.
    g = torch.Generator(device="cpu").manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.copy_(torch.randn(p.shape, generator=g) * 1e-3)


def prepare(case: str, model, r: int, alpha: float):
    """Set the model up for `case`; returns (model, trainable parameters, note)."""
    dora = case.endswith("-dora")
    case = case.removesuffix("-dora")
    if case == "full":
        return model, list(model.parameters()), ""
    if case == "floor":
        for p in model.parameters():
            p.requires_grad_(False)
        model.enable_input_require_grads()
        return model, [], ""
    if case.startswith("peft"):
        import peft

        targets = ["q_proj", "v_proj"] if case == "peft-qv" else "all-linear"
        p = 0.0 if case.endswith("-p0") else 0.05
        model = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=p,
                                                           target_modules=targets, use_dora=dora))
        randomize_lora_B(model)
        return model, [q for q in model.parameters() if q.requires_grad], \
            f"peft {peft.__version__}{' DoRA' if dora else ''}"
    if case.startswith("lorakit"):
        import lorakit as lk

        targets = ["q_proj", "v_proj"] if case == "lorakit-qv" else "all-linear"
        p = 0.0 if case.endswith("-p0") else 0.05
        for name in [f"r{i}" for i in range(ROUTED)] if "routed" in case else ["default"]:
            lk.inject(model, lk.LoraConfig(r=r, alpha=alpha, dropout=p, targets=targets, dora=dora), name=name)
        if case != "lorakit-unfused":
            lk.fuse(model)
        randomize_lora_B(model)
        return model, list(lk.trainable_parameters(model)), f"lk.inject{' DoRA' if dora else ''}"
    raise SystemExit(f"unknown case {case!r}; choose from {CASES}")


def saved_activation_bytes(model, ids) -> int:
    """Bytes of distinct non-parameter storages autograd keeps for backward in one forward (then freed)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t.detach()  # returning t itself would make a saved output keep its own graph alive (a leak)

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    del loss
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def profile_step(step, case: str, top: int = 18) -> None:
    """Print the GPU kernels of one step, by total time (where the milliseconds go)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA" or getattr(e, "self_device_time_total", 0)]
    total = sum(getattr(e, "self_device_time_total", 0) for e in events) / 1e3
    print(f"  -- {case}: GPU kernel time in one step {total:.1f} ms; top kernels:")
    events.sort(key=lambda e: -getattr(e, "self_device_time_total", 0))
    for e in events[:top]:
        t = getattr(e, "self_device_time_total", 0) / 1e3
        print(f"     {t:8.2f} ms {e.count:6d}x  {e.key[:90]}")


def cprofile_steps(step, case: str, steps: int = 3, top: int = 30) -> None:
    """Print where the CPU time of `steps` steps goes: Python functions and ATen calls by own time."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    prof.disable()
    print(f"  -- {case}: host time of {steps} steps by function (own time, cProfile)")
    pstats.Stats(prof).sort_stats("tottime").print_stats(top)


def run_case(case: str, args, shape: dict) -> dict:
    dev = args.device
    # What an earlier case left allocated would count in this case's peak. Its model can outlive it: lk.inject's
    # hooks make reference cycles, which only the collector frees, and a captured step keeps the model alive.
    gc.collect()
    if dev == "cuda":
        torch.cuda.empty_cache()
        left = torch.cuda.memory_allocated() / 2**30
        if left > 0.01:
            print(f"  (note: {left:.2f} GiB still allocated before {case}; it counts in its peak)", flush=True)
    model = build(shape, args.layers, dev, getattr(torch, args.dtype), args.attn)
    model, params, note = prepare(case, model, args.rank, args.alpha)
    model.train()
    if args.compile:
        model = torch.compile(model)
        note = (note + ", " if note else "") + "torch.compile"
    # capturable: the optimizer step can be part of a CUDA graph (--graphs); there the fused AdamW (the
    # capturable foreach form makes the graphed step slower)
    opt = torch.optim.AdamW(params, lr=1e-4, capturable=args.graphs, fused=args.graphs or None) if params else None
    g = torch.Generator(device="cpu").manual_seed(2)
    ids = torch.randint(0, shape["vocab_size"], (shape["batch"], shape["seq"]), generator=g).to(dev)
    routing = contextlib.ExitStack()
    if "routed" in case:  # every step (and its capture) runs with the batch rows dealt to the adapters
        import lorakit as lk

        routing.enter_context(lk.route(model, [f"r{i % ROUTED}" for i in range(shape["batch"])]))

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss

    cuda = dev == "cuda"
    if args.graphs:
        # The whole step (forward, backward, optimizer) as one CUDA graph, through lorakit's own helper
        # (it works on any model): no per-op CPU work on replay. The peak includes warm-up and capture.
        import lorakit as lk

        batch = {"input_ids": ids, "labels": ids}
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        graphed = lk.graphed_step(model, opt, batch, warmup=args.warmup)
        step = lambda: graphed(batch)  # noqa: E731
        note = (note + ", " if note else "") + "CUDA graph"
        saved = float("nan")
        for _ in range(2):
            step()
    else:
        for _ in range(args.warmup):
            step()
        saved = float("nan") if args.compile else saved_activation_bytes(model, ids)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
    times, host = [], []
    for _ in range(args.steps):
        if cuda:
            t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0.record()
            h0 = time.perf_counter()
            step()
            host.append((time.perf_counter() - h0) * 1e3)  # time to enqueue the step: ~step ms means CPU-bound
            t1.record()
            t1.synchronize()
            times.append(t0.elapsed_time(t1))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    if case in args.profile.split(","):
        try:
            profile_step(step, case, args.profile_top)
        except Exception as e:  # the profile is a diagnostic; keep the case's numbers regardless
            print(f"  -- profile of {case} failed: {type(e).__name__}: {e}")
    if case in args.cprofile.split(","):
        cprofile_steps(step, case)
    n_train = sum(p.numel() for p in params)
    routing.close()
    model = params = opt = ids = None
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return dict(case=case, ms=statistics.median(times), ms_min=min(times), ms_max=max(times), peak_gib=peak,
                saved_gib=saved / 2**30, host_ms=statistics.median(host) if host else float("nan"),
                trainable=n_train, note=note)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--layers", type=int, default=None, help="override the number of decoder layers")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    ap.add_argument("--compile", action="store_true", help="torch.compile every case's model (warm-up compiles)")
    ap.add_argument("--graphs", action="store_true",
                    help="capture each case's whole step as one CUDA graph and time its replays (CUDA)")
    ap.add_argument("--profile-top", type=int, default=18, help="how many kernels the profile lists")
    ap.add_argument("--cprofile", default="", help="comma-separated cases whose host time to break down (cProfile)")
    ap.add_argument("--attn", choices=["sdpa", "causal"], default="sdpa",
                    help="attention: transformers' sdpa, or SDPA with is_causal and no mask tensor (see "
                         "register_causal_attention; the same kernels eager and in a CUDA graph)")
    ap.add_argument("--profile", default="", help="comma-separated cases whose GPU kernels to list (CUDA)")
    ap.add_argument("--dora", action="store_true", help="also run each chosen peft/lorakit case as DoRA (<case>-dora)")
    args = ap.parse_args()
    if args.dora:
        args.cases = ",".join(c for case in args.cases.split(",")
                              for c in ([case, case + "-dora"] if case.startswith(("peft", "lorakit")) else [case]))
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    shape = dict(SHAPES[args.shape])
    if args.batch:
        shape["batch"] = args.batch
    if args.seq:
        shape["seq"] = args.seq

    import transformers

    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = "none"
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    layers = args.layers or shape["num_hidden_layers"]
    print(f"# bench_train: {gpu}, torch {torch.__version__}, triton {tv}, transformers {transformers.__version__}; "
          f"shape {args.shape} ({layers} layers), batch {shape['batch']}x{shape['seq']}, {args.dtype}, AdamW, "
          f"r={args.rank} alpha={args.alpha:g}, attention {args.attn}; median of {args.steps} steps after "
          f"{args.warmup} warm-up", flush=True)
    rows = []
    for case in args.cases.split(","):
        try:
            row = run_case(case, args, shape)
        except Exception as e:  # one broken case must not lose the others' numbers
            row = dict(case=case, ms=float("nan"), ms_min=float("nan"), ms_max=float("nan"), peak_gib=float("nan"),
                       saved_gib=float("nan"), host_ms=float("nan"), trainable=0,
                       note=f"FAILED: {type(e).__name__}: {str(e)[:120]}")
            gc.collect()
            if args.device == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
        print(f"  {row['case']:<18} {row['ms']:8.1f} ms  {row['peak_gib']:6.2f} GiB peak  "
              f"{row['saved_gib']:6.2f} GiB saved"
              f"  {row['note']}", flush=True)
    floor = next((r for r in rows if r["case"] == "floor"), None)
    print(f"\n{'case':<18} {'step ms':>8} {'(min-max)':>15} {'peak GiB':>9} {'ms/floor':>9} {'GiB/floor':>10} "
          f"{'saved GiB':>10} {'host ms':>8} {'trainable':>12}  note")
    for r in rows:
        rt = r["ms"] / floor["ms"] if floor else float("nan")
        rm = r["peak_gib"] / floor["peak_gib"] if floor else float("nan")
        print(f"{r['case']:<18} {r['ms']:8.1f} {r['ms_min']:7.1f}-{r['ms_max']:<7.1f} {r['peak_gib']:9.2f} {rt:9.3f} "
              f"{rm:10.3f} {r['saved_gib']:10.3f} {r['host_ms']:8.1f} {r['trainable']:12,d}  {r['note']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=gpu, torch=torch.__version__, triton=tv, transformers=transformers.__version__,
                           shape=args.shape, layers=layers, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
