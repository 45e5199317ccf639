"""Run `galmorph serve` as a real process on a free 127.0.0.1 port (for socket-level tests)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass(frozen=True)
class RunningServer:
    url: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def serve(
    model: Path,
    log_dir: Path,
    *args: str,
    env: dict[str, str] | None = None,
    providers: str | None = "CPUExecutionProvider",
    up_when: str = "/readyz",
) -> Iterator[RunningServer]:
    """Start the server, wait until `up_when` answers 200, stop it afterwards.

    providers None: serve's default (CUDA first where an NVIDIA driver is); up_when /healthz:
    the process is up, model or not.
    """
    port = free_port()
    log_path = log_dir / f"serve_{port}.log"
    # GALMORPH_ENGINE stays: tests/conftest.py pins the fp32 engine the answers are checked with.
    environment = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("GALMORPH_") or key == "GALMORPH_ENGINE"
    }
    environment.update(env or {})
    command = [
        *(sys.executable, "-m", "galmorph.cli", "serve"),
        *("--model", str(model), "--port", str(port), "--host", "127.0.0.1"),
        *(("--providers", providers) if providers else ()),
        *("--threads", "1"),
        *args,
    ]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=environment, cwd=log_dir
        )
    server = RunningServer(f"http://127.0.0.1:{port}", port, process, log_path)
    try:
        wait_ready(server, path=up_when)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_ready(server: RunningServer, timeout: float = 60.0, path: str = "/readyz") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited with {server.process.returncode}:\n{server.log()}")
        try:
            if httpx.get(f"{server.url}{path}", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"server not ready after {timeout} s:\n{server.log()}")
