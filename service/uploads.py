"""Reading uploads with the size limit enforced while the body streams in.

A declared Content-Length over the limit is refused before anything is read; otherwise bytes are
counted as they arrive and reading stops at the limit, so an oversized (or chunked, undeclared)
body is never buffered whole. Multipart bodies go through Starlette's parser fed by the same
counting stream (its own `max_part_size` covers only non-file fields); files over 1 MiB spool
to the temporary directory, and a full one is a 503, not a 500.

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
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

from galmorph.service.http_protocol import ConnectionPolicy, connection_policy
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request
from starlette.types import Message

logger = logging.getLogger(__name__)

# Boundaries and part headers around the file itself.
MULTIPART_OVERHEAD = 64 * 1024


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
    data: bytes
    filename: str | None
    content_type: str | None


def is_multipart(request: Request) -> bool:
    return request.headers.get("content-type", "").startswith("multipart/form-data")


async def limited_stream(request: Request, limit: int) -> AsyncGenerator[bytes, None]:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(limit)
    received = 0
    async for chunk in body_chunks(request, connection_policy(request.scope.get("state", {}))):
        received += len(chunk)
        if received > limit:
            raise PayloadTooLargeError(limit)
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


async def read_raw_body(request: Request, limit: int, filename: str | None) -> Upload:
    chunks = [chunk async for chunk in limited_stream(request, limit)]
    return Upload(b"".join(chunks), filename, request.headers.get("content-type"))


async def read_multipart_files(
    request: Request, *, field: str, total_limit: int, max_files: int
) -> list[tuple[str, UploadFile]]:
    """(field name, file) for every file part, in order; more than `max_files` is a 413.

    Every part must be a file named `field` (422 otherwise): nothing else is read, and a
    client that sends other fields learns they were not used.
    """
    parser = MultiPartParser(
        request.headers,
        limited_stream(request, total_limit),
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


async def to_upload(file: UploadFile, limit: int) -> Upload:
    if file.size is not None and file.size > limit:
        raise PayloadTooLargeError(limit, f"file {file.filename!r}")
    data = await file.read()
    await file.close()
    return Upload(data, file.filename, file.content_type)


async def read_single_upload(request: Request, limit: int, filename: str | None) -> Upload:
    """The cutout from a raw body (named `filename`), or from the multipart field `file`."""
    if not is_multipart(request):
        return await read_raw_body(request, limit, filename)
    files = await read_multipart_files(
        request, field="file", total_limit=limit + MULTIPART_OVERHEAD, max_files=1
    )
    if not files:
        raise UploadError("multipart body has no file part named 'file'")
    return await to_upload(files[0][1], limit)
