"""`galmorph serve`: process start to ready, and the server's memory after warm-up.

Each run launches the real server (`python -m galmorph serve`) on a free 127.0.0.1 port and
times from just before the process is spawned until GET /readyz first answers 200 (ready =
model loaded, warmed up at batch 1 and the maximum batch, provider verified). Then it sends a
few /classify requests and reads the server's resident memory (VmRSS, and the peak VmHWM) from
/proc, summed over the process and its children. Models: gm_astroformer_tiny (the demo
variant) and astroformer_0, 256x256, seeded random weights exported with model.export.
Results: benchmarks/results/startup.json.

With --engines, instead: the model load alone, in this process, per engine (issue #30):
onnxruntime (session + card), openvino (onnxruntime's fp32 session as the reference, the bf16
compile, the parity run on 8 images) and openvino with its parity result cached, in interleaved
rounds after one warm-up round, for astroformer_0 at 256 px and gm_astroformer_small at 128 px
(random weights). Results: benchmarks/results/startup_engines.json.

    .venv/bin/python -m benchmarks.bench_startup [--runs 5] [--threads 2]
    .venv/bin/python -m benchmarks.bench_startup --engines [--runs 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import io
import json
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
# (model, input size) for --engines: the benchmark model and the real-data recipe's model.
ENGINE_MODELS = (("astroformer_0", 256), ("gm_astroformer_small", 128))
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


def engine_loads(model: Path, runs: int, threads: int, cache: Path) -> dict[str, Any]:
    """Seconds to open `model` on each engine: one warm-up round (imports, first compile, the
    parity cache filled), then `runs` interleaved rounds."""
    from galmorph.core.modelfile.engine_choice import open_model
    from galmorph.core.modelfile.openvino_engine import PARITY_CACHE_ENV

    def load(engine: str, parity_cache: str) -> tuple[float, bool]:
        """(seconds, whether the parity result came from the cache)."""
        os.environ[PARITY_CACHE_ENV] = parity_cache
        started = time.perf_counter()
        opened = open_model(model, engine=engine, intra_op_threads=threads, inter_op_threads=1)
        seconds = time.perf_counter() - started
        return seconds, bool(opened.engine_report().get("parity_cached"))

    contenders = {
        "onnxruntime": ("onnxruntime", "off"),
        "openvino_parity_at_load": ("openvino", "off"),
        "openvino_parity_cached": ("openvino", str(cache)),
    }
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for round_index in range(runs + 1):
        for name, (engine, parity_cache) in contenders.items():
            seconds, cached = load(engine, parity_cache)
            if round_index:  # round 0 warms up (and fills the cache)
                assert cached == (name == "openvino_parity_cached"), (name, cached)
                times[name].append(seconds)
    figures: dict[str, Any] = {name: summarise(values) for name, values in times.items()}
    baseline = figures["onnxruntime"]["median"]
    figures["ratio_to_onnxruntime"] = {
        name: round(figures[name]["median"] / baseline, 2) for name in contenders
    }
    return figures


def measure_engines(args: argparse.Namespace) -> int:
    from benchmarks.bench_models import make_checkpoint, timed_export

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="galmorph-engines-") as tmp:
        work = Path(tmp)
        for name, size in ENGINE_MODELS:
            run_dir = make_checkpoint(name, size, work / name / "run")
            model, _ = timed_export(run_dir, work / name / "model.onnx", args.threads)
            results[name] = {"img_size": size}
            results[name] |= engine_loads(model, args.runs, args.threads, work / "cache")
            print(f"{name} @{size}: " + json.dumps(results[name]), flush=True)
    out = args.out or RESULTS_DIR / "startup_engines.json"
    write_results(
        out,
        {
            "benchmark": "model load per engine, in process: seconds from open_model to return",
            "threads": args.threads,
            "runs": args.runs,
            "weights": "random initialisation (torch.manual_seed(0)), model.export fp32",
            "parity_images": "8 synthetic (the files have no sample images; 8 samples cost "
            "the same)",
            "models": results,
        },
    )
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="server starts (loads) per model")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    parser.add_argument("--img-size", type=int, default=256)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--engines", action="store_true", help="time model loads per engine")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.engines:
        return measure_engines(args)
    args.out = args.out or RESULTS_DIR / "startup.json"

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
