"""`galmorph serve`: process start to ready, and the server's memory after warm-up.

Each run launches the real server (`python -m galmorph serve`) on a free 127.0.0.1 port and
times from just before the process is spawned until GET /readyz first answers 200 (ready =
model loaded, warmed up at batch 1 and the maximum batch, provider verified). Then it sends a
few /classify requests and reads the server's resident memory (VmRSS, and the peak VmHWM) from
/proc, summed over the process and its children. Models: gm_astroformer_tiny (the demo
variant) and astroformer_0, 256x256, seeded random weights exported with model.export.
Results: benchmarks/results/startup.json.

    .venv/bin/python -m benchmarks.bench_startup [--runs 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import RESULTS_DIR, thread_env, write_results
from tests.support.server_process import free_port

MODELS = ("gm_astroformer_tiny", "astroformer_0")
READY_TIMEOUT_S = 120.0
POLL_INTERVAL_S = 0.02
WARM_REQUESTS = 8


def _status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None


def rss_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) in KiB, summed over pid and its descendants."""
    totals = {"VmRSS": 0, "VmHWM": 0}
    for process in [pid, *_descendants(pid)]:
        try:
            lines = Path(f"/proc/{process}/status").read_text().splitlines()
        except OSError:  # exited meanwhile
            continue
        for line in lines:
            key, _, value = line.partition(":")
            if key in totals:
                totals[key] += int(value.split()[0])
    return totals


def _descendants(pid: int) -> list[int]:
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return children + [grandchild for child in children for grandchild in _descendants(child)]


def sample_png(size: int) -> bytes:
    """A deterministic noise PNG at the model's input size (decoded like a Galaxy10 image)."""
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def classify(url: str, body: bytes) -> None:
    request = urllib.request.Request(
        f"{url}/classify",
        data=body,
        headers={"Content-Type": "application/octet-stream"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        if response.status != 200:
            raise RuntimeError(f"/classify answered {response.status}")


def one_start(model: Path, threads: int, png: bytes, log_dir: Path) -> dict[str, Any]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        *(sys.executable, "-m", "galmorph", "serve", "--model", str(model)),
        *("--host", "127.0.0.1", "--port", str(port), "--threads", str(threads)),
        *("--providers", "CPUExecutionProvider", "--log-level", "warning"),
    ]
    environment = {k: v for k, v in thread_env(threads).items() if not k.startswith("GALMORPH_")}
    log_path = log_dir / f"serve_{port}.log"
    with log_path.open("wb") as log:
        started = time.perf_counter()
        server = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=environment, cwd=log_dir
        )
    try:
        live_s = None
        while True:
            elapsed = time.perf_counter() - started
            if server.poll() is not None or elapsed > READY_TIMEOUT_S:
                raise RuntimeError(
                    f"server not ready after {elapsed:.1f} s (exit code {server.poll()}):\n"
                    + log_path.read_text(errors="replace")[-2000:]
                )
            if live_s is None and _status(f"{url}/healthz") == 200:
                live_s = elapsed
            if _status(f"{url}/readyz") == 200:
                ready_s = elapsed
                break
            time.sleep(POLL_INTERVAL_S)
        memory_ready = rss_kib(server.pid)
        for _ in range(WARM_REQUESTS):
            classify(url, png)
        memory_warm = rss_kib(server.pid)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    return {
        "live_s": None if live_s is None else round(live_s, 3),
        "ready_s": round(ready_s, 3),
        "rss_mib_at_ready": round(memory_ready["VmRSS"] / 1024, 1),
        "rss_mib_after_warm_requests": round(memory_warm["VmRSS"] / 1024, 1),
        "peak_rss_mib": round(memory_warm["VmHWM"] / 1024, 1),
    }


def summarise(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
    }


def measure_model(
    model: Path, runs: int, threads: int, img_size: int, log_dir: Path
) -> dict[str, Any]:
    png = sample_png(img_size)
    samples = [one_start(model, threads, png, log_dir) for _ in range(runs)]
    figures: dict[str, Any] = {"runs": runs, "artifact_bytes": model.stat().st_size}
    for key in ("ready_s", "rss_mib_at_ready", "rss_mib_after_warm_requests", "peak_rss_mib"):
        figures[key] = summarise([sample[key] for sample in samples])
    lives = [sample["live_s"] for sample in samples if sample["live_s"] is not None]
    if lives:
        figures["live_s"] = summarise(lives)
    figures["samples"] = samples
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="server starts per model")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    parser.add_argument("--img-size", type=int, default=256)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "startup.json")
    args = parser.parse_args(argv)

    from benchmarks.bench_models import make_checkpoint, timed_export

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="galmorph-startup-") as tmp:
        work = Path(tmp)
        for name in args.models:
            run_dir = make_checkpoint(name, args.img_size, work / name / "run")
            model, _ = timed_export(run_dir, work / name / "model.onnx", args.threads)
            results[name] = measure_model(model, args.runs, args.threads, args.img_size, work)
            ready = results[name]["ready_s"]
            print(
                f"{name}: start -> ready {ready['median']:.2f} s "
                f"(min {ready['min']:.2f}, max {ready['max']:.2f}), RSS after warm requests "
                f"{results[name]['rss_mib_after_warm_requests']['median']:.0f} MiB",
                flush=True,
            )
    write_results(
        args.out,
        {
            "benchmark": "galmorph serve: process start to /readyz 200, and memory",
            "threads": args.threads,
            "img_size": args.img_size,
            "cpu_count": os.cpu_count(),
            "weights": "random initialisation (torch.manual_seed(0)), model.export fp32",
            "warm_requests": WARM_REQUESTS,
            "models": results,
        },
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
