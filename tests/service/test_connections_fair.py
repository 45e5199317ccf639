"""Connections shared fairly, and the request-head limit however a head arrives, against a real
`galmorph serve` (uvicorn) over raw sockets.

Clients are told apart by their address: the whole of 127.0.0.0/8 is loopback on Linux, so a
socket bound to 127.0.0.2 is another client than one from 127.0.0.1.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack

import httpx
import pytest

from galmorph.service.http_protocol import REFUSAL_DELAY_S
from tests.support.onnx_factory import write_model
from tests.support.server_process import RunningServer, serve

pytestmark = pytest.mark.slow

MAX_CONNECTIONS = 16
PER_CLIENT = 4
MAX_HEADER_BYTES = 16384  # the default
LIMITS = {
    "GALMORPH_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
    "GALMORPH_MAX_CONNECTIONS_PER_CLIENT": str(PER_CLIENT),
    # Idle sockets stay open for the length of a test.
    "GALMORPH_HEADER_TIMEOUT_S": "20",
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    work = tmp_path_factory.mktemp("fair")
    with serve(write_model(work / "model.onnx"), work, env=LIMITS) as running:
        yield running


def connect(server: RunningServer, client: str) -> socket.socket:
    return socket.create_connection(
        ("127.0.0.1", server.port), timeout=10, source_address=(client, 0)
    )


def get(server: RunningServer, client: str, path: str = "/healthz") -> httpx.Response:
    transport = httpx.HTTPTransport(local_address=client)
    with httpx.Client(transport=transport, timeout=10) as http:
        return http.get(f"{server.url}{path}")


def read_until_closed(connection: socket.socket) -> bytes:
    received = b""
    try:
        while chunk := connection.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    return received


def held(connections: list[socket.socket]) -> tuple[list[socket.socket], list[bytes]]:
    """The connections the server kept open, and the answers on those it refused."""
    time.sleep(REFUSAL_DELAY_S + 0.5)  # every refusal has been answered
    kept, refusals = [], []
    for connection in connections:
        connection.settimeout(0.5)
        try:
            answer = read_until_closed(connection)
        except TimeoutError:
            kept.append(connection)
            continue
        refusals.append(answer)
    return kept, refusals


def assert_refused_503(answer: bytes, reason: str) -> None:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.lower().split(b"\r\n")
    assert lines[0] == b"http/1.1 503 service unavailable", answer[:300]
    assert b"retry-after: 1" in lines and b"connection: close" in lines
    assert reason in json.loads(body)["detail"]


def test_one_client_holding_idle_sockets_leaves_room_for_the_others(
    server: RunningServer,
) -> None:
    with ExitStack() as stack:
        # More idle sockets than the whole server's cap, from one address.
        hog = [
            stack.enter_context(connect(server, "127.0.0.2")) for _ in range(MAX_CONNECTIONS + 4)
        ]
        time.sleep(0.3)
        for _ in range(10):
            response = get(server, "127.0.0.1")
            assert response.status_code == 200, response.text
        kept, refusals = held(hog)
        assert len(kept) == PER_CLIENT
        assert len(refusals) == MAX_CONNECTIONS + 4 - PER_CLIENT
        for answer in refusals:
            assert_refused_503(answer, "limit for one client")


def test_a_client_over_its_cap_is_refused_with_retry_after_then_served(
    server: RunningServer,
) -> None:
    with ExitStack() as stack:
        for _ in range(PER_CLIENT):
            stack.enter_context(connect(server, "127.0.0.3"))
        time.sleep(0.2)
        started = time.monotonic()
        refused = get(server, "127.0.0.3")
        # After a pause: a client reopening refused connections at once is slowed down.
        assert time.monotonic() - started >= REFUSAL_DELAY_S - 0.1
        assert refused.status_code == 503
        assert refused.headers["Retry-After"] == "1"
        assert "limit for one client" in refused.json()["detail"]
        assert get(server, "127.0.0.4").status_code == 200  # another client meanwhile
    time.sleep(0.3)  # the server sees the held connections closed
    assert get(server, "127.0.0.3").status_code == 200


def test_the_server_cap_answers_503_with_retry_after(server: RunningServer) -> None:
    with ExitStack() as stack:
        for client in range(MAX_CONNECTIONS // PER_CLIENT):
            for _ in range(PER_CLIENT):
                stack.enter_context(connect(server, f"127.0.1.{client + 1}"))
        time.sleep(0.3)
        refused = get(server, "127.0.2.1")
        assert refused.status_code == 503
        assert refused.headers["Retry-After"] == "1"
        assert f"its limit of {MAX_CONNECTIONS} connections" in refused.json()["detail"]
    time.sleep(0.3)
    assert get(server, "127.0.2.1").status_code == 200


def head_of(pad: int) -> bytes:
    return b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * pad + b"\r\n\r\n"


@pytest.mark.parametrize("size", [17_000, 80_000])
def test_a_long_head_sent_in_one_write_is_refused(server: RunningServer, size: int) -> None:
    with connect(server, "127.0.0.5") as connection:
        connection.sendall(head_of(size))
        answer = read_until_closed(connection)
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), answer[:300]
    assert f"over {MAX_HEADER_BYTES} bytes".encode() in answer
    assert b"retry-after" not in answer.lower()


def test_a_head_within_the_limit_in_one_write_is_served(server: RunningServer) -> None:
    with connect(server, "127.0.0.5") as connection:
        connection.sendall(head_of(MAX_HEADER_BYTES - 200))
        answer = connection.recv(65536)
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer[:300]


def test_a_long_head_with_its_blank_line_split_across_writes_is_refused(
    server: RunningServer,
) -> None:
    head = head_of(MAX_HEADER_BYTES)
    with connect(server, "127.0.0.5") as connection:
        connection.sendall(head[:-3])
        time.sleep(0.2)
        connection.sendall(head[-3:])
        answer = read_until_closed(connection)
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), answer[:300]


def test_a_long_pipelined_head_is_refused_after_the_first_answer(server: RunningServer) -> None:
    with connect(server, "127.0.0.5") as connection:
        connection.sendall(head_of(10) + head_of(40_000))
        answer = read_until_closed(connection)
    first, _, rest = answer.partition(b"HTTP/1.1 400 Bad Request\r\n")
    assert first.startswith(b"HTTP/1.1 200 OK\r\n"), answer[:300]
    assert b"pipelined request head is over" in rest


def test_the_log_has_no_traceback(server: RunningServer) -> None:
    log = server.log()
    assert "Traceback" not in log and "Exception in ASGI application" not in log
