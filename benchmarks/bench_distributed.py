"""How does LoRA training scale over GPUs? Tokens/s and per-GPU peak memory, DDP vs FSDP2.

The DESIGN.md 8B shape: a random-init Llama (hidden 4096, 32 layers, GQA 32/8, MLP 14336,
vocab 128256), bf16, batch 2 x 1024 tokens per GPU, AdamW, LoRA r=16 alpha=32 on all linears,
wrapped exactly as `lorakit train` wraps it (lorakit.distributed.Context.wrap):

  ddp   every GPU holds the whole model; the LoRA gradients are all-reduced
  fsdp  FSDP2 shards the frozen base and the adapters per decoder layer, then the root

The model is built on the meta device and materialized after sharding, so FSDP never holds a
whole unsharded model on one GPU. One launch measures one world size; `--sweep` launches the
others through torchrun and prints one table:

    torchrun --nproc-per-node 2 benchmarks/bench_distributed.py --strategy ddp,fsdp
    python benchmarks/bench_distributed.py --sweep 1,2,4 --strategy ddp,fsdp      # the table
    python benchmarks/bench_distributed.py --sweep 1,2 --layers 2 --hidden 64 --intermediate 128 \\
        --heads 4 --kv-heads 2 --vocab 1000 --seq 32 --steps 2 --warmup 1        # CPU smoke test (gloo)

Tokens/s counts every rank's tokens (global throughput); per-GPU peak is the largest
`torch.cuda.max_memory_allocated` over the ranks (on CPU: not measured).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def build(args, ctx, strategy: str):
    """The LoRA-injected model, wrapped for `strategy`, with real (random) weights on ctx.device."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    import lorakit as lk

    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
                         max_position_embeddings=max(4096, args.seq), attn_implementation="sdpa")
    dtype = getattr(torch, args.dtype)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):  # no memory yet: FSDP shards before anything is allocated
            model = LlamaForCausalLM(config)
            lk.inject(model, lk.LoraConfig(r=args.r, alpha=args.alpha, dropout=0.0, targets="all-linear"))
    finally:
        torch.set_default_dtype(prev)
    if args.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if strategy == "fsdp":
        ctx.wrap(model)  # shards the meta parameters: to_empty then allocates this rank's shards only
    model.to_empty(device=ctx.device)
    init_weights(model, seed=0)
    # the rotary tables are buffers computed at construction: rebuild them for real
    with torch.device(ctx.device):
        model.model.rotary_emb = LlamaRotaryEmbedding(config)
    # DDP (which broadcasts rank 0's weights) wraps the materialized model; FSDP's is itself
    train_model = model if strategy == "fsdp" else ctx.wrap(model)
    return model, train_model


@torch.no_grad()
def init_weights(model, seed: int) -> None:
    """Random values (timings do not depend on them): N(0, 0.02), norms 1, LoRA A and B small
    random (a zero B could flatter a GEMM). Each rank fills its own shard of a sharded parameter."""
    gens: dict[torch.device, torch.Generator] = {}
    for name, p in model.named_parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        g = gens.setdefault(local.device, torch.Generator(device=local.device).manual_seed(seed))
        if name.endswith("norm.weight"):
            local.fill_(1.0)
        else:
            local.normal_(0.0, 1e-3 if "lora_B" in name else 0.02, generator=g)


def run_strategy(args, ctx, strategy: str) -> dict:
    cuda = ctx.device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t_build = time.perf_counter()
    model, train_model = build(args, ctx, strategy)
    t_build = time.perf_counter() - t_build
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator(device="cpu").manual_seed(1 + ctx.rank)  # each rank its own batch, as in training
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(ctx.device)

    def step():
        loss = train_model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        if cuda:
            torch.cuda.synchronize()
        ctx.barrier()  # every rank starts the step together: the slowest rank sets the pace
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    # the step time of the run is the slowest rank's; the memory, the fullest GPU's
    stats = torch.tensor([statistics.median(times), peak, t_build], dtype=torch.float64, device=ctx.device)
    if ctx.distributed:
        torch.distributed.all_reduce(stats, op=torch.distributed.ReduceOp.MAX)
    step_s, peak, t_build = stats.tolist()
    trainable = sum(p.numel() for p in params)
    model = train_model = params = opt = ids = None
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    tokens = args.batch * args.seq * ctx.world_size
    return dict(strategy=strategy, gpus=ctx.world_size, step_ms=step_s * 1e3, tokens_per_s=tokens / step_s,
                tokens_per_s_per_gpu=tokens / step_s / ctx.world_size, peak_gib=peak, build_s=t_build,
                trainable=trainable)


