"""Reading uploads with the size limit enforced while the body streams in.

A declared Content-Length over the limit is refused before anything is read; otherwise bytes are
counted as they arrive and reading stops at the limit, so an oversized (or chunked, undeclared)
body is never buffered whole. Every body is paid for from the server's memory budget
(galmorph.service.decoding.MemoryBudget) through the `Reserve` its reader is given: the declared
length before the first byte is read, or each piece of a chunked body as it arrives; a raw
body is read into one buffer of that length (no list of pieces joined into a second copy),
and its first SNIFF_BYTES can be judged (`check_head`) before the rest is read or that buffer
made: a body of no cutout format is refused unread.
Multipart bodies go through Starlette's parser fed by the same counting stream (its own
`max_part_size` covers only non-file fields); files over 1 MiB spool to the temporary directory
(a tmpfs in the containers, so the spool is memory too: it counts as part of the body), a
full one is a 503, not a 500, and reading a spooled file into memory reserves its size again
until the spool is closed.

Each piece of the body must arrive within the policy's `body_timeout_s`, and the whole body
within its `upload_timeout_s` (408 otherwise: a body trickling in a byte at a time holds a
connection no longer than that), and
when the server starts shutting down an upload still arriving is answered 503 at once instead
of holding the shutdown (galmorph.service.http_protocol). uvicorn has no such timeout itself;
behind the proxy of docker/ slow bodies never reach it.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import tempfile
from collections.abc import AsyncGenerator, Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request
from starlette.types import Message

from galmorph.core.cutouts.formats import SNIFF_BYTES
from galmorph.core.cutouts.limits import Reserve
from galmorph.service.http_protocol import ConnectionPolicy, connection_policy

logger = logging.getLogger(__name__)

# Boundaries and part headers around the file itself.
MULTIPART_OVERHEAD = 64 * 1024


# The most digits a length header may have: 10**18 bytes is far past any limit, and int()
# of a longer string of digits costs time quadratic in its length.
MAX_LENGTH_DIGITS = 18


class HeaderValueError(Exception):
    """A request header this server reads holds something other than what it must (400)."""


class PayloadTooLargeError(Exception):
    def __init__(self, limit: int, what: str = "request body") -> None:
        super().__init__(f"{what} exceeds the limit of {limit} bytes")


class TooManyFilesError(PayloadTooLargeError):
    def __init__(self, limit: int) -> None:
        Exception.__init__(self, f"batch has more than the limit of {limit} files")


class UploadError(Exception):
    """The request does not carry a cutout where one was expected (422)."""


class BodyTimeoutError(Exception):
    """The client stopped sending the body (408)."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__(
            f"no part of the request body arrived for {timeout_s:g} s; the upload was abandoned"
        )


class UploadTimeoutError(BodyTimeoutError):
    """The body kept arriving, too slowly to be complete within the upload timeout (408)."""

    def __init__(self, timeout_s: float) -> None:
        Exception.__init__(
            self,
            f"the request body was not complete within {timeout_s:g} s; the upload was abandoned",
        )


class ServerDrainingError(Exception):
    """The server began shutting down while the body was still arriving (503)."""

    def __init__(self) -> None:
        super().__init__("server is shutting down; send the upload again")


class SpoolSpaceError(Exception):
    """The disk that multipart files spool to (beyond 1 MiB each) is full (503)."""

    def __init__(self) -> None:
        super().__init__(
            "the server has no room to hold the upload right now: try again shortly, "
            "or send one cutout as the raw request body"
        )


@dataclass(frozen=True)
class Upload:
    # A slice of a larger body stays a memoryview until its decode copies it
    # (galmorph.service.decoding); a raw body is the bytearray it was read into.
    data: bytes | bytearray | memoryview
    filename: str | None
    content_type: str | None


def is_multipart(request: Request) -> bool:
    return request.headers.get("content-type", "").startswith("multipart/form-data")


def parse_length(value: str, header: str) -> int:
    """A byte count sent in a header: ASCII digits only, at most MAX_LENGTH_DIGITS of them
    (str.isdigit() also accepts '²' and other digits int() refuses)."""
    if not (value.isascii() and value.isdigit() and len(value) <= MAX_LENGTH_DIGITS):
        shown = value if len(value) <= 40 else value[:40] + "..."
        raise HeaderValueError(
            f"{header} {shown!r} is not a byte count (1 to {MAX_LENGTH_DIGITS} ASCII digits)"
        )
    return int(value)


def declared_length(request: Request) -> int | None:
    """The body's Content-Length, None when it is not declared (chunked)."""
    value = request.headers.get("content-length")
    return None if value is None else parse_length(value, "Content-Length")


