"""Reading uploads with the size limit enforced while the body streams in.

A declared Content-Length over the limit is refused before anything is read; otherwise bytes are
counted as they arrive and reading stops at the limit, so an oversized (or chunked, undeclared)
body is never buffered whole. Multipart bodies go through Starlette's parser fed by the same
counting stream (its own `max_part_size` covers only non-file fields).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartParser
from starlette.requests import Request

# Boundaries and part headers around the file itself.
MULTIPART_OVERHEAD = 64 * 1024


class PayloadTooLargeError(Exception):
    def __init__(self, limit: int, what: str = "request body") -> None:
        super().__init__(f"{what} exceeds the limit of {limit} bytes")


class UploadError(Exception):
    """The request does not carry a cutout where one was expected (422)."""


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
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise PayloadTooLargeError(limit)
        yield chunk


async def read_raw_body(request: Request, limit: int, filename: str | None) -> Upload:
    chunks = [chunk async for chunk in limited_stream(request, limit)]
    return Upload(b"".join(chunks), filename, request.headers.get("content-type"))


async def read_multipart_files(
    request: Request, *, total_limit: int, max_files: int
) -> list[tuple[str, UploadFile]]:
    """(field name, file) for every file part, in order."""
    parser = MultiPartParser(
        request.headers,
        limited_stream(request, total_limit),
        max_files=max_files,
        max_fields=max_files,
    )
    form = await parser.parse()
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
    files = await read_multipart_files(request, total_limit=limit + MULTIPART_OVERHEAD, max_files=1)
    for name, file in files:
        if name == "file":
            return await to_upload(file, limit)
    raise UploadError("multipart body has no file part named 'file'")
