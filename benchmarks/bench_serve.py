"""How fast does `lorakit serve` answer when its requests spread over many adapters, against the base alone?

Starts the server in a process of its own (a random Llama of the chosen shape, N adapters of rank r in an
--adapter-dir, loaded on first use) and drives it over HTTP with the `openai` async client, streaming so that
each request's time to first token (TTFT) and time per output token after it (TPOT) are seen. For each
concurrency and each number of adapters in rotation (0: the base model) it sends the same requests and
reports requests/s, output tokens/s, TTFT and TPOT p50/p99, and throughput against the base at that
concurrency. It also times one adapter's load (read, check, inject) on the server's device.

    PYTHONPATH=src python benchmarks/bench_serve.py --quick                     # CPU smoke run, tiny model
    PYTHONPATH=src python benchmarks/bench_serve.py --model-shape 1b --concurrency 1,32,128 \\
        --adapters 0,1,8,32,128,1000 --requests 256 --max-tokens 128
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
}


def build_model(shape: str, layers: int | None, device: str, dtype: str):
    """A random Llama of `shape` (no end-of-sequence token: every request generates max_tokens) and a word-level
    tokenizer of its vocabulary ("t0", "t1", ...)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    cfg = dict(SHAPES[shape])
    if layers is not None:
        cfg["num_hidden_layers"] = layers
    config = LlamaConfig(**cfg, max_position_embeddings=4096, bos_token_id=None, eos_token_id=None,
                         pad_token_id=None)
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(prev)
    model.generation_config.eos_token_id = None
    vocab = {f"t{i}": i for i in range(cfg["vocab_size"])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return model, PreTrainedTokenizerFast(tokenizer_object=core)


def make_adapters(model, folder: Path, count: int, rank: int, targets: list[str]) -> None:
    """`count` adapter folders adapter-0 ... of random factors, written by lorakit.save_adapter."""
    import torch

    import lorakit as lk

    g = torch.Generator().manual_seed(1)
    for i in range(count):
        if (folder / f"adapter-{i}" / "adapter_config.json").exists():
            continue
        lk.inject(model, lk.LoraConfig(r=rank, alpha=2 * rank, targets=targets), name="bench")
        with torch.no_grad():
            for _, layer in lk.lora_layers(model):
                if "bench" in layer.adapters:
                    b = layer.adapters["bench"].lora_B
                    b.copy_(torch.randn(b.shape, generator=g).to(b) * 0.01)
        lk.save_adapter(model, folder / f"adapter-{i}", name="bench")
        lk.delete_adapter(model, "bench")


def serve_main(args) -> None:
    """The server process: build the model and its adapters, time one adapter load, serve until killed."""
    import uvicorn

    from lorakit.serve.cli import build

    model, tok = build_model(args.model_shape, args.layers, args.device, args.dtype)
    folder = Path(args.adapter_dir)
    make_adapters(model, folder, max(args.adapter_counts + [1]), args.rank, args.targets.split(","))
    app = build(model, tokenizer=tok, adapter_dir=str(folder), served_name="base", max_loras=args.max_loras,
                cpu_lora_bytes=64 << 30, kv_budget=args.kv_budget,
                max_batch=args.max_batch, max_queue=100_000, max_tokens=args.max_tokens)
    registry = app.state.registry
    t0 = time.perf_counter()
    registry.resolve("adapter-0")  # read and check (a request's thread does this)
    t1 = time.perf_counter()
    registry.acquire("adapter-0", set())  # inject (the engine's thread does this)
    if args.device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
    t2 = time.perf_counter()
    print(f"LOAD read+check {1e3 * (t1 - t0):.1f} ms, inject {1e3 * (t2 - t1):.1f} ms", flush=True)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


async def drive(url: str, models: list[str], concurrency: int, requests: int, prompt_len: int,
                max_tokens: int, vocab: int) -> dict:
    """Send `requests` streamed completions, `concurrency` at a time, models in rotation; latency stats."""
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    gate = asyncio.Semaphore(concurrency)
    ttft, tpot, tokens = [], [], []

    async def one(i: int) -> None:
        prompt = [(7 * i + 13 * j) % vocab for j in range(prompt_len)]
        async with gate:
            start = time.perf_counter()
            first, n = None, 0
            stream = await client.completions.create(model=models[i % len(models)], prompt=prompt,
                                                     max_tokens=max_tokens, temperature=0, stream=True,
                                                     stream_options={"include_usage": True})
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].text and first is None:
                    first = time.perf_counter()
                if chunk.usage is not None:
                    n = chunk.usage.completion_tokens
            end = time.perf_counter()
        first = first or end
        ttft.append(first - start)
        tokens.append(n)
        if n > 1:
            tpot.append((end - first) / (n - 1))

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(requests)))
    wall = time.perf_counter() - t0
    await client.close()
    return {"req_s": requests / wall, "tok_s": sum(tokens) / wall, "ttft": ttft, "tpot": tpot}


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def wait_healthy(url: str, proc: subprocess.Popen, seconds: float) -> None:
    import httpx2

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode}")
        try:
            if httpx2.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx2.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit("the server did not start")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-shape", choices=sorted(SHAPES), default="1b")
    p.add_argument("--layers", type=int, default=None, help="fewer layers than the shape has (a quicker run)")
    p.add_argument("--device", default=None, help="default: cuda if there is one, else cpu")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--concurrency", default="1,32", help="comma-separated")
    p.add_argument("--adapters", default="0,1,8,32", help="adapters in rotation, comma-separated (0: base)")
    p.add_argument("--requests", type=int, default=64, help="requests per case")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    p.add_argument("--max-loras", type=int, default=32, help="adapters held in the model at once")
    p.add_argument("--max-batch", type=int, default=128)
    p.add_argument("--kv-budget", type=int, default=131072)
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--adapter-dir", default=None, help="where the adapters are written (default: a temp folder)")
    p.add_argument("--quick", action="store_true", help="a CPU smoke run: tiny model, few requests")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the server process
    p.add_argument("--adapter-counts", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.model_shape, args.device = "tiny", args.device or "cpu"
        args.concurrency, args.adapters, args.requests = "1,8", "0,1,4", 16
        args.prompt_len, args.max_tokens, args.max_loras = 16, 8, 2
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if args.serve:
        args.adapter_counts = [int(x) for x in args.adapter_counts.split(",")]
        return serve_main(args)

    counts = [int(x) for x in args.adapters.split(",")]
    concurrency = [int(x) for x in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        adapter_dir = args.adapter_dir or tmp
        argv = [sys.executable, __file__, "--serve", "--adapter-counts", ",".join(map(str, counts)),
                "--adapter-dir", adapter_dir, "--model-shape", args.model_shape, "--device", args.device,
                "--dtype", args.dtype, "--rank", str(args.rank), "--targets", args.targets,
                "--max-loras", str(args.max_loras), "--max-batch", str(args.max_batch),
                "--kv-budget", str(args.kv_budget), "--max-tokens", str(args.max_tokens), "--port", str(args.port)]
        if args.layers is not None:
            argv += ["--layers", str(args.layers)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1] / "src"),
                                                                            os.environ.get("PYTHONPATH")]))}
        proc = subprocess.Popen(argv, env=env)
        url = f"http://127.0.0.1:{args.port}"
        try:
            wait_healthy(url, proc, 1800)
            vocab = SHAPES[args.model_shape]["vocab_size"]
            asyncio.run(drive(url, ["base"], 2, 4, args.prompt_len, 4, vocab))  # warm-up
            print(f"# lorakit serve: {args.model_shape} shape{f' ({args.layers} layers)' if args.layers else ''}, "
                  f"{args.device} {args.dtype}, torch {torch.__version__}; rank {args.rank} on {args.targets}; "
                  f"{args.requests} requests per case, prompt {args.prompt_len} tokens, {args.max_tokens} new; "
                  f"{args.max_loras} adapters held in the model")
            print("| adapters | concurrency | req/s | tok/s | vs base | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms "
                  "| TPOT p99 ms |")
            print("|---|---|---|---|---|---|---|---|---|")
            base = {}
            for c in concurrency:
                for n in counts:
                    models = ["base"] if n == 0 else [f"adapter-{i}" for i in range(n)]
                    r = asyncio.run(drive(url, models, c, args.requests, args.prompt_len, args.max_tokens, vocab))
                    if n == 0:
                        base[c] = r["tok_s"]
                    rel = f"{r['tok_s'] / base[c]:.2f}x" if c in base else "-"
                    print(f"| {n or 'base'} | {c} | {r['req_s']:.2f} | {r['tok_s']:.1f} | {rel} | "
                          f"{1e3 * pct(r['ttft'], 50):.1f} | {1e3 * pct(r['ttft'], 99):.1f} | "
                          f"{1e3 * pct(r['tpot'], 50):.1f} | {1e3 * pct(r['tpot'], 99):.1f} |", flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=60)


if __name__ == "__main__":
    main()
