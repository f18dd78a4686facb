"""What does an unmerged adapter cost in eager `model.generate` (transformers' own loop, no CUDA graphs)?

The 1.1B Llama shape of bench_train.py (random weights, bf16), once as the base model and once with
LoRA r=16 alpha=32 on all 7 linears (random B). Greedy decoding of a 16-token prompt. ms per new token:
the slope between calls of 16 and 48 new tokens, from the fastest of 5 calls of each (and from their
medians). Three cases side by side, in rounds:

  base          the model without adapters
  lora          lk.inject; an adapted linear repeats the launch it worked out on the first token
                (`_triton.SmallPlan`)
  lora-noplan   the same model with the plans turned off: every call goes through `lora_linear`

Then (unless --quick) a cProfile of one call of 32 tokens for base and lora, and the host µs of one
call of q_proj at one row: nn.Linear, the adapted layer, `lora_linear`, `_triton.lora_small`.

    PYTHONPATH=src:benchmarks python3 benchmarks/diag_eager_generate.py [--batch 1] [--rounds 2] [--quick]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time

import torch

import lorakit as lk
import lorakit.kernels as K
from bench_train import SHAPES, build
from diag_host import host_us


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="only the timings, no profile")
    args = ap.parse_args()

    shape = SHAPES["1b"]
    base = build(shape, None, "cuda").eval()
    lora = build(shape, None, "cuda").eval()
    lk.inject(lora, lk.LoraConfig(r=16, alpha=32, targets="all-linear"))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    ids = torch.randint(0, shape["vocab_size"], (args.batch, 16), device="cuda")
    mask = torch.ones_like(ids)

    def generate(model, n):
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=0)

    real_plan = K.decode_plan

    def plans(on: bool) -> None:
        K.decode_plan = real_plan if on else (lambda *a: None)
        for module in lora.modules():
            module.__dict__.pop("_small_plan", None)

    print(f"# eager generate, 1.1B shape, bf16, batch {args.batch}, {torch.cuda.get_device_name()}, "
          f"torch {torch.__version__}", flush=True)
    slopes: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for name, model in (("base", base), ("lora", lora), ("lora-noplan", lora)):
            plans(name != "lora-noplan")
            generate(model, 8)
            torch.cuda.synchronize()
            ts = {16: [], 48: []}
            for _ in range(5):
                for n in (16, 48):
                    t0 = time.perf_counter()
                    generate(model, n)
                    torch.cuda.synchronize()
                    ts[n].append(time.perf_counter() - t0)
            fast = (min(ts[48]) - min(ts[16])) / 32 * 1e3
            med = (statistics.median(ts[48]) - statistics.median(ts[16])) / 32 * 1e3
            slopes.setdefault(name, []).append(fast)
            print(f"  {name:<12} {fast:6.2f} ms/token (fastest calls), {med:6.2f} (medians); 48 tokens: "
                  f"fastest {min(ts[48]) * 1e3:.1f} ms, median {statistics.median(ts[48]) * 1e3:.1f} ms", flush=True)
    plans(True)
    for name in ("lora", "lora-noplan"):
        print(f"  {name} / base per round: {[round(x / b, 3) for b, x in zip(slopes['base'], slopes[name])]}")
    if args.quick:
        return

    for name, model in (("base", base), ("lora", lora)):
        prof = cProfile.Profile()
        prof.enable()
        generate(model, 32)
        torch.cuda.synchronize()
        prof.disable()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(25)
        print(f"== {name}, cProfile of one call of 32 tokens, by tottime\n{out.getvalue()}")

    q, qb = lora.model.layers[0].self_attn.q_proj, base.model.layers[0].self_attn.q_proj
    a = q.adapters["default"]
    x = torch.randn(1, 1, shape["hidden_size"], device="cuda", dtype=torch.bfloat16)

    calls = {
        "nn.Linear (base)": lambda: qb(x),
        "LoraLinear (plan)": lambda: q(x),
        "lora_linear": lambda: K.lora_linear(x, q.weight, None, a.lora_A, a.lora_B, a.scale),
        "_triton.lora_small": lambda: K._triton.lora_small(x.view(1, -1), q.weight, None, a.lora_A, a.lora_B, a.scale),
    }
    with torch.no_grad():
        for label, fn in calls.items():
            print(f"  {label:<20} {min(host_us(fn, 2000) for _ in range(3)):7.2f} us of host time a call", flush=True)


if __name__ == "__main__":
    main()
