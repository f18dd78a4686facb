"""What does an unmerged adapter, or a batch mixing adapters per example, cost at inference?

Same random-init Llama-shaped model as bench_train.py (bf16, no grad). Cases:
  forward, batch 8 x 1024: base; kernels-only unmerged adapter (lora_linear on all 7 linears);
      4 adapters mixed per example (lora_linear_routed); PEFT unmerged; PEFT 4 mixed (adapter_names)
  forward, batch 32 x 256: base; 32 adapters mixed, one per example (routed); PEFT 32 mixed
  decode with generate (KV cache, 64 new tokens), batch 1 and 32: base; unmerged; 32 mixed (batch 32)
  lorakit: the same through lorakit's own layers: lk.inject (32 adapters, one active), lk.route

    PYTHONPATH=src python benchmarks/bench_infer.py [--layers 22] [--no-peft] [--no-decode]
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import time

import torch
from torch import Tensor, nn

from lorakit.fast.ops import lora_linear
from lorakit.fast.routed import lora_linear_routed, stack_adapters
from bench_train import SHAPES, build

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class InferLora(nn.Module):
    """Kernels-only inference stand-in: n adapters on one linear, one active or routed per batch row."""

    def __init__(self, base: nn.Linear, n: int, r: int, alpha: float, gen: torch.Generator) -> None:
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        out_f, in_f = self.weight.shape
        dev, dt = self.weight.device, self.weight.dtype
        As = [(torch.rand(r, in_f, generator=gen) * 2 - 1) / math.sqrt(in_f) for _ in range(n)]
        Bs = [torch.randn(out_f, r, generator=gen) * 1e-2 for _ in range(n)]
        self.As = [A.to(dev, dt) for A in As]
        self.Bs = [B.to(dev, dt) for B in Bs]
        # Stacked once, as a serving layer would keep them.
        self.A_stack, self.B_stack = stack_adapters(self.As, self.Bs)
        self.scales = torch.full((n,), alpha / r, device=dev)
        self.scale = alpha / r
        self.rows: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.rows is None:
            return lora_linear(x, self.weight, self.bias, self.As[0], self.Bs[0], self.scale)
        rows = self.rows
        if x.shape[0] != rows.shape[0]:
            raise RuntimeError("routed batch size changed")
        return lora_linear_routed(x, self.weight, self.bias, self.A_stack, self.B_stack, self.scales, rows)


def swap(model: nn.Module, n: int, r: int, alpha: float) -> list[InferLora]:
    gen = torch.Generator().manual_seed(3)
    mods = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and name in TARGETS:
                m = InferLora(child, n, r, alpha, gen)
                setattr(parent, name, m)
                mods.append(m)
    return mods


def set_rows(mods: list[InferLora], rows: Tensor | None) -> None:
    for m in mods:
        m.rows = rows


def time_fn(fn, device: str, reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        if device == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def decode_ms(model, ids: Tensor, new: int, device: str, reps: int) -> float:
    def gen():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                       do_sample=False, pad_token_id=0)
    return time_fn(gen, device, reps, warmup=1) / new


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--no-peft", action="store_true")
    ap.add_argument("--no-decode", action="store_true")
    ap.add_argument("--no-lorakit", action="store_true", help="skip the lk.inject / lk.route cases")
    ap.add_argument("--dtype", default=None, help="default bfloat16 on CUDA, float32 on CPU")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    dev = args.device
    shape = SHAPES["1b"]
    import transformers

    print(f"# bench_infer: {torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}; {dtype}, no grad, r=16 alpha=32, median of {args.reps}",
          flush=True)
    rows = []

    def report(name, ms, base):
        rows.append((name, ms, ms / base if base else float("nan")))
        print(f"  {name:<44} {ms:9.2f} ms  {ms / base if base else float('nan'):6.2f}x base", flush=True)

    def fwd8_of(m):
        return lambda: m(input_ids=ids8)

    g = torch.Generator().manual_seed(4)
    vocab = shape["vocab_size"]
    ids8 = torch.randint(0, vocab, (8, args.seq), generator=g).to(dev)
    ids32 = torch.randint(0, vocab, (32, args.seq // 4), generator=g).to(dev)

    # -- kernels only ------------------------------------------------------------------------------------
    model = build(shape, args.layers, dev, dtype).eval()
    with torch.no_grad():
        fwd8 = lambda: model(input_ids=ids8)  # noqa: E731
        fwd32 = lambda: model(input_ids=ids32)  # noqa: E731
        base8 = time_fn(fwd8, dev, args.reps)
        report(f"forward 8x{args.seq} base", base8, base8)
        base32 = time_fn(fwd32, dev, args.reps)
        report(f"forward 32x{args.seq // 4} base", base32, base32)
        if not args.no_decode:
            dec1 = decode_ms(model, ids8[:1, :16], args.new_tokens, dev, 3)
            report("decode batch 1 base (ms/token)", dec1, dec1)
            dec32 = decode_ms(model, ids32[:, :16], args.new_tokens, dev, 3)
            report("decode batch 32 base (ms/token)", dec32, dec32)
        mods = swap(model, 32, 16, 32)
        report(f"forward 8x{args.seq} kernels unmerged (1 adapter)", time_fn(fwd8, dev, args.reps), base8)
        set_rows(mods, torch.tensor([0, 1, 2, 3, 0, 1, 2, 3], device=dev))
        report(f"forward 8x{args.seq} kernels routed, 4 adapters", time_fn(fwd8, dev, args.reps), base8)
        set_rows(mods, torch.tensor([0, 1, -1, 3, 0, -1, 2, 3], device=dev))
        report(f"forward 8x{args.seq} kernels routed, 4 + base rows", time_fn(fwd8, dev, args.reps), base8)
        set_rows(mods, torch.arange(32, device=dev))
        report(f"forward 32x{args.seq // 4} kernels routed, 32 adapters", time_fn(fwd32, dev, args.reps), base32)
        if not args.no_decode:
            set_rows(mods, None)
            report("decode batch 1 kernels unmerged (ms/token)",
                   decode_ms(model, ids8[:1, :16], args.new_tokens, dev, 3), dec1)
            report("decode batch 32 kernels unmerged (ms/token)",
                   decode_ms(model, ids32[:, :16], args.new_tokens, dev, 3), dec32)
            set_rows(mods, torch.arange(32, device=dev))
            report("decode batch 32 kernels routed, 32 adapters",
                   decode_ms(model, ids32[:, :16], args.new_tokens, dev, 3), dec32)
    del model, mods
    gc.collect()
    if dev == "cuda":
        torch.cuda.empty_cache()

    # -- lorakit's layers (lk.inject, lk.route) ------------------------------------------------------------
    if not args.no_lorakit:
        import lorakit as lk

        model = build(shape, args.layers, dev, dtype).eval()
        names = [f"a{i}" for i in range(32)]
        for n in names:
            lk.inject(model, lk.LoraConfig(r=16, alpha=32, targets="all-linear"), name=n)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 1e-2)
        lk.set_adapter(model, "a0")
        with torch.no_grad():
            report(f"forward 8x{args.seq} lorakit unmerged (1 adapter)", time_fn(fwd8_of(model), dev, args.reps), base8)
            if not args.no_decode:
                report("decode batch 1 lorakit unmerged (ms/token)",
                       decode_ms(model, ids8[:1, :16], args.new_tokens, dev, 3), dec1)
                report("decode batch 32 lorakit unmerged (ms/token)",
                       decode_ms(model, ids32[:, :16], args.new_tokens, dev, 3), dec32)
            with lk.route(model, [names[i % 4] for i in range(8)]):
                report(f"forward 8x{args.seq} lorakit route, 4 adapters", time_fn(fwd8_of(model), dev, args.reps),
                       base8)
            with lk.route(model, names):
                report(f"forward 32x{args.seq // 4} lorakit route, 32 adapters",
                       time_fn(lambda: model(input_ids=ids32), dev, args.reps), base32)
            lk.merge(model, "a0")
            report(f"forward 8x{args.seq} lorakit merged", time_fn(fwd8_of(model), dev, args.reps), base8)
        del model
        gc.collect()
        if dev == "cuda":
            torch.cuda.empty_cache()

    # -- PEFT ------------------------------------------------------------------------------------------
    if not args.no_peft:
        import peft

        model = build(shape, args.layers, dev, dtype).eval()
        names = [f"a{i}" for i in range(32)]
        model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"),
                                    adapter_name=names[0])
        model.eval()
        for n in names[1:4]:
            model.add_adapter(n, peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 1e-2)
            report(f"forward 8x{args.seq} PEFT unmerged (1 adapter)",
                   time_fn(lambda: model(input_ids=ids8), dev, args.reps),
                   base8)
            mix = [names[i % 4] for i in range(8)]
            report(f"forward 8x{args.seq} PEFT 4 adapters mixed",
                   time_fn(lambda: model(input_ids=ids8, adapter_names=mix), dev, max(3, args.reps // 3)), base8)
        for n in names[4:]:
            model.add_adapter(n, peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
        model.eval()
        with torch.no_grad():
            report(f"forward 32x{args.seq // 4} PEFT 32 adapters mixed",
                   time_fn(lambda: model(input_ids=ids32, adapter_names=names), dev, 3), base32)
        del model
    print(f"\n{'case':<46} {'ms':>9} {'x base':>7}")
    for name, ms, ratio in rows:
        print(f"{name:<46} {ms:9.2f} {ratio:7.2f}")


if __name__ == "__main__":
    main()
