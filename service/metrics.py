"""Prometheus metrics, one CollectorRegistry per app (several apps in one process stay apart)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "galmorph_http_requests",
            "HTTP requests by route template, method and status code",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "galmorph_http_request_duration_seconds",
            "HTTP request latency by route template",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "galmorph_http_requests_in_flight",
            "HTTP requests being handled",
            registry=self.registry,
        )
        self.queue_time = Histogram(
            "galmorph_queue_wait_seconds",
            "Time an image waited for its inference batch to start",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_length = Gauge(
            "galmorph_queue_length",
            "Images waiting for inference (sampled when scraped)",
            registry=self.registry,
        )
        self.inference_time = Histogram(
            "galmorph_inference_duration_seconds",
            "Model run time per batch",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "galmorph_batch_size",
            "Images per model run",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.cutouts = Counter(
            "galmorph_cutouts",
            "Cutouts handled, by outcome (ok or the HTTP status of the error)",
            ["outcome"],
            registry=self.registry,
        )
        self.model_info = Gauge(
            "galmorph_model_info",
            "The loaded model and the execution provider it really runs on (value 1)",
            ["model", "version", "sha256", "provider"],
            registry=self.registry,
        )
        self.ready = Gauge(
            "galmorph_ready",
            "1 when the model is loaded, warmed up and its provider verified",
            registry=self.registry,
        )

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.inference_time.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts every request by its route template (not the raw path, to bound cardinality)."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # stays 500 only if the app dies before answering
        started = time.perf_counter()

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_with_status)
        finally:
            self.metrics.in_flight.dec()
            # The router stores the matched route in the scope; unmatched paths share a label.
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(route, scope["method"], str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)
