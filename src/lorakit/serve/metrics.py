"""The server's Prometheus metrics, in a registry of its own (two servers in one process do not mix)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """Counters of requests (finished, refused) and tokens, gauges of the queue, the batch and the adapters in the
    model, histograms of the time to first token and per output token."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("lorakit_requests", "finished requests, by finish reason", ["finish_reason"],
                                registry=r)
        self.rejected = Counter("lorakit_rejected_requests", "requests refused, by HTTP status", ["status"],
                                registry=r)
        self.prompt_tokens = Counter("lorakit_prompt_tokens", "prompt tokens read", registry=r)
        self.generation_tokens = Counter("lorakit_generation_tokens", "tokens generated", registry=r)
        self.queue = Gauge("lorakit_queue_length", "requests waiting for room in the batch", registry=r)
        self.batch = Gauge("lorakit_batch_size", "rows in the running decode batch", registry=r)
        self.adapters = Gauge("lorakit_adapters_loaded", "adapters held in the model", registry=r)
        self.ttft = Histogram("lorakit_time_to_first_token_seconds", "arrival to first token", buckets=_LATENCY,
                              registry=r)
        self.tpot = Histogram("lorakit_time_per_output_token_seconds", "time per token after the first",
                              buckets=_LATENCY, registry=r)

    def finished(self, reason: str, prompt_tokens: int, new_tokens: int, first_at: float | None, end: float) -> None:
        self.requests.labels(reason).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(new_tokens)
        if first_at is not None and new_tokens > 1:
            self.tpot.observe((end - first_at) / (new_tokens - 1))

    def text(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