def worker(args) -> None:
    """One launch: every rank runs each strategy in turn; rank 0 prints (and writes --json)."""
    from lorakit import distributed

    if not distributed.launched():
        raise SystemExit("Launch with torchrun (torchrun --nproc-per-node N benchmarks/bench_distributed.py ...), "
                         "or pass --sweep 1,2,4 to launch each world size.")
    group = distributed.setup("ddp")  # joins the process group once; each strategy runs inside it
    rows = []
    try:
        for strategy in args.strategy.split(","):
            ctx = dataclasses.replace(group, strategy=strategy, owns_group=False)
            row = run_strategy(args, ctx, strategy)
            rows.append(row)
            if ctx.is_main:
                peak = "-" if row["peak_gib"] != row["peak_gib"] else f"{row['peak_gib']:.2f}"  # nan on CPU
                print(f"  {row['gpus']} x {row['strategy']:<5} {row['step_ms']:9.1f} ms/step "
                      f"{row['tokens_per_s']:10.0f} tok/s {peak:>7} GiB peak/GPU", flush=True)
    finally:
        group.close()
    if group.is_main and args.json:
        Path(args.json).write_text(json.dumps(rows))


def header(args) -> str:
    import transformers
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (gloo)"
    return (f"# bench_distributed: {device}, torch {torch.__version__}, transformers {transformers.__version__}; "
            f"Llama hidden {args.hidden}, {args.layers} layers, heads {args.heads}/{args.kv_heads}, MLP "
            f"{args.intermediate}, vocab {args.vocab}, {args.dtype}; batch {args.batch}x{args.seq} per GPU, AdamW, "
            f"LoRA r={args.r} alpha={args.alpha:g} all-linear{', grad ckpt' if args.grad_ckpt else ''}; "
            f"median of {args.steps} steps after {args.warmup} warm-up")


def sweep(args, argv: list[str]) -> None:
    """Launch this script through torchrun once per world size and print one table."""
    counts = [int(n) for n in args.sweep.split(",")]
    if torch.cuda.is_available() and max(counts) > torch.cuda.device_count():
        raise SystemExit(f"--sweep {args.sweep}: this machine has {torch.cuda.device_count()} GPUs.")
    passthrough, skip = [], False
    for a in argv:  # the same settings, minus --sweep and --json
        if skip:
            skip = False
        elif a in ("--sweep", "--json"):
            skip = True
        elif not a.startswith(("--sweep=", "--json=")):
            passthrough.append(a)
    print(header(args), flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in counts:
            out = Path(tmp) / f"{n}.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
                   __file__, *passthrough, "--json", str(out)]
            print(f"$ torchrun --nproc-per-node {n} ...", flush=True)
            code = subprocess.call(cmd, env=dict(os.environ, LORAKIT_BENCH_QUIET="1"))
            if code != 0 or not out.exists():
                print(f"  {n} processes: FAILED (exit code {code})")
                continue
            rows += json.loads(out.read_text())
    print("\n| GPUs | strategy | step ms | tokens/s | tokens/s per GPU | scaling vs 1 GPU | peak GiB per GPU |")
    print("|---|---|---|---|---|---|---|")
    base = {}
    for r in rows:
        if r["gpus"] == 1:
            base[r["strategy"]] = r["tokens_per_s"]
        ref = base.get(r["strategy"])
        scale = f"{r['tokens_per_s'] / ref:.2f}x" if ref else "-"
        peak = "-" if r["peak_gib"] != r["peak_gib"] else f"{r['peak_gib']:.1f}"
        print(f"| {r['gpus']} | {r['strategy']} | {r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | "
              f"{r['tokens_per_s_per_gpu']:,.0f} | {scale} | {peak} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--strategy", default="ddp,fsdp", help="comma list of ddp, fsdp")
    ap.add_argument("--sweep", default=None, help="comma list of process counts to launch, e.g. 1,2,4")
    ap.add_argument("--layers", type=int, default=32, help="decoder layers (fewer to shrink the 8B shape)")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=14336)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--batch", type=int, default=2, help="sequences per GPU")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--grad-ckpt", action="store_true", help="recompute activations in backward")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json", default=None, help="write the rows to this file")
    argv = sys.argv[1:]
    args = ap.parse_args(argv)
    bad = [s for s in args.strategy.split(",") if s not in ("ddp", "fsdp")]
    if bad:
        raise SystemExit(f"--strategy: unknown {bad}; use ddp, fsdp or ddp,fsdp.")
    if args.sweep:
        sweep(args, argv)
        return
    from lorakit import distributed
    if distributed.env_rank() == 0 and not os.environ.get("LORAKIT_BENCH_QUIET"):
        print(header(args), flush=True)
    worker(args)


if __name__ == "__main__":
    main()
