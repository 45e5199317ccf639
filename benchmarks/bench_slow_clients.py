"""Latency of normal clients while hostile ones hold connections to `galmorph serve`.

Run from the repository root: `python -m benchmarks.bench_slow_clients` (results to
benchmarks/results/slow_clients.json). The server runs with its default limits (request head
within 10 s, body pauses under 30 s, 256 connections) and no proxy in front: this measures
uvicorn and galmorph's own defences. Three conditions:

1. quiet: only the normal clients (keep-alive connections posting real Galaxy10 JPEGs back to
   back, the tests' cheap 64 px model, so per-request overhead is at its most visible);
2. hostile: the same clients while slow-loris clients send a request head a header line at a
   time and stalled uploads send a head and 1 KiB of a 1 MiB body, then nothing; each
   reconnects at once when the server closes it. Each hostile connection comes from an
   address of its own (127.0.1.x: all of 127/8 is loopback), as many slow clients would. The
   normal clients run from 7 to 13 s into the attack, so the window includes the head
   deadline closing every slow-loris connection and their reconnecting. Quiet and hostile
   alternate in rounds so load from a neighbour on this shared machine falls on both;
3. flood: one client (127.0.0.2) opens more slow-loris connections than the server's whole
   connection cap and reopens each one refused at once. The server keeps its
   `max_connections_per_client` and refuses the rest with 503 and Retry-After (after a 1 s
   pause, which slows the reopening), so the normal clients (127.0.0.1) are still served.

Target: p99 latency under hostile load at most twice the quiet p99.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.bench_service import KeepAliveClient
from benchmarks.common import REPO_ROOT, RESULTS_DIR, write_results
from galmorph.service.settings import Settings
from tests.support.onnx_factory import write_model
from tests.support.server_process import serve

REAL_JPEGS = REPO_ROOT / "tests" / "data" / "galaxy10-real"
DRIP_S = 1.0  # a slow-loris client sends one header line this often
TARGET_P99_RATIO = 2.0


class Hostiles:
    """Slow-loris and stalled-upload clients that reconnect whenever the server hangs up."""

    def __init__(self, port: int, addresses: Callable[[int], str]) -> None:
        self.port = port
        self.address = addresses  # the client address of hostile connection i
        self.stop = asyncio.Event()
        self.connected = 0
        self.closed_by_server: Counter[str] = Counter()
        self.answers: Counter[str] = Counter()

    async def _hold(self, index: int, kind: str, first: bytes, then: bytes | None) -> None:
        """One connection at a time: send `first`, then `then` every DRIP_S (or nothing)."""
        while not self.stop.is_set():
            try:
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", self.port, local_addr=(self.address(index), 0)
                )
            except OSError:
                await asyncio.sleep(0.1)
                continue
            self.connected += 1
            answer = b""
            try:
                writer.write(first)
                reading = asyncio.ensure_future(reader.read(65536))
                while not self.stop.is_set():
                    done, _ = await asyncio.wait({reading}, timeout=DRIP_S)
                    if done:
                        answer = reading.result()
                        break
                    if then is not None:
                        writer.write(then)
                reading.cancel()
            except OSError:
                pass
            finally:
                self.connected -= 1
                writer.close()
            if not self.stop.is_set():
                self.closed_by_server[kind] += 1
                status = answer.split(b" ", 2)[1].decode() if answer else "closed"
                self.answers[f"{kind} {status}"] += 1

    def start(self, loris: int, stalled: int) -> list[asyncio.Task[None]]:
        head = b"POST /classify HTTP/1.1\r\nHost: bench\r\nContent-Type: image/jpeg\r\n"
        upload = head + b"Content-Length: 1048576\r\n\r\n" + b"\xff" * 1024
        loop = asyncio.get_running_loop()
        holds = [("slow_loris", head, b"X-Slow: 1\r\n")] * loris
        holds += [("stalled_upload", upload, None)] * stalled
        return [loop.create_task(self._hold(i, *hold)) for i, hold in enumerate(holds)]

    async def wait_connected(self, count: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.connected < count and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def finish(self, tasks: list[asyncio.Task[None]]) -> None:
        self.stop.set()
        await asyncio.gather(*tasks)


async def normal_clients(
    port: int, uploads: list[bytes], clients: int, seconds: float
) -> tuple[list[float], Counter[int]]:
    """`clients` keep-alive connections posting back to back for `seconds`; latencies of the
    200s."""
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    until = time.monotonic() + seconds

    async def client(index: int) -> None:
        connection = await KeepAliveClient.open("127.0.0.1", port)
        i = 0
        try:
            while time.monotonic() < until:
                i += 1
                data = uploads[(index + i) % len(uploads)]
                started = time.perf_counter()
                try:
                    status, _ = await connection.post("/classify?filename=g.jpg", data)
                except (OSError, asyncio.IncompleteReadError, IndexError):
                    # Refused (503 with Connection: close): reconnect for the next request.
                    status = 503
                    await connection.close()
                    connection = await KeepAliveClient.open("127.0.0.1", port)
                statuses[status] += 1
                if status == 200:
                    latencies.append(time.perf_counter() - started)
                elif status == 503:
                    await connection.close()
                    connection = await KeepAliveClient.open("127.0.0.1", port)
        finally:
            await connection.close()

    await asyncio.gather(*(client(i) for i in range(clients)))
    return latencies, statuses


def summary(latencies: list[float], statuses: Counter[int]) -> dict[str, Any]:
    values = np.asarray(latencies) * 1e3
    figures: dict[str, Any] = {"requests": sum(statuses.values()), "statuses": dict(statuses)}
    if values.size:
        figures |= {
            "p50_ms": round(float(np.percentile(values, 50)), 2),
            "p99_ms": round(float(np.percentile(values, 99)), 2),
            "max_ms": round(float(values.max()), 2),
        }
    return figures


async def measure(port: int, uploads: list[bytes], args: argparse.Namespace) -> dict[str, Any]:
    pooled: dict[str, tuple[list[float], Counter[int]]] = {
        "quiet": ([], Counter()),
        "hostile": ([], Counter()),
    }
    hostile_events: Counter[str] = Counter()
    await normal_clients(port, uploads, args.clients, 1.0)  # warm-up

    async def quiet() -> None:
        latencies, statuses = await normal_clients(port, uploads, args.clients, args.phase_s)
        pooled["quiet"][0].extend(latencies)
        pooled["quiet"][1].update(statuses)

    async def hostile() -> None:
        attackers = Hostiles(port, lambda i: f"127.0.{1 + i // 250}.{1 + i % 250}")
        tasks = attackers.start(args.loris, args.stalled)
        await attackers.wait_connected(args.loris + args.stalled)
        # Measure across the moment the head deadline cuts the slow-loris clients and they
        # all reconnect at once.
        await asyncio.sleep(args.attack_lead_s)
        latencies, statuses = await normal_clients(port, uploads, args.clients, args.phase_s)
        pooled["hostile"][0].extend(latencies)
        pooled["hostile"][1].update(statuses)
        await attackers.finish(tasks)
        hostile_events.update(attackers.answers)

    for round_number in range(args.rounds):
        phases: list[Callable[[], Awaitable[None]]] = [quiet, hostile]
        for phase in phases if round_number % 2 == 0 else phases[::-1]:
            await phase()
    results = {name: summary(*values) for name, values in pooled.items()}
    results["hostile"]["hostile_connections_closed_by_server"] = dict(hostile_events)

    flood = Hostiles(port, lambda _: "127.0.0.2")
    flood_size = Settings(_env_file=None).max_connections + 44  # type: ignore[call-arg]
    tasks = flood.start(flood_size, 0)
    await asyncio.sleep(2.0)
    flood_latencies, flood_statuses = await normal_clients(
        port, uploads, args.clients, args.phase_s
    )
    await flood.finish(tasks)
    results["flood"] = {
        "hostile_connections": flood_size,
        "hostile_connections_refused": dict(flood.answers),
        **summary(flood_latencies, flood_statuses),
    }
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4, help="normal keep-alive clients")
    parser.add_argument("--phase-s", type=float, default=6.0, help="seconds per phase")
    parser.add_argument("--rounds", type=int, default=4, help="quiet/hostile rounds")
    parser.add_argument("--loris", type=int, default=100, help="slow-loris connections")
    parser.add_argument("--stalled", type=int, default=50, help="stalled-upload connections")
    parser.add_argument(
        "--attack-lead-s",
        type=float,
        default=7.0,
        help="seconds the attack runs before the normal clients start",
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "slow_clients.json")
    args = parser.parse_args(argv)

    uploads = [path.read_bytes() for path in sorted(REAL_JPEGS.glob("*.jpg"))]
    if not uploads:
        raise SystemExit(f"no Galaxy10 JPEGs in {REAL_JPEGS}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with serve(write_model(work / "model.onnx"), work, "--log-level", "warning") as server:
            results = asyncio.run(measure(server.port, uploads, args))
            log_lines = server.log().splitlines()
    ratio = results["hostile"]["p99_ms"] / results["quiet"]["p99_ms"]
    payload = {
        "what": "normal clients' latency while slow-loris and stalled-upload clients hold "
        "connections to galmorph serve (no proxy), default limits",
        "settings": {
            "clients": args.clients,
            "phase_s": args.phase_s,
            "rounds": args.rounds,
            "slow_loris": args.loris,
            "stalled_uploads": args.stalled,
            "drip_s": DRIP_S,
            "attack_lead_s": args.attack_lead_s,
        },
        "server_limits": {
            name: value
            for name, value in Settings(_env_file=None).model_dump().items()  # type: ignore[call-arg]
            if name
            in (
                "header_timeout_s",
                "body_timeout_s",
                "keep_alive_timeout_s",
                "max_header_bytes",
                "max_connections",
                "max_connections_per_client",
            )
        },
        **results,
        "p99_ratio_hostile_over_quiet": round(ratio, 3),
        "target_p99_ratio": TARGET_P99_RATIO,
        "meets_target": ratio <= TARGET_P99_RATIO,
        "server_tracebacks": sum("Traceback" in line for line in log_lines),
    }
    write_results(args.out, payload)
    print(
        f"quiet p99 {results['quiet']['p99_ms']} ms, hostile p99 {results['hostile']['p99_ms']}"
        f" ms (ratio {ratio:.2f}, target <= {TARGET_P99_RATIO}); flood: "
        f"{results['flood']['statuses']}; wrote {args.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
