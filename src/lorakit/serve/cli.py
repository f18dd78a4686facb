"""`lorakit serve`: the command, and `build` / `start` for serving from Python (tests, benchmarks)."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

#: where `lorakit train` with no flags leaves its adapter (TrainConfig output_dir "runs/default", then adapter/)
DEFAULT_ADAPTER = Path("runs/default/adapter")
DEFAULT_MODEL = "smollm2-135m"

log = logging.getLogger("lorakit.serve")


def add_parser(subparsers) -> argparse.ArgumentParser:
    s = subparsers.add_parser(
        "serve", help="serve a model and its adapters over OpenAI's HTTP API",
        description="An OpenAI-compatible server (/v1/completions, /v1/chat/completions, /v1/models, vLLM's "
                    "/v1/load_lora_adapter) for one base model and many adapters, batched together. With no "
                    f"flags: {DEFAULT_MODEL} (on the CPU unless there is a GPU) with the adapter `lorakit train` "
                    f"leaves in {DEFAULT_ADAPTER}, as model 'default'.")
    s.add_argument("--model", default=None, help=f"base model name or folder (default {DEFAULT_MODEL})")
    s.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="serve the adapter in DIR as model NAME (repeatable)")
    s.add_argument("--adapter-dir", default=None, metavar="DIR",
                   help="adapters load from folders inside DIR only: a request's `model` naming a folder here loads "
                        "it on first use, and /v1/load_lora_adapter takes paths inside it")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    s.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    s.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1/")
    s.add_argument("--served-model-name", default=None, help="the `model` that means the base (default: --model)")
    s.add_argument("--quantize", choices=("nf4", "fp4", "int8"), default=None,
                   help="load the base quantized with bitsandbytes")
    s.add_argument("--device", default="auto", help="auto (cuda if there is one), cpu, cuda, cuda:1, ...")
    s.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="the base's dtype (auto: bfloat16 on a GPU, else as stored)")
    s.add_argument("--max-loras", type=int, default=8, help="adapters held in the model at once")
    s.add_argument("--cpu-lora-gib", type=float, default=4.0,
                   help="GiB of adapters held read in host memory (least recently used ones are read again)")
    s.add_argument("--kv-budget", type=int, default=16384,
                   help="KV cache positions for the whole batch; requests that do not fit wait")
    s.add_argument("--max-batch", type=int, default=32, help="requests decoded together")
    s.add_argument("--max-queue", type=int, default=256, help="requests waiting; more get 429")
    s.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens read between two decode steps")
    s.add_argument("--max-tokens", type=int, default=1024, help="the largest max_tokens a request may ask for")
    s.add_argument("--max-prompt-tokens", type=int, default=None, help="longest prompt (default: the context)")
    s.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body")
    s.set_defaults(func=run)
    return s


def run(args) -> int:
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from ..combine_cli import parse_adapters  # the same NAME=DIR rule as `lorakit combine`

    model_name, adapters = args.model, parse_adapters(args.adapter)
    if model_name is None and not adapters and args.adapter_dir is None:
        if not (DEFAULT_ADAPTER / "adapter_config.json").is_file():
            raise ConfigError(f"no adapter in {DEFAULT_ADAPTER}: run `lorakit train` first (it leaves one there), "
                              f"then `lorakit serve`; or serve the base alone with `lorakit serve --model "
                              f"{DEFAULT_MODEL}`.")
        adapters = {"default": str(DEFAULT_ADAPTER)}
    model_name = model_name or DEFAULT_MODEL
    if not _loopback(args.host) and args.api_key is None:
        log.warning("listening on %s without --api-key: anyone who reaches this address can use the server", args.host)
    app = build(model_name, adapters, adapter_dir=args.adapter_dir, api_key=args.api_key,
                served_name=args.served_model_name, quantize=args.quantize, device=args.device, dtype=args.dtype,
                max_loras=args.max_loras, cpu_lora_bytes=int(args.cpu_lora_gib * (1 << 30)), kv_budget=args.kv_budget,
                max_batch=args.max_batch, max_queue=args.max_queue, prefill_chunk=args.prefill_chunk,
                max_tokens=args.max_tokens, max_prompt_tokens=args.max_prompt_tokens,
                max_body_bytes=args.max_body_bytes)
    print(f"serving {model_name} with adapters {app.state.registry.names()} on http://{args.host}:{args.port}/v1")
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


def build(model, adapters: dict[str, str] | None = None, *, tokenizer=None, adapter_dir: str | None = None,
          api_key: str | None = None, served_name: str | None = None, quantize: str | None = None,
          device: str = "auto", dtype: str = "auto", max_loras: int = 8, cpu_lora_bytes: int = 4 << 30,
          kv_budget: int = 16384, max_batch: int = 32, max_queue: int = 256, prefill_chunk: int = 512,
          max_tokens: int = 1024, max_prompt_tokens: int | None = None, max_body_bytes: int = 1 << 20):
    """The ASGI app serving `model` (a name or folder for `lorakit.models.load_model`, or a loaded causal LM
    with its `tokenizer`) and `adapters` ({name: folder}); `app.state` holds engine, registry and metrics.

    Raises:
        ConfigError: a model that cannot be served, bad limits; AdapterFileError / ShapeMismatchError: an
            adapter that does not load onto the model.
    """
    import torch

    from .adapters import AdapterRegistry
    from .app import Limits, create_app
    from .engine import Engine
    from .metrics import Metrics

    if isinstance(model, (str, Path)):
        from ..models import load_model

        served_name = served_name or str(model)
        target = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                              "cpu" if device == "auto" else device)
        if dtype == "auto":
            dtype = "bfloat16" if target.type == "cuda" else None
        model, tokenizer = load_model(model, task="causal-lm", quantize=quantize, dtype=dtype)
        if quantize is None:  # (a quantized base is placed by bitsandbytes)
            model = model.to(target)
    elif tokenizer is None:
        raise ConfigError("build(model=<a loaded model>) needs its tokenizer= too.")
    served_name = served_name or getattr(model.config, "_name_or_path", None) or "base"
    model.eval()
    for value, flag in ((max_loras, "max_loras"), (cpu_lora_bytes, "cpu_lora_bytes"), (kv_budget, "kv_budget"),
                        (max_batch, "max_batch"), (max_queue, "max_queue"), (prefill_chunk, "prefill_chunk"),
                        (max_tokens, "max_tokens"), (max_body_bytes, "max_body_bytes")):
        if int(value) < 1:
            raise ConfigError(f"{flag}={value}: give a number of at least 1.")
    registry = AdapterRegistry(model, adapter_dir, max_loaded=max_loras, max_cpu_bytes=cpu_lora_bytes)
    for name, folder in (adapters or {}).items():
        if name == served_name:
            raise ConfigError(f"adapter name {name!r} is the base model's name; pick another.")
        registry.add(name, folder, confine=False)  # named by whoever starts the server
    metrics = Metrics()
    engine = Engine(model, tokenizer, registry, kv_budget=kv_budget, max_batch=max_batch, max_queue=max_queue,
                    prefill_chunk=prefill_chunk, metrics=metrics)
    limits = Limits(max_body_bytes=max_body_bytes, max_prompt_tokens=max_prompt_tokens, max_tokens=max_tokens)
    app = create_app(engine, served_name, api_key=api_key, limits=limits, metrics=metrics)
    app.state.engine, app.state.registry, app.state.metrics = engine, registry, metrics
    return app


@dataclass
class Running:
    """A server started by `start`: its address, and `stop()`."""

    url: str
    server: object
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def start(app, host: str = "127.0.0.1", port: int = 0) -> Running:
    """Serve `app` with uvicorn on a thread of this process (port 0: a free port); returns once it listens."""
    import time

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="lorakit-serve-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()
    return Running(f"http://{host}:{bound[1]}", server, thread)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