def admit_body(request: Request, limit: int, reserve: Reserve) -> int | None:
    """The declared length, once checked against `limit` and reserved (None: chunked)."""
    declared = declared_length(request)
    if declared is not None and declared > limit:
        raise PayloadTooLargeError(limit)
    if declared:
        reserve(declared, "request body")
    return declared


async def limited_stream(
    request: Request, limit: int, reserve: Reserve
) -> AsyncGenerator[bytes, None]:
    """The body's pieces, at most `limit` bytes in all, each paid for from `reserve` before
    it is read: the declared length at once, or each piece of a chunked body on arrival."""
    declared = admit_body(request, limit, reserve)
    async for chunk in _metered(request, limit, reserve, declared or 0):
        yield chunk


async def _metered(
    request: Request, limit: int, reserve: Reserve, reserved: int
) -> AsyncGenerator[bytes, None]:
    """The body's pieces, at most `limit` bytes; those beyond `reserved` reserved on arrival."""
    received = 0
    async for chunk in body_chunks(request, connection_policy(request.scope.get("state", {}))):
        received += len(chunk)
        if received > limit:
            raise PayloadTooLargeError(limit)
        if received > reserved:  # chunked (the server holds a declared body to its length)
            reserve(received - reserved, "request body")
            reserved = received
        yield chunk


async def body_chunks(
    request: Request, policy: ConnectionPolicy | None
) -> AsyncGenerator[bytes, None]:
    """The body as it arrives, each piece within the policy's timeout, until it is complete."""
    if policy is None:  # the app runs without its lifespan (no server settings to apply)
        async for chunk in request.stream():
            yield chunk
        return
    draining = asyncio.ensure_future(policy.draining.wait())
    deadline = asyncio.get_running_loop().time() + policy.upload_timeout_s
    try:
        while True:
            message = await _next_message(request, policy, draining, deadline)
            if message["type"] == "http.disconnect":
                raise ClientDisconnect()
            if chunk := message.get("body", b""):
                yield chunk
            if not message.get("more_body", False):
                return
    finally:
        draining.cancel()


async def _next_message(
    request: Request, policy: ConnectionPolicy, draining: asyncio.Future[Any], deadline: float
) -> Message:
    """The next ASGI message of the body; `deadline` (event-loop time) ends the whole upload."""
    receive = asyncio.ensure_future(request.receive())
    try:
        if not draining.done():
            left = deadline - asyncio.get_running_loop().time()
            done, _ = await asyncio.wait(
                (receive, draining),
                timeout=max(0.0, min(policy.body_timeout_s, left)),
                return_when=asyncio.FIRST_COMPLETED,
            )
            if receive in done:
                return receive.result()
            if draining not in done:
                if left <= policy.body_timeout_s:
                    raise UploadTimeoutError(policy.upload_timeout_s)
                raise BodyTimeoutError(policy.body_timeout_s)
        # Shutting down: the upload may go on until the drain deadline, then it is refused.
        left = policy.drain_deadline - asyncio.get_running_loop().time()
        done, _ = await asyncio.wait((receive,), timeout=max(0.0, min(left, policy.body_timeout_s)))
        if receive in done:
            return receive.result()
        raise ServerDrainingError()
    finally:
        receive.cancel()


HeadCheck = Callable[[bytes], object]
"""Sees a raw body's first SNIFF_BYTES while more of it may follow, and raises to refuse the
body before the rest is read."""


class BodyReader:
    """A body read in consecutive parts, each paid for from `reserve` before it is read (so a
    request can be refused on what its first part says before the rest arrives)."""

    def __init__(self, request: Request, limit: int, reserve: Reserve) -> None:
        self._pieces = body_chunks(request, connection_policy(request.scope.get("state", {})))
        self._limit = limit
        self._reserve = reserve
        self._left_over = b""  # what the last piece held beyond the part read
        self.received = 0

    async def read(self, size: int, what: str, check_head: HeadCheck | None = None) -> bytearray:
        """The next `size` bytes in one buffer (fewer when the body ends first); `check_head`
        sees their first SNIFF_BYTES before the rest is read or its buffer made."""
        self._reserve(size, what)
        if check_head is not None and size > SNIFF_BYTES:
            while len(self._left_over) < SNIFF_BYTES and (piece := await self._next_piece()):
                self._left_over += piece
            check_head(self._left_over[:SNIFF_BYTES])
        buffer = bytearray(size)
        filled = 0
        with memoryview(buffer) as view:
            while filled < size:
                piece = self._left_over or await self._next_piece()
                if not piece:
                    break
                taken = min(size - filled, len(piece))
                view[filled : filled + taken] = piece[:taken]
                self._left_over = piece[taken:]
                filled += taken
        if filled < size:
            del buffer[filled:]
        return buffer

    async def at_end(self) -> bool:
        """True when nothing follows what was read."""
        if not self._left_over:
            self._left_over = await self._next_piece()
        return not self._left_over

    async def aclose(self) -> None:
        await self._pieces.aclose()

    async def _next_piece(self) -> bytes:
        piece = await anext(self._pieces, b"")
        self.received += len(piece)
        if self.received > self._limit:
            raise PayloadTooLargeError(self._limit)
        return piece


