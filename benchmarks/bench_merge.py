"""How long does merging / unmerging every adapter take, and is unmerge exact? lorakit vs PEFT.

    python benchmarks/bench_merge.py                 # 8B Llama shape on the GPU, bf16, r=16 all-linear
    python benchmarks/bench_merge.py --shape tiny    # a quick CPU check of the script itself

Prints one table: ms per merge-all and unmerge-all (median of --repeats, after one warm-up
cycle), and the max |W - W0| after the cycles (0 means bit-exact).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import transformers

import lorakit as lk

SHAPES = {
    "8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=14336, vocab_size=128256),
    "1b": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
               intermediate_size=5632, vocab_size=32000),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=1000),
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - t) * 1e3


def build(shape: str, device, dtype):
    cfg = transformers.LlamaConfig(**SHAPES[shape])
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    return model.eval()


def linear_weights(model):
    return {n: m.weight for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, lk.layers.LoraLinear))
            and not n.endswith("lm_head")}


def max_drift(model, snapshot) -> float:
    worst = 0.0
    for n, w in linear_weights(model).items():
        worst = max(worst, float((w.float() - snapshot[n].float()).abs().max()))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="8b", choices=sorted(SHAPES))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cycles", type=int, default=50, help="merge/unmerge cycles before the drift check")
    ap.add_argument("--no-peft", action="store_true")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16
    torch.manual_seed(0)
    model = build(args.shape, device, dtype)
    snapshot = {n: w.detach().clone() for n, w in linear_weights(model).items()}
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}, transformers {transformers.__version__}, shape {args.shape}, "
          f"{dtype}, LoRA r=16 alpha=32 all-linear ({len(snapshot)} linears)")
    rows = []

    lk.inject(model, lk.LoraConfig(r=16, alpha=32, targets="all-linear"))
    with torch.no_grad():
        for _, layer in lk.lora_layers(model):
            layer.adapters["default"].lora_B.normal_(std=0.02)
    lk.merge(model)
    lk.unmerge(model)  # warm-up (cuBLAS handles, allocator)
    merges, unmerges = [], []
    for _ in range(args.repeats):
        merges.append(timed(lambda: lk.merge(model), device))
        unmerges.append(timed(lambda: lk.unmerge(model), device))
    for _ in range(args.cycles):
        lk.merge(model)
        lk.unmerge(model)
    exact = all(torch.equal(w.view(torch.int16), snapshot[n].view(torch.int16))
                for n, w in linear_weights(model).items())
    rows.append(("lorakit", statistics.median(merges), statistics.median(unmerges), max_drift(model, snapshot), exact))
    lk.eject(model, merge=False)

    if not args.no_peft:
        import peft
        pm = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.normal_(std=0.02)
        base = pm.base_model
        base.merge_adapter()
        base.unmerge_adapter()
        merges, unmerges = [], []
        for _ in range(args.repeats):
            merges.append(timed(base.merge_adapter, device))
            unmerges.append(timed(base.unmerge_adapter, device))
        for _ in range(args.cycles):
            base.merge_adapter()
            base.unmerge_adapter()
        weights = {n.replace("base_model.model.", "").replace(".base_layer", ""): m.weight
                   for n, m in pm.named_modules() if isinstance(m, torch.nn.Linear) and "lora_" not in n
                   and not n.endswith("lm_head")}
        drift = max(float((w.float() - snapshot[n].float()).abs().max()) for n, w in weights.items() if n in snapshot)
        rows.append((f"PEFT {peft.__version__}", statistics.median(merges), statistics.median(unmerges), drift,
                     drift == 0.0))

    cycles = args.repeats + args.cycles + 1
    print(f"\n| library | merge all (ms) | unmerge all (ms) | max abs drift after {cycles} cycles | bit-exact |")
    print("|---|---|---|---|---|")
    for lib, m, u, d, e in rows:
        print(f"| {lib} | {m:.1f} | {u:.1f} | {d:.3g} | {'yes' if e else 'no'} |")


if __name__ == "__main__":
    main()
