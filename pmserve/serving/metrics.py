"""The server's Prometheus metrics, in a registry of their own (the batcher, the model table, the repository and
the HTTP middleware all report here)."""

from __future__ import annotations


class Metrics:
    """Prometheus metrics in a registry of their own, so that two apps in one process never collide."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        self.requests = Counter("pmserve_requests", "HTTP requests by endpoint", ["endpoint"], registry=r)
        self.errors = Counter(
            "pmserve_errors", "HTTP error answers by endpoint and status", ["endpoint", "code"], registry=r
        )
        self.latency = Histogram(
            "pmserve_request_seconds", "Request latency by endpoint", ["endpoint"], registry=r
        )
        self.batch_size = Histogram(
            "pmserve_batch_size",
            "Inputs per model call",
            ["model"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        fine = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
        self.queue = Histogram(
            "pmserve_queue_seconds", "Time a request waits for its batch", ["model"], buckets=fine, registry=r
        )
        self.inference = Histogram(
            "pmserve_inference_seconds", "Model call time per batch", ["model"], buckets=fine, registry=r
        )
        self.tokens = Counter(
            "pmserve_batch_tokens",
            "Token positions computed by model calls: 'padded' (batch x longest input) and 'input' (the "
            "inputs' own tokens); their ratio is the cost of padding",
            ["model", "kind"],
            registry=r,
        )
        self.queued = Gauge("pmserve_queued_inputs", "Inputs waiting for a batch", ["model"], registry=r)
        self.version = Gauge(
            "pmserve_model_version", "Version served (0: none, after an unload)", ["model"], registry=r
        )
        self.loads = Counter(
            "pmserve_model_loads",
            "Versions loaded while serving, by result: swapped in, or refused by a check",
            ["model", "result"],
            registry=r,
        )
        self.load_seconds = Histogram(
            "pmserve_model_load_seconds",
            "Time to verify, open and probe a version before it is swapped in",
            ["model"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120),
            registry=r,
        )

        # decoders (pmserve.serving.engine)
        self.ttft = Histogram(
            "pmserve_time_to_first_token_seconds",
            "From a generation request's admission to its first token",
            ["model"],
            buckets=fine,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "pmserve_prompt_tokens", "Prompt tokens of finished sequences", ["model"], registry=r
        )
        self.generated = Counter("pmserve_generated_tokens", "Tokens generated", ["model"], registry=r)
        self.finished = Counter(
            "pmserve_sequences_finished",
            "Generated sequences by finish reason (eos, stop, length, cancelled)",
            ["model", "reason"],
            registry=r,
        )
        self.active = Gauge(
            "pmserve_active_sequences",
            "Sequences admitted and not finished (queued or decoding)",
            ["model"],
            registry=r,
        )

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