async def read_raw_body(
    request: Request,
    limit: int,
    filename: str | None,
    reserve: Reserve,
    check_head: HeadCheck | None = None,
) -> Upload:
    body = await read_body(request, limit, reserve, check_head)
    return Upload(body, filename, request.headers.get("content-type"))


async def read_body(
    request: Request, limit: int, reserve: Reserve, check_head: HeadCheck | None = None
) -> bytearray:
    """The whole body in one buffer: made at the declared length (once that is reserved) and
    filled in place, or grown piece by piece when chunked. `check_head` sees the first
    SNIFF_BYTES of a body longer than that before the rest is read."""
    declared = declared_length(request)
    if declared is None:
        grown = bytearray()
        async for chunk in _metered(request, limit, reserve, 0):
            grown += chunk
            if check_head is not None and len(grown) >= SNIFF_BYTES:
                check_head(bytes(grown[:SNIFF_BYTES]))
                check_head = None
        return grown
    if declared > limit:
        raise PayloadTooLargeError(limit)
    reader = BodyReader(request, declared, reserve)
    try:
        return await reader.read(declared, "request body", check_head)
    finally:
        await reader.aclose()


async def read_multipart_files(
    request: Request, *, field: str, total_limit: int, max_files: int, reserve: Reserve
) -> list[tuple[str, UploadFile]]:
    """(field name, file) for every file part, in order; more than `max_files` is a 413.

    Every part must be a file named `field` (422 otherwise): nothing else is read, and a
    client that sends other fields learns they were not used.
    """
    parser = MultiPartParser(
        request.headers,
        limited_stream(request, total_limit, reserve),
        max_files=max_files,
        max_fields=max_files,
    )
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        # Starlette stops at the first file over its max_files, before reading that file.
        if exc.message.startswith("Too many files"):
            raise TooManyFilesError(max_files) from None
        raise
    except OSError as exc:
        # The deploy bounds its temporary space (docker/: a tmpfs), so concurrent large
        # uploads can fill it: that is the server's momentary capacity, not the client's error.
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        logger.warning("multipart upload refused: %s is full (%s)", tempfile.gettempdir(), exc)
        raise SpoolSpaceError() from None
    for name, value in form.multi_items():
        if name != field or not isinstance(value, UploadFile):
            await form.close()
            problem = "holds text, not a file" if name == field else "is not expected"
            raise UploadError(
                f"multipart part '{name}' {problem}: send each cutout as a file part "
                f"named '{field}', and nothing else"
            )
    return [(name, value) for name, value in form.multi_items() if isinstance(value, UploadFile)]


ClaimBody = Callable[[], AbstractContextManager[Reserve]]
"""A fresh reservation of body memory, returned on exit (MemoryBudget.claim_body)."""


async def to_upload(file: UploadFile, limit: int, claim: ClaimBody) -> Upload:
    """The file's bytes; while they are read the spooled copy still exists, so they are
    reserved again until it is closed (the body's own reservation covers them after)."""
    if file.size is not None and file.size > limit:
        raise PayloadTooLargeError(limit, f"file {file.filename!r}")
    with claim() as reserve:
        reserve(file.size or 0, f"file {file.filename!r}")
        data = await file.read()
        await file.close()
    return Upload(data, file.filename, file.content_type)


async def read_single_upload(
    request: Request,
    limit: int,
    filename: str | None,
    claim: ClaimBody,
    reserve: Reserve,
    check_head: HeadCheck | None = None,
) -> Upload:
    """The cutout from a raw body (named `filename`; `check_head` sees its start), or from
    the multipart field `file`; the body is paid for from `reserve`."""
    if not is_multipart(request):
        return await read_raw_body(request, limit, filename, reserve, check_head)
    files = await read_multipart_files(
        request, field="file", total_limit=limit + MULTIPART_OVERHEAD, max_files=1,
        reserve=reserve,
    )  # fmt: skip
    if not files:
        raise UploadError("multipart body has no file part named 'file'")
    return await to_upload(files[0][1], limit, claim)
