"""The server's Prometheus metrics, one registry per app (tests can run several apps).

danlu_requests_total{endpoint, status}      answered requests
danlu_request_seconds{endpoint}             latency histogram
danlu_batch_size{model}                     inputs per model call (dynamic batching)
danlu_batch_seconds{model}                  model time per batch
danlu_queue_depth{model}                    inputs waiting or running
danlu_in_flight_requests                    requests being answered
danlu_generated_tokens_total{model}         tokens produced by language models
danlu_drift{model, check}                   the latest drift statistics (danlu monitor)
"""

from __future__ import annotations

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class ServerMetrics:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "danlu_requests", "Answered requests", ["endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "danlu_request_seconds",
            "Request latency",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "danlu_batch_size",
            "Inputs per model call",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.batch_seconds = Histogram(
            "danlu_batch_seconds",
            "Model time per batch",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "danlu_queue_depth", "Inputs waiting or running", ["model"], registry=r
        )
        self.in_flight = Gauge("danlu_in_flight_requests", "Requests being answered", registry=r)
        self.tokens = Counter("danlu_generated_tokens", "Tokens generated", ["model"], registry=r)
        self.drift = Gauge(
            "danlu_drift", "Latest drift statistics (danlu monitor)", ["model", "check"], registry=r
        )

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def observe_batch(self, model: str, size: int, seconds: float) -> None:
        self.batch_size.labels(model).observe(size)
        self.batch_seconds.labels(model).observe(seconds)

    def set_drift(self, model: str, gauges: dict[str, float]) -> None:
        for check, value in gauges.items():
            self.drift.labels(model, check).set(value)

    def render(self, depths: dict[str, int]) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        for model, depth in depths.items():
            self.queue_depth.labels(model).set(depth)
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
