"""HTTP service throughput and latency vs the raw onnxruntime model, with and without batching.

Run from the repository root: `python -m benchmarks.bench_service [--model model.onnx]`
(results to benchmarks/results/service.json). What is measured:

1. raw: OnnxModel.predict on ready uint8 batches of size c in this process (median time per
   batch, images/s), timed right before and right after each service run;
2. service: `galmorph serve` as a separate process (same model, same onnxruntime threads),
   loaded by a minimal keep-alive HTTP client at concurrency c = 1, 8, 32 posting real 256x256
   Galaxy10 JPEGs (decode included), with micro-batching on (max batch 32, 2 ms delay) and
   off (max batch 1): requests/s, p50 and p99 latency, mean batch size the server formed;
3. ratios: service req/s at concurrency c over raw images/s at batch size c (target: >= 0.85
   at c = 8), and service p50 minus raw batch-1 median at c = 1 (target: <= 15 ms). Each
   level runs `--rounds` times (raw, service, raw); its figures are the median round's, and
   `round_fractions_of_raw` lists every round's ratio (one round moved by 0.05-0.1 with the
   neighbours' load on this shared machine).

The client shares the machine with the server (2 cores here), so the ratios include its cost:
each level records the client's and the server's CPU per request (`client_cpu_ms_per_request`,
`server_cpu_ms_per_request`), and the raw timings record their own (`cpu_ms_per_image`).
Model: --model PATH, or --astroformer-tiny (gm_astroformer_tiny exported by model/export.py
with seeded weights, as in bench_score), else the tests' onnx_factory model at 256 px (cheap:
~10 ms/image, so it shows the per-request overhead at its most visible).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks.bench_score import export_tiny_model
from benchmarks.common import REAL_DATA, RESULTS_DIR, write_results
from galmorph.core.modelfile.engine import OnnxModel
from tests.support.onnx_factory import FactoryModel, write_model
from tests.support.server_process import free_port

BATCHING = {"batching": ("32", "2"), "no_batching": ("1", "0")}  # max batch size, delay ms


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def time_raw(model: OnnxModel, batch: int, images_total: int) -> dict[str, Any]:
    """predict() on a ready uint8 batch: median and p99 per batch, images/s from the median."""
    height, width = model.input_size
    images = np.random.default_rng(batch).integers(0, 256, (batch, height, width, 3), np.uint8)
    for _ in range(2):
        model.predict(images)
    times = []
    cpu = time.process_time()
    for _ in range(max(5, images_total // batch)):
        start = time.perf_counter()
        model.predict(images)
        times.append(time.perf_counter() - start)
    cpu = time.process_time() - cpu
    median = statistics.median(times)
    return {
        "median_ms": round(median * 1e3, 3),
        "cpu_ms_per_image": round(cpu / (len(times) * batch) * 1e3, 3),
        "p99_ms": round(percentile(times, 99) * 1e3, 3),
        "images_per_s": round(batch / median, 2),
        "repeats": len(times),
    }


def start_server(
    model_path: Path, threads: int, batch: str, delay: str, log: Path, engine: str = "onnxruntime"
) -> tuple[str, subprocess.Popen[bytes]]:
    port = free_port()
    environment = {k: v for k, v in os.environ.items() if not k.startswith("GALMORPH_")}
    # Every load connection comes from this one address: the per-client cap (32) is for
    # fairness between clients, which this throughput measurement has only one of.
    environment["GALMORPH_MAX_CONNECTIONS_PER_CLIENT"] = "256"
    # A warmed-up connection waits at the start barrier for the slowest one (over 5 s with
    # astroformer_0 on a busy 2-core machine); the server must not close it as idle meanwhile.
    environment["GALMORPH_KEEP_ALIVE_TIMEOUT_S"] = "120"
    command = [
        *(sys.executable, "-m", "galmorph.cli", "serve", "--model", str(model_path)),
        *("--port", str(port), "--providers", "CPUExecutionProvider"),
        *("--threads", str(threads), "--max-batch-size", batch, "--max-delay-ms", delay),
        *("--max-queue", "1024", "--log-level", "warning", "--engine", engine),
    ]
    with log.open("wb") as handle:
        process = subprocess.Popen(
            command, stdout=handle, stderr=subprocess.STDOUT, env=environment
        )
    url = f"http://127.0.0.1:{port}"
    # Loading, compiling (openvino) and warming astroformer_0 up took over a minute here under
    # the neighbours' load.
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return url, process
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.terminate()
    raise RuntimeError(f"server did not become ready:\n{log.read_text()}")


class KeepAliveClient:
    """A minimal HTTP/1.1 keep-alive client: the load generator shares the CPU with the
    server, so it must cost far less per request than a full-featured client."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, host: str, port: int) -> KeepAliveClient:
        return cls(*await asyncio.open_connection(host, port))

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: bench\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        self.writer.write(head.encode() + body)
        status = int((await self.reader.readline()).split()[1])
        length = 0
        while (line := await self.reader.readline()) != b"\r\n":
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() == "content-length":
                length = int(value)
        return status, await self.reader.readexactly(length)

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of another process so far (Linux /proc; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # After the command name: state is field 3 of stat(5); utime and stime are 14 and 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def load(
    port: int,
    uploads: list[bytes],
    concurrency: int,
    requests: int,
    server_pid: int | None = None,
) -> dict[str, Any]:
    """`concurrency` connections posting back to back; timing starts once all have warmed up."""
    warmup = 3
    per_worker = max(1, requests // concurrency)
    latencies: list[float] = []
    batch_sizes: list[int] = []
    warm = asyncio.Barrier(concurrency + 1)

    async def worker(index: int) -> None:
        client = await KeepAliveClient.open("127.0.0.1", port)
        try:
            for i in range(warmup + per_worker):
                if i == warmup:
                    await warm.wait()
                data = uploads[(index * per_worker + i) % len(uploads)]
                start = time.perf_counter()
                status, body = await client.post("/classify?filename=cutout.jpg", data)
                elapsed = time.perf_counter() - start
                if status != 200:
                    raise RuntimeError(f"HTTP {status}: {body[:200]!r}")
                if i >= warmup:
                    latencies.append(elapsed)
                    batch_sizes.append(json.loads(body)["timings"]["batch_size"])
        except BaseException:
            await warm.abort()  # nobody waits forever for a worker that failed
            raise
        finally:
            await client.close()

    tasks = [asyncio.create_task(worker(i)) for i in range(concurrency)]
    try:
        await warm.wait()
    except asyncio.BrokenBarrierError:
        await asyncio.gather(*tasks)  # raises the worker's own error
    begin, client_cpu, server_cpu = time.perf_counter(), time.process_time(), None
    server_cpu_before = None if server_pid is None else process_cpu_s(server_pid)
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - begin
    client_cpu = time.process_time() - client_cpu
    server_cpu_after = None if server_pid is None else process_cpu_s(server_pid)
    if server_cpu_before is not None and server_cpu_after is not None:
        server_cpu = round((server_cpu_after - server_cpu_before) / len(latencies) * 1e3, 3)
    return {
        "requests": len(latencies),
        "requests_per_s": round(len(latencies) / wall, 2),
        "p50_ms": round(percentile(latencies, 50) * 1e3, 2),
        "p99_ms": round(percentile(latencies, 99) * 1e3, 2),
        "mean_batch_size": round(float(np.mean(batch_sizes)), 2),
        # The load generator's own CPU: on a small machine it takes cores the server lacks.
        "client_cpu_ms_per_request": round(client_cpu / len(latencies) * 1e3, 3),
        "server_cpu_ms_per_request": server_cpu,  # inference, decoding and HTTP together
    }


def one_round(
    raw_model: OnnxModel,
    port: int,
    uploads: list[bytes],
    concurrency: int,
    requests: int,
    server: subprocess.Popen[bytes],
) -> dict[str, Any]:
    """One service run between two raw timings: the machine is shared, and the ratio must
    compare like with like."""
    before = time_raw(raw_model, concurrency, requests)
    figures = asyncio.run(load(port, uploads, concurrency, requests, server.pid))
    after = time_raw(raw_model, concurrency, requests)
    raw_rate = (before["images_per_s"] + after["images_per_s"]) / 2
    raw_ms = (before["median_ms"] + after["median_ms"]) / 2
    figures["raw_before"], figures["raw_after"] = before, after
    figures["fraction_of_raw"] = round(figures["requests_per_s"] / raw_rate, 3)
    figures["p50_minus_raw_batch_ms"] = round(figures["p50_ms"] - raw_ms, 2)
    return figures


def compare_engines(
    model_path: Path, uploads: list[bytes], args: argparse.Namespace, work: Path
) -> dict[str, Any]:
    """One batching server per engine, up together; each level's rounds alternate between
    them (interleaved), and each engine's figures are its median round's."""
    batch, delay = BATCHING["batching"]
    servers: dict[str, tuple[str, subprocess.Popen[bytes]]] = {}
    levels: dict[str, Any] = {}
    try:
        for engine in args.engines:
            log = work / engine
            servers[engine] = start_server(model_path, args.threads, batch, delay, log, engine)
        for concurrency in args.concurrency:
            rounds: dict[str, list[dict[str, Any]]] = {engine: [] for engine in servers}
            for _ in range(args.rounds):
                for engine, (url, process) in servers.items():
                    port = int(url.rsplit(":", 1)[1])
                    figures = asyncio.run(
                        load(port, uploads, concurrency, args.requests, process.pid)
                    )
                    rounds[engine].append(figures)
                    print(engine, concurrency, figures, flush=True)
            medians = {
                engine: statistics.median(r["requests_per_s"] for r in runs)
                for engine, runs in rounds.items()
            }
            first = args.engines[0]
            levels[f"concurrency_{concurrency}"] = {
                "requests_per_s_median": medians,
                f"ratio_vs_{first}": {e: round(m / medians[first], 3) for e, m in medians.items()},
                "rounds": rounds,
            }
    finally:
        for _, process in servers.values():
            process.terminate()
            process.wait(timeout=15)
    return levels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", type=Path, help="exported galmorph ONNX model")
    source.add_argument(
        "--astroformer-tiny",
        action="store_true",
        help="export gm_astroformer_tiny (seeded weights, needs torch) and benchmark it",
    )
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    parser.add_argument("--requests", type=int, default=256, help="timed requests per level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=3, help="rounds per level (median)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "service.json")
    parser.add_argument(
        "--engines",
        nargs="+",
        choices=("onnxruntime", "openvino"),
        help="instead of the batching study: these engines' servers (batching on) in "
        "interleaved rounds, e.g. --engines onnxruntime openvino",
    )
    args = parser.parse_args(argv)

    uploads = [path.read_bytes() for path in sorted((REAL_DATA / "galaxy10-real").glob("*.jpg"))]
    if not uploads:
        raise SystemExit(f"no Galaxy10 JPEGs in {REAL_DATA / 'galaxy10-real'}")
    spec = FactoryModel(input_size=256, channels=16, extra_convs=6, model_name="bench")
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.astroformer_tiny:
            model_path, model_name = export_tiny_model(work)
        elif args.model:
            model_path, model_name = args.model, str(args.model)
        else:
            model_path = write_model(work / "bench.onnx", spec)
            model_name = f"tests/onnx_factory {spec}"
        if args.engines:
            levels = compare_engines(model_path, uploads, args, work)
            payload = {
                "benchmark": "HTTP service on each CPU engine, batching on, interleaved rounds",
                "model": model_name,
                "threads": args.threads,
                "requests_per_level": args.requests,
                "upload": "real Galaxy10 256x256 JPEGs (decode included), raw request body",
                "engines": levels,
            }
            print(write_results(args.out, payload))
            return 0
        raw_model = OnnxModel(
            model_path, providers=["CPUExecutionProvider"], intra_op_threads=args.threads
        )
        for mode, (batch, delay) in BATCHING.items():
            url, process = start_server(model_path, args.threads, batch, delay, work / "log")
            port = int(url.rsplit(":", 1)[1])
            try:
                for concurrency in args.concurrency:
                    rounds = [
                        one_round(raw_model, port, uploads, concurrency, args.requests, process)
                        for _ in range(args.rounds)
                    ]
                    rounds.sort(key=lambda measured: measured["fraction_of_raw"])
                    figures = rounds[len(rounds) // 2]
                    figures["round_fractions_of_raw"] = [r["fraction_of_raw"] for r in rounds]
                    results.setdefault(mode, {})[f"concurrency_{concurrency}"] = figures
                    summary = {k: v for k, v in figures.items() if "raw_" not in k}
                    print(mode, concurrency, summary, flush=True)
            finally:
                process.terminate()
                process.wait(timeout=15)
    batched = results["batching"]
    payload = {
        "benchmark": "HTTP service vs raw onnxruntime, with and without micro-batching",
        "model": model_name,
        "onnxruntime_threads": args.threads,
        "upload": "real Galaxy10 256x256 JPEGs (decode included), raw request body",
        "batching_settings": {
            mode: {"max_batch_size": b, "max_delay_ms": d} for mode, (b, d) in BATCHING.items()
        },
        "service": results,
        "targets": {
            "c8_fraction_of_raw_batch8": batched.get("concurrency_8", {}).get("fraction_of_raw"),
            "c8_target": 0.85,
            "c1_p50_minus_raw_ms": batched.get("concurrency_1", {}).get("p50_minus_raw_batch_ms"),
            "c1_target_ms": 15,
        },
    }
    print(write_results(args.out, payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
