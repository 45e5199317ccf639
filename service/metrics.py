"""Prometheus metrics, one CollectorRegistry per app (several apps in one process stay apart).

With several worker processes every worker writes its values to PROMETHEUS_MULTIPROC_DIR
(prometheus-client's multiprocess mode, set up by `galmorph serve`) and /metrics, whichever
worker answers it, reports the sum over all of them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# The route label of requests that match no route (404s), so raw paths never become labels.
UNMATCHED_ROUTE = "unmatched"


def prepare_multiprocess_dir(workers: int) -> Path | None:
    """Set up PROMETHEUS_MULTIPROC_DIR before worker processes start; return a folder made here.

    A folder the environment names is used and emptied of an earlier run's files (stale
    values would be added to the new ones); with several workers and none named, a fresh
    temporary folder is made, which the caller removes when the server stops.
    """
    if named := os.environ.get(MULTIPROC_ENV):
        folder = Path(named)
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("*.db"):
            stale.unlink()
        return None
    if workers == 1:
        return None
    made = Path(tempfile.mkdtemp(prefix="galmorph-metrics-"))
    os.environ[MULTIPROC_ENV] = str(made)
    return made


def remove_multiprocess_dir(folder: Path | None) -> None:
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
        os.environ.pop(MULTIPROC_ENV, None)


class ServiceMetrics:
    def __init__(self) -> None:
        # prometheus-client chose its value storage from the same variable when imported.
        self.multiprocess_dir = os.environ.get(MULTIPROC_ENV)
        self.registry = CollectorRegistry()
        self.sample_queue: Callable[[], int] = lambda: 0
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
            multiprocess_mode="livesum",
            registry=self.registry,
        )
        self.header_timeouts = Counter(
            "galmorph_http_header_timeouts",
            "Connections closed because no complete request head arrived in time",
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
            "Images waiting for inference (sampled at each request's end and when scraped)",
            multiprocess_mode="livesum",
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
        # One sample per worker process (label `pid` when there are several): each loads
        # the model itself and could end up on another provider.
        self.model_info = Gauge(
            "galmorph_model_info",
            "The loaded model and the execution provider it really runs on (value 1)",
            ["model", "version", "sha256", "provider"],
            multiprocess_mode="liveall",
            registry=self.registry,
        )
        self.ready = Gauge(
            "galmorph_ready",
            "1 when the model is loaded, warmed up and its provider verified (in every worker)",
            multiprocess_mode="livemin",
            registry=self.registry,
        )

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.inference_time.observe(seconds)

    def render(self) -> bytes:
        self.queue_length.set(self.sample_queue())
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.multiprocess_dir)
        return generate_latest(registry)

    def close(self) -> None:
        """This process stops serving: its live gauges leave the multiprocess totals."""
        if self.multiprocess_dir is not None:
            mark_process_dead(os.getpid(), self.multiprocess_dir)


def route_template(scope: Scope) -> str:
    """The template of the route the app's own router matches, never the raw path.

    Routes of included routers are found by FastAPI, which leaves the route in the scope;
    this matches the app's top-level routes (Mounts such as /static, /openapi.json, /docs)
    the way Starlette does, before the request changes the scope.
    """
    partial = None
    for route in getattr(scope.get("app"), "routes", ()):
        template = getattr(route, "path_format", None)
        if template is None:
            continue
        match, _ = route.matches(scope)
        if match is Match.FULL:
            return str(template)
        if match is Match.PARTIAL and partial is None:
            partial = str(template)  # the path matches but not the method (405)
    return partial or UNMATCHED_ROUTE


class MetricsMiddleware:
    """Counts every request by its route template (not the raw path, to bound cardinality).

    Mounts (/static) and the docs routes count under their own templates; only requests that
    match no route share the label `unmatched`.
    """

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # stays 500 only if the app dies before answering
        started = time.perf_counter()
        route = route_template(scope)

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
            route = getattr(scope.get("route"), "path_format", route)
            self.metrics.requests.labels(route, scope["method"], str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)
            self.metrics.queue_length.set(self.metrics.sample_queue())
