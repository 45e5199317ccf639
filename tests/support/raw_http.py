"""HTTP/1.1 by hand on a socket, for clients a library would not be: a request whose head is
sent and whose body is held back until the server has had the chance to answer (an answer
that comes first was given before the body was read), header bytes outside ASCII, bodies
streamed from one small buffer."""

from __future__ import annotations

import json
import select
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

MIB = 2**20
Piece = bytes | memoryview
JUNK = memoryview(b"\x01junk" * (MIB // 5 + 1))[:MIB]  # no cutout format: 415 once read


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    body_sent: bool  # False: answered before the client sent its body
    # status 0: the connection was reset before any answer came

    def json(self) -> dict[str, str]:
        document: dict[str, str] = json.loads(self.body)
        return document


def request_head(
    path: str, length: int, headers: dict[str, bytes] | None = None, content_type: str = ""
) -> bytes:
    lines = [f"POST {path} HTTP/1.1".encode(), b"Host: 127.0.0.1", b"Content-Length: %d" % length]
    if content_type:
        lines.append(f"Content-Type: {content_type}".encode())
    lines += [name.encode() + b": " + value for name, value in (headers or {}).items()]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def exchange(
    port: int, head: bytes, body: Iterable[Piece] = (), early_s: float = 1.0, timeout_s: float = 60
) -> Answer:
    """Send the head, wait up to `early_s` for an answer given before the body, else send the
    body; the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(head)
        answered_early = bool(select.select([sock], [], [], early_s)[0])
        if not answered_early:
            try:
                for part in body:
                    sock.sendall(part)
            except OSError:  # answered and closed while the body was being sent
                pass
        received = b""
        while True:
            try:
                piece = sock.recv(1 << 16)
            except OSError:
                break
            if not piece:
                break
            received += piece
            if complete(received):
                break
    if not received:  # the connection was reset before any answer
        return Answer(0, {}, b"", not answered_early)
    head_text, _, content = received.partition(b"\r\n\r\n")
    status_line, *header_lines = head_text.decode("latin-1").split("\r\n")
    headers = {
        name.lower(): value.strip()
        for name, _, value in (line.partition(":") for line in header_lines)
    }
    return Answer(int(status_line.split()[1]), headers, content, not answered_early)


def complete(received: bytes) -> bool:
    head, separator, content = received.partition(b"\r\n\r\n")
    if not separator:
        return False
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(content) >= int(value)
    return False


def junk(size: int) -> Iterator[Piece]:
    while size > 0:
        yield JUNK[: min(size, len(JUNK))]
        size -= len(JUNK)
