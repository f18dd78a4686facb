"""Does LoRA on mixture-of-experts weights cost what the frozen model costs? Step time and peak memory.

A Qwen3-30B-A3B-shaped stack with fewer layers and a smaller vocabulary (the expert shapes are the
model's: hidden 2048, 128 experts, moe_intermediate 768, top-8 routing; attention 32/4 heads of 128),
random init, bf16, LoRA r=16 alpha=32 on every layer's `mlp.experts.gate_up_proj` and `down_proj`
(PEFT's `target_parameters`). All cases run in one process on the same weights and batch:

  floor         nothing trains; forward + backward through the frozen model (the embedding output
                requires grad so that the backward runs through every layer)
  peft          PEFT 0.22 `target_parameters` (W + dW by parametrization), AdamW
  lorakit-ref   lk.inject(target_parameters=...), the reference path (lk.set_fast_path("off")): the
                experts module's own forward on W + dW
  lorakit       the same adapters on the grouped path (lk.set_fast_path("on")): per expert group
                x_e @ W_e^T + s * (x_e @ A_e^T) @ B_e^T, no dense dW

transformers' experts run their "grouped_mm" implementation in every case.

    PYTHONPATH=src python benchmarks/bench_moe.py [--layers 4] [--batch 8] [--seq 1024] [--cases floor,lorakit]
    PYTHONPATH=src python benchmarks/bench_moe.py --tiny      # a small CPU smoke run of every case
    PYTHONPATH=src python benchmarks/bench_moe.py --check [--tiny]   # grouped vs reference: loss, gradients;
                                                                       # and (CUDA) the step as one CUDA graph
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch

CASES = ["floor", "peft", "lorakit-ref", "lorakit"]
TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def build(args, device, dtype):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    if args.tiny:
        shape = dict(hidden_size=64, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=256)
    else:
        shape = dict(hidden_size=2048, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                     num_attention_heads=32, num_key_value_heads=4, head_dim=128, vocab_size=args.vocab)
    config = Qwen3MoeConfig(**shape, intermediate_size=6144, num_hidden_layers=args.layers, decoder_sparse_step=1,
                            max_position_embeddings=max(args.seq, 64), tie_word_embeddings=False)
    config._experts_implementation = "grouped_mm"
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3MoeForCausalLM(config).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model


def prepare(case: str, model, r: int):
    """The model for `case` and the parameters AdamW trains."""
    import lorakit as lk

    if case == "floor":
        model.requires_grad_(False)
        model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_(True))
        return model, []
    if case == "peft":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=2 * r, target_parameters=TARGETS))
    else:
        lk.inject(model, lk.LoraConfig(r=r, alpha=2 * r, target_parameters=TARGETS))
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():  # a non-zero B, so that the update is really computed
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_B" in name:
                p.normal_(0, 0.01)
    return model, params


def run_case(case: str, args, device, dtype) -> dict:
    import lorakit as lk

    model, params = prepare(case, build(args, device, dtype), args.r)
    model.train()
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    vocab = model.config.vocab_size if hasattr(model, "config") else 256
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1)).to(device)
    lk.set_fast_path("on" if case == "lorakit" else "off")

    def step():
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    try:
        for _ in range(args.warmup):
            step()
        sync()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            step()
            sync()
            times.append((time.perf_counter() - t0) * 1e3)
    finally:
        lk.set_fast_path("auto")
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    explained = ""
    if case.startswith("lorakit"):
        block = next(m for m in model.modules() if type(m).__name__ == "LoraExperts")
        lk.set_fast_path("on" if case == "lorakit" else "off")
        explained = block.explain(torch.empty(1, 1, device=device, dtype=dtype)).split(":")[0]
        lk.set_fast_path("auto")
    model = opt = params = step = None  # free this case's memory before the next
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"ms": statistics.median(times), "peak": peak, "path": explained}


def check(args, device, dtype) -> None:
    """The grouped path against the reference on one batch: loss and every adapter gradient, then (CUDA) the
    grouped step captured by lk.graphed_step."""
    import lorakit as lk

    model, params = prepare("lorakit", build(args, device, dtype), args.r)
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq),
                        generator=torch.Generator().manual_seed(1)).to(device)
    got = {}
    for mode in ("off", "on"):
        lk.set_fast_path(mode)
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        got[mode] = (loss.item(), [p.grad.float().clone() for p in params])
    worst = max(float((a - b).norm() / a.norm().clamp_min(1e-30)) for a, b in zip(got["off"][1], got["on"][1]))
    print(f"loss reference {got['off'][0]:.6f} grouped {got['on'][0]:.6f}; worst relative gradient error {worst:.2e}")
    if device.type == "cuda":
        opt = torch.optim.AdamW(params, lr=1e-4, capturable=True)
        batch = {"input_ids": ids, "labels": ids}
        try:
            step = lk.graphed_step(model, opt, batch)
            print("graphed step losses", [round(step(batch).item(), 5) for _ in range(3)])
        except lk.LoraError as exc:
            print(f"graphed step refused: {exc}")
    lk.set_fast_path("auto")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--tiny", action="store_true", help="a small model on the CPU (float32): a smoke test")
    ap.add_argument("--check", action="store_true", help="compare the grouped path with the reference instead")
    args = ap.parse_args()
    if args.tiny:
        args.layers, args.batch, args.seq, args.steps, args.warmup = 2, 2, 16, 2, 1
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    import peft
    import transformers

    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"# device {name}, {dtype}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"peft {peft.__version__}; {args.layers} layers, batch {args.batch} x {args.seq}, r={args.r}")
    if args.check:
        return check(args, device, dtype)
    results = {}
    for case in args.cases.split(","):
        results[case] = run_case(case, args, device, dtype)
    floor = results.get("floor", {}).get("ms")
    peft_ms = results.get("peft", {}).get("ms")
    print("| case | step ms | peak GiB | x floor | PEFT ms / ms | path |")
    print("|---|---|---|---|---|---|")
    for case, r in results.items():
        xf = f"{r['ms'] / floor:.2f}" if floor else "-"
        xp = f"{peft_ms / r['ms']:.2f}" if peft_ms else "-"
        print(f"| {case} | {r['ms']:.1f} | {r['peak']:.2f} | {xf} | {xp} | {r['path']} |")


if __name__ == "__main__":
    main()
