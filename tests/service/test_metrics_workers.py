"""/metrics of `galmorph serve --workers 2`: every scrape reports the sum of both workers."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.parser import text_string_to_metric_families

from tests.support.cutout_factory import make_png
from tests.support.onnx_factory import write_model
from tests.support.server_process import RunningServer, serve

pytestmark = pytest.mark.slow
REQUESTS = 40
STALE = 1000


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    work = tmp_path_factory.mktemp("workers")
    metrics_dir = work / "prometheus"
    metrics_dir.mkdir()
    env = {"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    # An earlier run's values, left in the folder: serve must start from zero.
    stale = (
        "from galmorph.service.metrics import ServiceMetrics\n"
        f"ServiceMetrics().requests.labels('/classify', 'POST', '200').inc({STALE})\n"
    )
    subprocess.run([sys.executable, "-c", stale], env={**os.environ, **env}, check=True)
    assert list(metrics_dir.glob("counter_*.db"))
    with serve(write_model(work / "model.onnx"), work, "--workers", "2", env=env) as running:
        yield running


def server_metrics_dir(server: RunningServer) -> Path:
    return server.log_path.parent / "prometheus"


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    return [
        (sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    ]


def count(text: str, route: str, method: str, status: str) -> float:
    wanted = {"route": route, "method": method, "status": status}
    return sum(
        value for labels, value in samples(text, "galmorph_http_requests_total") if labels == wanted
    )


def test_every_scrape_sums_all_workers(server: RunningServer) -> None:
    def wait_both_ready() -> list[str]:
        for _ in range(100):
            text = httpx.get(f"{server.url}/metrics").text
            pids = [labels["pid"] for labels, _ in samples(text, "galmorph_model_info")]
            if len(set(pids)) == 2:
                return pids
        raise AssertionError("the two workers never both reported their model")

    pids = wait_both_ready()
    assert str(os.getpid()) not in pids

    # New connections from several threads: the kernel spreads them over both workers.
    def classify(seed: int) -> int:
        return httpx.post(f"{server.url}/classify", content=make_png(seed=seed)).status_code

    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(classify, range(REQUESTS))) == {200}
    # Each worker's own file: both served some, so one worker's view would be short.
    per_worker = [
        sum(
            value
            for key, value, _ in MmapedDict(str(path)).read_all_values()
            if '"route": "/classify"' in key
        )
        for path in server_metrics_dir(server).glob("counter_*.db")
    ]
    assert len(per_worker) == 2 and sum(per_worker) == REQUESTS and min(per_worker) > 0

    for _ in range(8):  # whichever worker answers the scrape, the totals are the same
        text = httpx.get(f"{server.url}/metrics").text
        # Neither one worker's share nor with the earlier run's STALE added in.
        assert count(text, "/classify", "POST", "200") == REQUESTS
        [(_, images)] = samples(text, "galmorph_batch_size_sum")
        assert images == REQUESTS
        [(_, ready)] = samples(text, "galmorph_ready")
        assert ready == 1


def test_route_labels_are_templates(server: RunningServer) -> None:
    for path in ("/static/style.css", "/openapi.json", "/no/such/path/123", "/v2/models/x1"):
        httpx.get(f"{server.url}{path}")
    httpx.post(f"{server.url}/healthz")
    text = httpx.get(f"{server.url}/metrics").text
    routes = {labels["route"] for labels, _ in samples(text, "galmorph_http_requests_total")}
    assert {"/static/{path}", "/openapi.json", "/v2/models/{name}", "/healthz"} <= routes
    assert count(text, "unmatched", "GET", "404") >= 1
    assert count(text, "/healthz", "POST", "405") >= 1
    assert not any("123" in route or "x1" in route or "style" in route for route in routes)
