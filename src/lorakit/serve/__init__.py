"""`lorakit serve`: an OpenAI-compatible HTTP server for one base model and many adapters.

    engine.py    the continuous-batching engine (rows join and leave between steps, one adapter per row)
    kv.py        the KV cache of the running batch
    sampling.py  per-request sampling, stop strings, incremental text
    adapters.py  the adapter registry: known folders, a host-memory LRU, a bounded set in the model
    compat.py    `vllm_problems`: whether vLLM / SGLang load an adapter folder
    app.py       the HTTP API (FastAPI on uvicorn)
    metrics.py   Prometheus metrics
    cli.py       the `lorakit serve` command

Needs the [serve] extra (fastapi, uvicorn, prometheus-client) and transformers.
"""

from .compat import vllm_problems

__all__ = ["vllm_problems"]
