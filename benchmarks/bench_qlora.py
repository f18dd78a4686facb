"""QLoRA: what does LoRA on a 4-bit (NF4) base cost, against the frozen 4-bit floor and PEFT + bitsandbytes?

A random-init Llama of bench_train's shapes is saved once, then loaded for every case the way users load a
quantized base: `from_pretrained(..., quantization_config=lorakit.quant.bnb_config("nf4"))` (NF4, double
quantization, bf16 compute; the embedding and lm_head stay bf16). Every case loads its own copy, so each peak
is its own. Batch and sequence as bench_train (1.1B: 8 x 1024), AdamW, LoRA r=16 alpha=32 on all linears.

  floor16    the same model loaded in bf16, nothing trains (the 16-bit frozen floor)
  floor4     nothing trains; forward + backward through the frozen 4-bit model (embedding output requires
             grad so the backward runs through every layer)
  lorakit4   lk.inject(model, LoraConfig(r=16, alpha=32, dropout=0.05, targets="all-linear"))
  lorakit4-graphed  the same, the whole step captured as one CUDA graph (`lk.graphed_step`)
  peft4      peft.get_peft_model with the same LoRA settings (PEFT's bitsandbytes layers)

and one decode row per case: eager `generate`, greedy, batch 1, ms per new token (the slope between 8 and 8 +
--new-tokens new tokens), since per-token cost is where a quantized base hurts most.

    PYTHONPATH=src python benchmarks/bench_qlora.py [--shape 1b|8b] [--layers N] [--cases floor4,lorakit4,peft4]
    PYTHONPATH=src python benchmarks/bench_qlora.py --tiny      # CPU smoke run (bitsandbytes NF4 on the CPU)
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time

import torch

from bench_train import SHAPES, build, randomize_lora_B

CASES = ["floor16", "floor4", "lorakit4", "peft4"]
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, batch=2, seq=32)


def load(path: str, device: str, quantize: bool = True):
    from transformers import AutoModelForCausalLM

    from lorakit.quant import bnb_config

    q = dict(quantization_config=bnb_config("nf4", torch.bfloat16)) if quantize else {}
    return AutoModelForCausalLM.from_pretrained(path, **q, dtype=torch.bfloat16, device_map=device)


def prepare(case: str, model, r: int, alpha: float):
    for p in model.parameters():
        p.requires_grad_(False)
    if case in ("floor4", "floor16"):
        model.enable_input_require_grads()
        return model, [], ""
    if case == "peft4":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.05,
                                                           target_modules="all-linear"))
        randomize_lora_B(model)
        return model, [q for q in model.parameters() if q.requires_grad], f"peft {peft.__version__}"
    if case.startswith("lorakit4"):
        import lorakit as lk

        lk.inject(model, lk.LoraConfig(r=r, alpha=alpha, dropout=0.05, targets="all-linear"))
        randomize_lora_B(model)
        return model, list(lk.trainable_parameters(model)), "lk.inject"
    raise SystemExit(f"unknown case {case!r}; choose from {CASES}")


def timed(fn, device: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def run_case(case: str, path: str, args, shape: dict) -> dict:
    dev = args.device
    gc.collect()
    if dev == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model, params, note = prepare(case, load(path, dev, case != "floor16"), args.rank, args.alpha)
    model.train()
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    g = torch.Generator(device="cpu").manual_seed(2)
    ids = torch.randint(0, shape["vocab_size"], (shape["batch"], shape["seq"]), generator=g).to(dev)

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    if case.endswith("-graphed"):  # forward, backward and AdamW as one CUDA graph (`lk.graphed_step`)
        import lorakit as lk

        opt = torch.optim.AdamW(params, lr=1e-4, capturable=True, fused=True)
        batch = {"input_ids": ids, "labels": ids}
        graphed = lk.graphed_step(model, opt, batch, warmup=args.warmup)
        step = lambda: graphed(batch)  # noqa: E731
    for _ in range(args.warmup):
        step()
    if dev == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = timed(step, dev, args.steps)
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else float("nan")

    model.eval()
    prompt = ids[:1, :16]

    def gen(k):
        with torch.no_grad():
            model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=k,
                           min_new_tokens=k, do_sample=False, pad_token_id=0)

    gen(4)
    short = statistics.median(timed(lambda: gen(8), dev, 3))
    long = statistics.median(timed(lambda: gen(8 + args.new_tokens), dev, 3))
    per_token = (long - short) / args.new_tokens
    model = params = opt = None
    gc.collect()
    return dict(case=case, ms=statistics.median(times), ms_min=min(times), peak_gib=peak,
                decode_ms=per_token, note=note)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--tiny", action="store_true", help="a 2-layer toy on the CPU: checks the script runs")
    args = ap.parse_args()
    args.device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    shape = TINY if args.tiny else dict(SHAPES[args.shape])
    if args.tiny:
        args.steps, args.warmup, args.new_tokens = 2, 1, 4
    import bitsandbytes
    import transformers

    dev_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"# {dev_name}; torch {torch.__version__}, transformers {transformers.__version__}, "
          f"bitsandbytes {bitsandbytes.__version__}; shape {'tiny' if args.tiny else args.shape}"
          f"{'' if args.layers is None else f' ({args.layers} layers)'}, batch {shape['batch']} x {shape['seq']}",
          flush=True)
    with tempfile.TemporaryDirectory(dir="/dev/shm" if args.device == "cuda" else None) as path:
        base = build(shape, args.layers, "cpu", torch.bfloat16)
        base.save_pretrained(path)
        del base
        rows = []
        for case in args.cases.split(","):
            row = run_case(case, path, args, shape)
            rows.append(row)
            print(f"{case:10s} step {row['ms']:9.1f} ms (min {row['ms_min']:.1f})  peak {row['peak_gib']:6.2f} GiB  "
                  f"decode {row['decode_ms']:7.2f} ms/token  {row['note']}", flush=True)
    by = {r["case"]: r for r in rows}
    if "floor4" in by:
        f = by["floor4"]
        for r in rows:
            if r is not f:
                print(f"{r['case']:10s} / floor4: step {r['ms'] / f['ms']:.3f}x  "
                      f"peak {r['peak_gib'] / f['peak_gib']:.3f}x  decode {r['decode_ms'] / f['decode_ms']:.3f}x")
    if "floor16" in by:
        for r in rows:
            if r["case"] != "floor16":
                print(f"{r['case']:10s} / floor16: step {r['ms'] / by['floor16']['ms']:.3f}x")
    if "lorakit4" in by and "peft4" in by:
        print(f"peft4 / lorakit4 step time: {by['peft4']['ms'] / by['lorakit4']['ms']:.2f}x")


if __name__ == "__main__":
    main()
