"""What does an unmerged adapter cost in eager `model.generate` (transformers' own loop, no CUDA graphs)?

The 1.1B Llama shape of bench_train.py (random weights, bf16), once as the base model and once with
LoRA r=16 alpha=32 on all 7 linears (random B). Greedy decoding of a 16-token prompt. ms per new token:
the slope between calls of 16 and 48 new tokens, from the fastest of 5 calls of each (and from their
medians). Three cases side by side, in rounds:

  base          the model without adapters
  lora          lk.inject; an adapted linear repeats the launch it worked out on the first token
                (`_triton.SmallPlan`)
  lora-groups   the same with `lorakit.fusion.DECODE_GROUPS` on: q/k/v and gate/up each in one launch
                (`_triton.lora_small_group`), repeated from a `SmallGroupPlan`
  lora-noplan   the same model with the plans turned off: every call goes through `lora_linear`

With --forward, instead: host ms of one decode forward (one new token per row, a DynamicCache, no
`generate` around it; median of 64 calls, no sync between them), in rounds, for base, base with
lorakit.fusion's RMSNorm / MLP forwards installed, lora, lora-groups, lora inside `lk.disabled`, and lora
without lorakit.fusion (no producers, no sibling groups): where the host time of an adapted model goes.

Then (unless --quick) a cProfile of one call of 32 tokens for base and lora, and the host µs of one
call of q_proj at one row: nn.Linear, the adapted layer, `lora_linear`, `_triton.lora_small`.

    PYTHONPATH=src:benchmarks python3 benchmarks/diag_eager_generate.py [--batch 1] [--rounds 2] [--quick] [--forward]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import pstats
import statistics
import time

import torch

import lorakit as lk
import lorakit.kernels as K
from lorakit import fusion
from bench_train import SHAPES, build
from diag_host import host_us


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="only the timings, no profile")
    ap.add_argument("--forward", action="store_true", help="host time of one decode forward, by variant")
    args = ap.parse_args()
    if args.forward:
        forward_split(args.batch, args.rounds)
        return

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
        for name, model in (("base", base), ("lora", lora), ("lora-groups", lora), ("lora-noplan", lora)):
            plans(name != "lora-noplan")
            fusion.DECODE_GROUPS = name == "lora-groups"
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
    fusion.DECODE_GROUPS = False
    for name in ("lora", "lora-groups", "lora-noplan"):
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


def forward_split(batch: int, rounds: int) -> None:
    shape = SHAPES["1b"]
    base = build(shape, None, "cuda").eval()
    with_producers = build(shape, None, "cuda").eval()
    fusion.install_producers(with_producers)
    lora, bare = build(shape, None, "cuda").eval(), build(shape, None, "cuda").eval()
    for model in (lora, bare):
        lk.inject(model, lk.LoraConfig(r=16, alpha=32, targets="all-linear"))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.01)
    fusion.remove_producers(bare)
    fusion.ungroup(bare)
    ids = torch.randint(0, shape["vocab_size"], (batch, 16), device="cuda")
    variants = {"base": (base, None), "base+producers": (with_producers, None), "lora": (lora, None),
                "lora-groups": (lora, "groups"), "lora disabled": (lora, "disabled"), "lora no fusion": (bare, None)}

    @torch.no_grad()
    def run(model, steps):
        from transformers import DynamicCache

        cache = DynamicCache()
        nxt = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        host = []
        for _ in range(steps):
            t = time.perf_counter()
            nxt = model(input_ids=nxt, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
            host.append(time.perf_counter() - t)
        torch.cuda.synchronize()
        return statistics.median(host) * 1e3

    print(f"# one decode forward, 1.1B shape, bf16, batch {batch}, {torch.cuda.get_device_name()}, "
          f"torch {torch.__version__}: host ms (median of 64 calls) per round", flush=True)
    res: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for name, (model, how) in variants.items():
            fusion.DECODE_GROUPS = how == "groups"
            with lk.disabled(model) if how == "disabled" else contextlib.nullcontext():
                run(model, 8)
                res[name].append(run(model, 64))
    fusion.DECODE_GROUPS = False
    for name, hs in res.items():
        ratios = [h / b for h, b in zip(hs, res["base"])]
        print(f"  {name:<16} {[round(h, 2) for h in hs]}  / base per round {[round(r, 3) for r in ratios]}, "
              f"median {statistics.median(ratios):.3f}", flush=True)


if __name__ == "__main__":
    main()
