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
  jpeg_progressive_8192   progressive 8192^2 JPEG (decoded at 1/8, coefficients ~193 MiB)
  fits_gz_cube_4096_resize   3 x 4096^2 float32 gzip cube with fit=resize (whole image read)
  fits_gz_cube_4096   the same cube, default fit (only the model's field is read)

    .venv/bin/python -m benchmarks.bench_hostile [--budgets-mib 1024 512] [--clients 16]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import RESULTS_DIR, write_results
from tests.hostile_inputs import flat_gzip_cube, flat_jpeg, flat_png
from tests.onnx_factory import FactoryModel, write_model
from tests.process_cost import measured, status_kib
from tests.server_process import RunningServer, serve

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets-mib", type=int, nargs="+", default=[1024, 512])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "hostile.json")
    args = parser.parse_args(argv)

    spec = FactoryModel(input_size=256, channels=8, model_name="bench")
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = write_model(work / "bench.onnx", spec)
        for budget in args.budgets_mib:
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
    }
    print(write_results(args.out, payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
