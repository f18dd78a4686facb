"""`lorakit serve`: an OpenAI-compatible HTTP server for one base model and many adapters.

    engine.py    the continuous-batching engine (rows join and leave between steps, one adapter per row)
    kv.py        the KV cache of the running batch
    sampling.py  per-request sampling, stop strings, incremental text
    adapters.py  the adapter registry: known folders, a host-memory LRU, a bounded set in the model
    app.py       the HTTP API (FastAPI on uvicorn)
    metrics.py   Prometheus metrics
    cli.py       the `lorakit serve` command

From Python: `app = build(model_or_name, {"name": "adapter/dir"}, ...)` gives the ASGI app, and
`start(app)` serves it on a thread (port 0: a free one) and returns its URL and `stop()`.
`vllm_problems(dir)` (from `lorakit.compat`) says whether vLLM / SGLang load an adapter folder.

Needs the [serve] extra (fastapi, uvicorn, prometheus-client) and transformers.
"""

from .cli import build, start
from ..compat import vllm_problems

__all__ = ["build", "start", "vllm_problems"]
