"""Slow and hostile clients against a real `galmorph serve` (uvicorn), over raw sockets.

The server runs with short limits (1 s for request heads, bodies and keep-alive, 8 KiB heads,
16 connections) so each test measures that a connection is closed within its limit, and
that the server keeps answering other clients meanwhile.
"""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from tests.support.cutout_factory import make_png
from tests.support.hostile_inputs import flat_png
from tests.support.onnx_factory import write_model
from tests.support.process_cost import status_kib
from tests.support.server_process import RunningServer, serve

pytestmark = pytest.mark.slow

HEADER_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 1.0
UPLOAD_TIMEOUT_S = 3.0
KEEP_ALIVE_S = 1
MAX_HEADER_BYTES = 8192
MAX_CONNECTIONS = 16
# Timers fire on a busy 2-core machine: allow this much beyond each limit.
SLACK_S = 1.5
LIMITS = {
    "GALMORPH_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
    "GALMORPH_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
    "GALMORPH_UPLOAD_TIMEOUT_S": str(UPLOAD_TIMEOUT_S),
    "GALMORPH_KEEP_ALIVE_TIMEOUT_S": str(KEEP_ALIVE_S),
    "GALMORPH_MAX_HEADER_BYTES": str(MAX_HEADER_BYTES),
    "GALMORPH_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("slow_model") / "model.onnx")


@pytest.fixture(scope="module")
def server(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with serve(model, tmp_path_factory.mktemp("slow"), env=LIMITS) as running:
        yield running


def connect(server: RunningServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=15)


def read_until_closed(connection: socket.socket) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and the seconds it took."""
    started = time.monotonic()
    received = b""
    try:
        while chunk := connection.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    return received, time.monotonic() - started


def read_response(connection: socket.socket) -> bytes:
    """One whole response (head and Content-Length body) from a kept-alive connection."""
    received = b""
    while b"\r\n\r\n" not in received:
        received += connection.recv(65536)
    head, _, body = received.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.lower().split(b"\r\n")
        if line.startswith(b"content-length:")
    )
    while len(body) < length:
        body += connection.recv(65536)
    return head + b"\r\n\r\n" + body


def assert_responsive(server: RunningServer) -> None:
    started = time.monotonic()
    response = httpx.get(f"{server.url}/healthz", timeout=5)
    assert response.status_code == 200
    assert time.monotonic() - started < 1.0, "the server is slow to answer others"


def test_a_connection_that_sends_nothing_is_closed(server: RunningServer) -> None:
    with connect(server) as idle:
        answer, waited = read_until_closed(idle)
    assert answer == b""
    assert HEADER_TIMEOUT_S - 0.2 <= waited <= HEADER_TIMEOUT_S + SLACK_S


def test_a_request_head_sent_a_byte_at_a_time_is_cut_off(server: RunningServer) -> None:
    # Each byte would have restarted uvicorn's own keep-alive timer: only a deadline for the
    # whole head stops this client.
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200
    with connect(server) as dripping:
        started = time.monotonic()
        sent = 0
        try:
            for byte in head:
                dripping.sendall(bytes([byte]))
                sent += 1
                time.sleep(0.1)
        except OSError:  # closed by the server
            pass
        answer, _ = read_until_closed(dripping)
        waited = time.monotonic() - started
    assert sent < len(head), "the server waited for the whole slow head"
    assert answer == b""
    assert waited <= HEADER_TIMEOUT_S + SLACK_S
    assert_responsive(server)


def test_half_sent_headers_then_silence_is_closed(server: RunningServer) -> None:
    with connect(server) as half:
        half.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n")
        answer, waited = read_until_closed(half)
    assert answer == b""
    assert waited <= HEADER_TIMEOUT_S + SLACK_S


def test_idle_keep_alive_connection_is_closed(server: RunningServer) -> None:
    with connect(server) as keep_alive:
        keep_alive.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        first = read_response(keep_alive)
        assert first.startswith(b"HTTP/1.1 200"), first[:100]
        rest, waited = read_until_closed(keep_alive)
    assert rest == b""
    assert waited <= KEEP_ALIVE_S + SLACK_S


def test_a_second_head_on_a_kept_alive_connection_has_a_deadline_too(
    server: RunningServer,
) -> None:
    with connect(server) as keep_alive:
        keep_alive.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(keep_alive).startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        try:
            for _ in range(40):  # a byte every 0.1 s: cancels the keep-alive timer each time
                keep_alive.sendall(b"G")
                time.sleep(0.1)
        except OSError:
            pass
        read_until_closed(keep_alive)
        waited = time.monotonic() - started
    assert waited <= HEADER_TIMEOUT_S + SLACK_S


def stalled_raw_upload() -> tuple[bytes, bytes]:
    body = make_png()
    head = (
        b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
    )
    return head, body[: len(body) // 2]


def stalled_batch_upload() -> tuple[bytes, bytes]:
    part = b'--b\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n\r\n'
    body = part + make_png() + b"\r\n--b--\r\n"
    head = (
        b"POST /classify/batch HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: multipart/form-data; boundary=b\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
    )
    return head, body[: len(body) // 2]


@pytest.mark.parametrize("upload", [stalled_raw_upload, stalled_batch_upload])
def test_a_stalled_upload_gets_408_and_is_closed(server: RunningServer, upload: object) -> None:
    assert callable(upload)
    head, partial_body = upload()
    with connect(server) as stalled:
        stalled.sendall(head + partial_body)
        answer, waited = read_until_closed(stalled)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"connection: close" in answer.lower()
    assert b"no part of the request body arrived for 1 s" in answer
    assert BODY_TIMEOUT_S - 0.2 <= waited <= BODY_TIMEOUT_S + SLACK_S
    assert_responsive(server)


def test_an_upload_trickling_in_is_cut_off_at_the_upload_timeout(server: RunningServer) -> None:
    head, body = stalled_raw_upload()
    with connect(server) as trickle:
        trickle.sendall(head)
        started = time.monotonic()
        try:
            for byte in body:  # a byte every 0.3 s: never a pause of the body timeout (1 s)
                trickle.sendall(bytes([byte]))
                time.sleep(0.3)
                if time.monotonic() - started > UPLOAD_TIMEOUT_S + SLACK_S + 2:
                    break
        except OSError:  # the server answered and closed
            pass
        answer, _ = read_until_closed(trickle)
        waited = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"was not complete within 3 s" in answer
    assert UPLOAD_TIMEOUT_S - 0.2 <= waited <= UPLOAD_TIMEOUT_S + SLACK_S
    assert_responsive(server)


def test_an_oversized_header_line_is_refused_after_the_limit(server: RunningServer) -> None:
    chunk = b"a" * 65536
    with connect(server) as huge:
        huge.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Huge: ")
        sent = 0
        try:
            while sent < 1024:  # 64 MiB of one header line
                huge.sendall(chunk)
                sent += 1
        except OSError:  # the server answered and closed
            pass
        answer, _ = read_until_closed(huge)
    assert sent < 64, f"the server read {sent * 64} KiB of one header line"
    # The 400 can be lost to the reset of a connection whose unread bytes were dropped.
    assert answer == b"" or answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert f"Request head over {MAX_HEADER_BYTES} bytes refused" in server.log()
    assert_responsive(server)


def test_normal_clients_are_served_while_slow_ones_wait(server: RunningServer) -> None:
    with ExitStack() as stack:
        for number in range(MAX_CONNECTIONS // 2):
            hostile = stack.enter_context(connect(server))
            if number % 2:
                hostile.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            else:
                head, partial = stalled_raw_upload()
                hostile.sendall(head + partial)
        for _ in range(5):
            response = httpx.post(f"{server.url}/classify", content=make_png(), timeout=5)
            assert response.status_code == 200, response.text
        assert_responsive(server)


def test_connections_beyond_the_cap_are_refused_until_the_slow_ones_are_closed(
    server: RunningServer,
) -> None:
    with ExitStack() as stack:
        for _ in range(MAX_CONNECTIONS):
            stack.enter_context(connect(server)).sendall(b"GET / HTTP/1.1\r\n")
        time.sleep(0.2)
        refused = httpx.get(f"{server.url}/healthz", timeout=5)
        assert refused.status_code == 503
        assert refused.headers["Retry-After"] == "1"
        time.sleep(HEADER_TIMEOUT_S + SLACK_S)  # the held connections are closed by now
        assert httpx.get(f"{server.url}/healthz", timeout=5).status_code == 200


def test_memory_a_burst_of_large_decodes_freed_goes_back_to_the_system(
    server: RunningServer,
) -> None:
    # 16-bit grey 8192^2 PNGs: glibc kept ~70 MiB of their decodes' freed buffers in its
    # heaps (measured) until the server's MemoryTrimmer gave them back.
    upload = flat_png(8192, colour_type=0, bit_depth=16)
    before = status_kib(server.process.pid, "VmRSS")
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: post_png(server, upload), range(4)))
    assert 200 in answers and set(answers) <= {200, 503}, answers
    deadline = time.monotonic() + 3  # the trimmer looks once a second
    while (grown := status_kib(server.process.pid, "VmRSS") - before) > 30 * 1024:
        assert time.monotonic() < deadline, f"RSS {grown / 1024:.0f} MiB over before the burst"
        time.sleep(0.25)


def post_png(server: RunningServer, upload: bytes) -> int:
    return httpx.post(f"{server.url}/classify", content=upload, timeout=60).status_code


def test_header_timeouts_are_counted(server: RunningServer) -> None:
    def closed_early() -> float:
        for line in httpx.get(f"{server.url}/metrics").text.splitlines():
            if line.startswith("galmorph_http_header_timeouts_total "):
                return float(line.split()[1])
        raise AssertionError("no galmorph_http_header_timeouts_total")

    before = closed_early()
    with connect(server) as idle:
        read_until_closed(idle)
    assert closed_early() == before + 1


def test_sigterm_answers_a_stalled_upload_503_without_a_traceback(
    model: Path, tmp_path: Path
) -> None:
    env = {
        **LIMITS,
        "GALMORPH_BODY_TIMEOUT_S": "60",
        "GALMORPH_UPLOAD_TIMEOUT_S": "60",
        "GALMORPH_GRACEFUL_SHUTDOWN_S": "4",
    }
    with serve(model, tmp_path, env=env) as server, ExitStack() as stack:
        stalled = stack.enter_context(connect(server))
        head, partial = stalled_raw_upload()
        stalled.sendall(head + partial)
        idle = stack.enter_context(connect(server))
        idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(idle).startswith(b"HTTP/1.1 200")
        time.sleep(0.3)  # the upload is being read

        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        answer, _ = read_until_closed(stalled)
        answered = time.monotonic() - started
        # uvicorn re-raises the signal it handled once it has shut down cleanly.
        assert server.process.wait(timeout=10) in (0, -signal.SIGTERM)
        stopped = time.monotonic() - started
        assert read_until_closed(idle)[0] == b""

    assert answer.startswith(b"HTTP/1.1 503"), answer[:300]
    assert b"server is shutting down" in answer and b"retry-after" in answer.lower()
    # Half the graceful-shutdown time for the upload to finish, then the answer.
    assert 1.5 <= answered <= 2 + SLACK_S
    assert stopped < 4, "shutdown waited for uvicorn to cancel the request"
    log = server.log()
    assert "Traceback" not in log and "Exception in ASGI application" not in log
    assert " 500" not in log and "Cancel" not in log
