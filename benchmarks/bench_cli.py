"""`lorakit train` end to end on one GPU: eager steps (`--cuda-graphs off`) against CUDA graphs, same model, data, seed.

A random-init Llama of the chosen shape with the GPT-2 tokenizer is saved to a temporary
directory (the GPU machines have no model files), then the CLI's own loop (`lorakit.train.run`)
trains LoRA (r=16, alpha=32, dropout 0.05, all linears) on E2E NLG (`../shared/data/e2e`, or
$LORAKIT_SHARED_DATA/e2e) for --steps steps, once eagerly and once with CUDA graphs (the default on one
GPU; forced on here), after a short eager run that compiles the Triton kernels. One table: median ms per
step over the second half of the run, the fastest step, the loop's whole time (captures included),
tokens/s, peak GiB, and the mean logged loss of the second half of each run.

`--generate N` times the other half of the CLI instead: `generate_texts` (what `lorakit eval` and the
in-training evaluation run) on the first N distinct E2E meaning representations, 64 new tokens, batches of
64, through `model.generate` (`cuda_graphs="off"`) and through `lk.Decoder` (the default on a GPU),
with an unmerged adapter (small random B) on the model; each twice (the first call compiles and
captures), and the share of texts on which the two agree.

    PYTHONPATH=src python benchmarks/bench_cli.py [--shape smollm2|1b] [--steps 80] [--batch-size 16]
                                                 [--grad-accum 1] [--gradient-checkpointing] [--log]
    PYTHONPATH=src python benchmarks/bench_cli.py --generate 512 [--shape smollm2|1b]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

SHAPES = {  # hidden, layers, heads, kv heads, MLP
    "smollm2": (576, 30, 9, 3, 1536),  # SmolLM2-135M
    "1b": (2048, 22, 32, 4, 5632),     # the DESIGN.md 1.1B Llama
}


def shared_data() -> Path:
    return Path(os.environ.get("LORAKIT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def build_model(shape: str, path: Path) -> Path:
    from transformers import GPT2TokenizerFast, LlamaConfig, LlamaForCausalLM

    tok = GPT2TokenizerFast(tokenizer_file=str(shared_data() / "gpt2-tokenizer" / "tokenizer.json"))
    tok.pad_token = tok.eos_token
    hidden, layers, heads, kv, mlp = SHAPES[shape]
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=2048,
                      bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id,
                      tie_word_embeddings=shape == "smollm2")
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def train(model_dir: Path, out: Path, steps: int, batch_size: int, graphs: bool, log=None, grad_accum: int = 1,
          ckpt: bool = False) -> dict:
    from lorakit import LoraConfig
    from lorakit.data import DataConfig
    from lorakit.train import RunConfig, TrainConfig, run

    cfg = RunConfig(
        train=TrainConfig(model=str(model_dir), train_file=str(shared_data() / "e2e" / "trainset.csv.gz"),
                          output_dir=str(out), max_steps=steps, batch_size=batch_size, grad_accum=grad_accum,
                          log_every=1,
                          gradient_checkpointing=ckpt,
                          eval_generate=False, cuda_graphs="on" if graphs else "off", lr=2e-4),
        data=DataConfig(max_length=256),
        lora=LoraConfig(r=16, alpha=32, dropout=0.05, targets="all-linear"))
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    summary = run(cfg, log=log or (lambda *a, **k: None))
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_events = [e for e in events if e["event"] == "train"]
    seconds = [e["seconds"] for e in train_events]
    half = len(seconds) // 2
    step_ms = [1e3 * (b - a) for a, b in zip(seconds[half - 1:], seconds[half:])]
    losses = [e["loss"] for e in train_events]
    return {"ms": statistics.median(step_ms), "min_ms": min(step_ms), "loop_s": summary["train_seconds"],
            "tok_s": train_events[-1]["tokens_per_s"], "peak": torch.cuda.max_memory_allocated() / 2**30,
            "loss": statistics.mean(losses[half:]), "first_loss": losses[0]}


def generate(model_dir: Path, n: int, shape: str) -> None:
    import csv
    import gzip
    import time

    import lorakit as lk
    from lorakit.models import load_model
    from lorakit.train import generate_texts

    with gzip.open(shared_data() / "e2e" / "trainset.csv.gz", "rt", encoding="utf-8") as f:
        mrs = list(dict.fromkeys(r["mr"] for r in csv.DictReader(f)))[:n]
    prompts = [mr + "\n" for mr in mrs]
    model, tok = load_model(model_dir)
    lk.inject(model, lk.LoraConfig(r=16, alpha=32, targets="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1e-2)
    model.to("cuda")
    texts, rows = {}, []
    for mode in ("off", "auto"):
        for call in ("first", "second"):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            texts[mode] = generate_texts(model, tok, prompts, 64, batch_size=64, cuda_graphs=mode)
            torch.cuda.synchronize()
            rows.append((mode, call, time.perf_counter() - t0))
    agree = sum(a == b for a, b in zip(texts["off"], texts["auto"])) / len(prompts)
    print(f"\ngenerate_texts, {shape} shape (random init, {next(model.parameters()).dtype}), unmerged adapter r=16 "
          f"on all linears, {len(prompts)} E2E prompts, 64 new tokens, batches of 64, {torch.cuda.get_device_name()}, "
          f"torch {torch.__version__}")
    print("| decoding | call | seconds | prompts/s |")
    print("|---|---|---|---|")
    for mode, call, sec in rows:
        name = "model.generate (cuda_graphs off)" if mode == "off" else "lk.Decoder (default)"
        print(f"| {name} | {call} | {sec:.2f} | {len(prompts) / sec:.1f} |")
    print(f"second calls, generate / decoder: {rows[1][2] / rows[3][2]:.2f}x; texts that agree: {agree:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--log", action="store_true", help="print the CLI's log of the CUDA-graphs run")
    ap.add_argument("--generate", type=int, metavar="N", help="time generate_texts on N E2E prompts instead")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_cli.py needs a CUDA GPU.")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(args.shape, Path(tmp) / "model")
        if args.generate:
            generate(model_dir, args.generate, args.shape)
            return
        train(model_dir, Path(tmp) / "warmup", 4, args.batch_size, graphs=False)  # compile the kernels
        rows = {name: train(model_dir, Path(tmp) / name, args.steps, args.batch_size, graphs=name == "cuda-graphs",
                            log=print if args.log and name == "cuda-graphs" else None, grad_accum=args.grad_accum,
                            ckpt=args.gradient_checkpointing)
                for name in ("eager", "cuda-graphs")}
    print(f"\nlorakit train, {args.shape} shape (random init), E2E NLG, batch {args.batch_size} x grad_accum "
          f"{args.grad_accum}{', gradient checkpointing' if args.gradient_checkpointing else ''}, {args.steps} steps, "
          f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| run | ms / step (median, 2nd half) | fastest | loop s (all steps) | tokens/s | peak GiB | "
          "loss (first; mean of 2nd half) |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['ms']:.1f} | {r['min_ms']:.1f} | {r['loop_s']:.1f} | {r['tok_s']:.0f} | "
              f"{r['peak']:.2f} | "
              f"{r['first_loss']:.3f}; {r['loss']:.3f} |")
    e, g = rows["eager"], rows["cuda-graphs"]
    print(f"step time eager / graphs: {e['ms'] / g['ms']:.2f}x; whole loop: {e['loop_s'] / g['loop_s']:.2f}x")


if __name__ == "__main__":
    main()
