"""Server memory under hostile uploads: peak RSS of `galmorph serve` while 16 clients post,
at once, the most expensive cutouts the limits allow.

For each decode budget (`GALMORPH_DECODE_MEMORY_BUDGET_BYTES`) a fresh server is started
(tests' onnx_factory model, 256 px input, CPU); then, for each kind of upload, the server's
peak-RSS counter is reset (/proc/PID/clear_refs) and `--clients` clients post the same file
together. Reported per case: the statuses (200 decoded, 503 budget busy, 413 over the whole
budget), the growth of the server's peak RSS (VmHWM) over its RSS before the case, the
bound the budget implies (budget plus the uploads held and 48 MiB of slack), the server's
CPU seconds and the wall time. Results go to benchmarks/results/hostile.json.

The uploads (all within the default limits: 8192 px sides, 256 MiB inflated FITS):
  png_rgb_8192        8192^2 RGB PNG of zeros, ~200 KB (Pillow holds 256 MiB)
  png_rgba_8192       the same with alpha (the picture plus an RGB copy, ~585 MiB)
  png_grey16_8192     16-bit grey (~393 MiB)
  jpeg_progressive_8192   progressive 8192^2 JPEG (decoded in full, with ~384 MiB of coefficients)
  fits_gz_cube_4096_resize   3 x 4096^2 float32 gzip cube with fit=resize (whole image read)
  fits_gz_cube_4096   the same cube, default fit (only the model's field is read)

Then hostile request bodies (`--body-cases`), against one server with the default budget,
each case beside `--normal-clients` clients posting a small PNG to /classify in a loop:
  v2_oversized   `--v2-clients` (12) /v2 infer requests at once, each a binary UINT8 `images`
                 tensor [1, S, S, 3] with S = `--v2-side` (9000, over max_side)
  v2_junk        `--junk-clients` (8) /v2 bodies of `--junk-mb` (250) MB that are not JSON
  raw_junk       `--raw-clients` (16) raw /classify bodies of `--raw-mb` (60) MB, no format
Every client sends its head and, unless it is answered first, its body. Reported per case:
the statuses (0 = reset before an answer), 5xx count, peak RSS growth over the RSS before
the case, RSS after it (a 2 s settle), the normal clients' p99 beside the case and, from the
same run, alone before the cases (quiet). Results go to benchmarks/results/hostile.json
(`bodies`).

    .venv/bin/python -m benchmarks.bench_hostile [--budgets-mib 1024 512] [--clients 16]
    # bodies only, at reduced sizes (results elsewhere):
    .venv/bin/python -m benchmarks.bench_hostile --cases --v2-side 4000 --junk-mb 40 \
        --raw-mb 8 --out /tmp/hostile_small.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks.common import RESULTS_DIR, write_results
from tests.support.cutout_factory import make_png
from tests.support.hostile_inputs import flat_gzip_cube, flat_jpeg, flat_png
from tests.support.onnx_factory import FactoryModel, write_model
from tests.support.process_cost import measured, status_kib
from tests.support.raw_http import Answer, Piece, exchange, junk, request_head
from tests.support.server_process import RunningServer, serve

MIB = 2**20
CASES: dict[str, tuple[Callable[[], bytes], str, dict[str, str]]] = {
    "png_rgb_8192": (lambda: flat_png(8192), "big.png", {}),
    "png_rgba_8192": (lambda: flat_png(8192, colour_type=6), "rgba.png", {}),
    "png_grey16_8192": (lambda: flat_png(8192, colour_type=0, bit_depth=16), "grey16.png", {}),
    "jpeg_progressive_8192": (lambda: flat_jpeg(8192, progressive=True), "big.jpg", {}),
    "fits_gz_cube_4096_resize": (lambda: flat_gzip_cube(4096), "cube.fits.gz", {"fit": "resize"}),
    "fits_gz_cube_4096": (lambda: flat_gzip_cube(4096), "cube.fits.gz", {}),
}
SLACK_MIB = 48
BODY_SIZES = ("v2_side", "v2_clients", "junk_mb", "junk_clients", "raw_mb", "raw_clients",
              "normal_clients")  # fmt: skip


def flood(
    server: RunningServer, data: bytes, name: str, params: dict[str, str], clients: int
) -> list[httpx.Response]:
    """`clients` posts of `data` released together; their statuses and details."""
    barrier = threading.Barrier(clients)

    def send(_: int) -> httpx.Response:
        barrier.wait()
        return httpx.post(
            f"{server.url}/classify", files={"file": (name, data)}, params=params, timeout=300
        )

    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(send, range(clients)))


def run_case(server: RunningServer, budget_mib: int, name: str, clients: int) -> dict[str, Any]:
    build, filename, params = CASES[name]
    data = build()
    started = time.perf_counter()
    with measured(server.process.pid) as cost:
        responses = flood(server, data, filename, params, clients)
    wall = time.perf_counter() - started
    statuses = Counter(response.status_code for response in responses)
    refusals = sorted({r.json()["detail"][:120] for r in responses if r.status_code != 200})
    bound = budget_mib + clients * len(data) / MIB + SLACK_MIB
    return {
        "upload_bytes": len(data),
        "params": params,
        "statuses": {str(status): count for status, count in sorted(statuses.items())},
        "peak_rss_growth_mib": round(cost.rss_growth_mib, 1),
        "bound_mib": round(bound, 1),
        "within_bound": cost.rss_growth_mib <= bound,
        "server_cpu_s": round(cost.cpu_s, 2),
        "wall_s": round(wall, 2),
        "refusal_details": refusals,
    }


# --- hostile bodies -------------------------------------------------------------------------


def v2_oversized(args: argparse.Namespace) -> tuple[bytes, Callable[[], Iterator[Piece]], int]:
    side = args.v2_side
    size = side * side * 3
    tensor = {"name": "images", "shape": [1, side, side, 3], "datatype": "UINT8",
              "parameters": {"binary_data_size": size}}  # fmt: skip
    document = json.dumps({"inputs": [tensor]}).encode()
    head = request_head(
        "/v2/models/bench/infer",
        len(document) + size,
        {"Inference-Header-Content-Length": str(len(document)).encode()},
        "application/json",
    )
    return head + document, lambda: junk(size), args.v2_clients


def v2_junk(args: argparse.Namespace) -> tuple[bytes, Callable[[], Iterator[Piece]], int]:
    size = args.junk_mb * 10**6
    head = request_head("/v2/models/bench/infer", size, content_type="application/json")
    return head, lambda: junk(size), args.junk_clients


def raw_junk(args: argparse.Namespace) -> tuple[bytes, Callable[[], Iterator[Piece]], int]:
    size = args.raw_mb * 10**6
    return request_head("/classify", size), lambda: junk(size), args.raw_clients


BODY_CASES = {"v2_oversized": v2_oversized, "v2_junk": v2_junk, "raw_junk": raw_junk}


class NormalClients:
    """Clients posting a small PNG to /classify one after another until stopped."""

    def __init__(self, server: RunningServer, clients: int) -> None:
        self._server = server
        self._clients = clients
        self._stop = threading.Event()
        self.latencies: list[float] = []
        self.statuses: Counter[int] = Counter()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> NormalClients:
        for _ in range(self._clients):
            thread = threading.Thread(target=self._run)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def _run(self) -> None:
        png = make_png()
        with httpx.Client(base_url=self._server.url, timeout=120) as client:
            while not self._stop.is_set():
                started = time.perf_counter()
                status = client.post("/classify", content=png).status_code
                self.latencies.append(time.perf_counter() - started)
                self.statuses[status] += 1

    def summary(self) -> dict[str, Any]:
        values = np.array(self.latencies) * 1000
        return {
            "requests": len(values),
            "statuses": {str(s): n for s, n in sorted(self.statuses.items())},
            "p50_ms": round(float(np.percentile(values, 50)), 1) if len(values) else None,
            "p99_ms": round(float(np.percentile(values, 99)), 1) if len(values) else None,
        }


def run_body_case(
    server: RunningServer, name: str, args: argparse.Namespace, quiet_p99: float | None
) -> dict[str, Any]:
    first, rest, clients = BODY_CASES[name](args)
    barrier = threading.Barrier(clients)

    def send(_: int) -> Answer:
        barrier.wait()
        return exchange(server.port, first, rest(), early_s=1.0, timeout_s=300)

    pid = server.process.pid
    started = time.perf_counter()
    with (
        measured(pid) as cost,
        NormalClients(server, args.normal_clients) as normal,
        ThreadPoolExecutor(clients) as pool,
    ):
        answers = list(pool.map(send, range(clients)))
    wall = time.perf_counter() - started
    time.sleep(2)  # let freed memory go back before reading the RSS after
    statuses = Counter(answer.status for answer in answers)
    normal_figures = normal.summary()
    every = Counter({int(s): n for s, n in normal_figures["statuses"].items()}) + statuses
    p99 = normal_figures["p99_ms"]
    return {
        "clients": clients,
        "body_bytes_each": len(first) + sum(len(part) for part in rest()),
        "statuses": {str(status): count for status, count in sorted(statuses.items())},
        "answered_before_body": sum(not answer.body_sent for answer in answers),
        "responses_5xx": sum(n for status, n in every.items() if status >= 500),
        "peak_rss_growth_mib": round(cost.rss_growth_mib, 1),
        "rss_after_mib": round(status_kib(pid, "VmRSS") / 1024, 1),
        "normal_clients": normal_figures,
        "normal_p99_over_quiet": round(p99 / quiet_p99, 2) if p99 and quiet_p99 else None,
        "wall_s": round(wall, 2),
        "refusal_details": sorted({a.body[:160].decode("utf-8", "replace") for a in answers}),
    }


def run_bodies(model: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    environment = {}
    if args.body_budget_mib is not None:
        budget = args.body_budget_mib * MIB
        environment["GALMORPH_DECODE_MEMORY_BUDGET_BYTES"] = str(budget)
    with serve(model, work, "--log-level", "warning", env=environment) as server:
        pid = server.process.pid
        figures: dict[str, Any] = {"idle_rss_mib": round(status_kib(pid, "VmRSS") / 1024, 1)}
        with NormalClients(server, args.normal_clients) as quiet:
            time.sleep(args.quiet_s)
        figures["quiet"] = quiet.summary()
        for name in args.body_cases:
            figures[name] = run_body_case(server, name, args, figures["quiet"]["p99_ms"])
            print("bodies", name, figures[name], flush=True)
        figures["rss_after_all_mib"] = round(status_kib(pid, "VmRSS") / 1024, 1)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets-mib", type=int, nargs="+", default=[1024, 512])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--cases", nargs="*", choices=sorted(CASES), default=list(CASES))
    parser.add_argument(
        "--body-cases", nargs="*", choices=sorted(BODY_CASES), default=list(BODY_CASES)
    )
    parser.add_argument("--body-budget-mib", type=int, help="default: the server's")
    parser.add_argument("--normal-clients", type=int, default=4)
    parser.add_argument("--quiet-s", type=float, default=10.0, help="normal clients alone")
    parser.add_argument("--v2-side", type=int, default=9000)
    parser.add_argument("--v2-clients", type=int, default=12)
    parser.add_argument("--junk-mb", type=int, default=250)
    parser.add_argument("--junk-clients", type=int, default=8)
    parser.add_argument("--raw-mb", type=int, default=60)
    parser.add_argument("--raw-clients", type=int, default=16)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "hostile.json")
    args = parser.parse_args(argv)

    spec = FactoryModel(input_size=256, channels=8, model_name="bench")
    results: dict[str, dict[str, Any]] = {}
    bodies: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = write_model(work / "bench.onnx", spec)
        if args.body_cases:
            bodies = run_bodies(model, work, args)
        for budget in args.budgets_mib if args.cases else []:
            environment = {"GALMORPH_DECODE_MEMORY_BUDGET_BYTES": str(budget * MIB)}
            with serve(model, work, "--log-level", "warning", env=environment) as server:
                idle_rss = round(status_kib(server.process.pid, "VmRSS") / 1024, 1)
                per_budget: dict[str, Any] = {"idle_rss_mib": idle_rss}
                for name in args.cases:
                    figures = run_case(server, budget, name, args.clients)
                    per_budget[name] = figures
                    print(f"budget {budget} MiB", name, figures, flush=True)
                results[f"budget_{budget}_mib"] = per_budget
    payload = {
        "benchmark": "server peak RSS under concurrent worst-case allowed uploads",
        "model": f"tests/onnx_factory {spec}",
        "clients": args.clients,
        "decode_threads": "default (CPUs + 4, at most 32)",
        "slack_mib": SLACK_MIB,
        "results": results,
        "bodies": {
            "sizes": {key: getattr(args, key) for key in BODY_SIZES},
            "budget_mib": args.body_budget_mib or "default",
            **bodies,
        },
    }
    print(write_results(args.out, payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
