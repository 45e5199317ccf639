"""Decoding uploads within bounds the server sets: memory, threads and the request's time.

- Memory: a budget of bytes (`decode_memory_budget_bytes`) shared by every request body and
  every decode in the process. A body reserves its declared length (or each piece as it
  arrives, when chunked) before it is read (`MemoryBudget.claim_body`, held until the
  request is answered); the decoder reserves what it will need from the file's headers,
  before it reads or decompresses a pixel (`galmorph.core.cutouts.limits.Reserve`). When the
  budget cannot hold a reservation the request is refused at once with 503 and Retry-After
  (`DecodeBusyError`), and one that alone needs more than the whole budget gets 413. A
  reservation is returned when its body or decode is done with, however that ends.
- Threads: decodes run on their own pool of `decode_threads` threads, not on Starlette's
  shared pool (40 threads, also used to read uploads), so the CPU they take is bounded and
  a flood of heavy decodes cannot stall everything else the server does.
- Time: a decode counts against the request's `request_timeout_s`. A decode still waiting
  for a thread at the deadline never starts; one still running is abandoned (503), its
  thread and its reservation are freed when it ends.

The budget bounds live memory; for the process's RSS to follow it, freed decode buffers must
go back to the system. glibc raises its mmap threshold after each large free (up to 32 MiB),
and from then on buffers below it come from per-thread heaps that keep them: measured, RSS
grew by a whole decode for each decode thread that had run one. The server therefore fixes
the threshold at 4 MiB (mallopt; a no-op without glibc), so large buffers are mapped and
unmapped.
"""

from __future__ import annotations

import asyncio
import ctypes
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from functools import cache, partial
from typing import TypeVar, cast

from galmorph.core.cutouts.decode import DecodedCutout, decode_cutout
from galmorph.core.cutouts.limits import MIB, CutoutError, CutoutErrorKind, DecodeLimits, Reserve
from galmorph.core.modelfile.contract import ModelCard
from galmorph.service.batching import InferenceTimeoutError
from galmorph.service.uploads import PayloadTooLargeError, Upload

# Most decodes take well under a second; a refused client should come back soon.
BUSY_RETRY_AFTER_S = 1

T = TypeVar("T")
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD_BYTES = 4 * MIB


@cache
def map_large_buffers() -> bool:
    """Have glibc map (and unmap on free) every allocation from MMAP_THRESHOLD_BYTES up;
    False where the C library has no mallopt."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    return mallopt is not None and bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


class DecodeBusyError(Exception):
    """The decode budget cannot hold this upload now (503, retry after `retry_after_s`)."""

    def __init__(self, needed: int, available: int, capacity: int) -> None:
        super().__init__(
            f"server busy decoding other uploads: this one needs about {needed} bytes, "
            f"{available} of the {capacity}-byte decode budget are free; "
            f"retry after {BUSY_RETRY_AFTER_S} s"
        )
        self.retry_after_s = BUSY_RETRY_AFTER_S


class BodyBusyError(DecodeBusyError):
    """The budget cannot hold this request body now: refused before it is read (503; the
    connection is closed, the unread body would otherwise have to be read and thrown away)."""

    def __init__(self, needed: int, available: int, capacity: int) -> None:
        Exception.__init__(
            self,
            f"server busy with other uploads: this request body needs {needed} bytes, "
            f"{available} of the {capacity}-byte decode budget (bodies and decodes) are free; "
            f"retry after {BUSY_RETRY_AFTER_S} s",
        )
        self.retry_after_s = BUSY_RETRY_AFTER_S


def _decode_too_large(needed: int, what: str, capacity: int) -> Exception:
    return CutoutError(
        CutoutErrorKind.TOO_LARGE,
        f"{what} needs about {needed} bytes to decode, more than the "
        f"server's decode memory budget of {capacity} bytes",
    )


def _body_too_large(needed: int, what: str, capacity: int) -> Exception:
    return PayloadTooLargeError(capacity, f"{what} of {needed} bytes (the memory budget)")


class MemoryBudget:
    """Bytes that request bodies and decodes in flight may reserve, together (thread-safe)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._used = 0
        self._lock = threading.Lock()

    @property
    def used(self) -> int:
        return self._used

    def claim(self) -> AbstractContextManager[Reserve]:
        """A `Reserve` for one decode; everything it reserved is returned on exit. Over the
        whole budget: CutoutError (413); over what is free now: DecodeBusyError (503)."""
        return self._claim(_decode_too_large, DecodeBusyError)

    def claim_body(self) -> AbstractContextManager[Reserve]:
        """A `Reserve` for one request's body bytes: PayloadTooLargeError (413) over the
        whole budget, BodyBusyError (503) over what is free now."""
        return self._claim(_body_too_large, BodyBusyError)

    @contextmanager
    def _claim(
        self,
        too_large: Callable[[int, str, int], Exception],
        busy: Callable[[int, int, int], DecodeBusyError],
    ) -> Iterator[Reserve]:
        held = 0

        def reserve(nbytes: int, what: str) -> None:
            nonlocal held
            with self._lock:
                if held + nbytes > self.capacity:
                    raise too_large(held + nbytes, what, self.capacity)
                if self._used + nbytes > self.capacity:
                    raise busy(nbytes, self.capacity - self._used, self.capacity)
                self._used += nbytes
                held += nbytes

        try:
            yield reserve
        finally:
            with self._lock:
                self._used -= held


@dataclass(frozen=True)
class DecodeRequest:
    upload: Upload
    card: ModelCard
    stretch: str | None
    fit: str | None
    limits: DecodeLimits


class Decoder:
    """The server's decodes: its memory budget, its threads, each request's deadline."""

    def __init__(self, budget_bytes: int, threads: int) -> None:
        map_large_buffers()
        self.budget = MemoryBudget(budget_bytes)
        self._threads = threads
        self._pool: ThreadPoolExecutor | None = None

    async def decode(self, request: DecodeRequest, deadline: float) -> DecodedCutout:
        """Decode on the pool by `deadline` (time.monotonic()); raises CutoutError,
        DecodeBusyError or InferenceTimeoutError."""
        return await self.run(partial(_decode, request), deadline)

    async def run(self, work: Callable[[Reserve], T], deadline: float) -> T:
        """`work(reserve)` on the pool by `deadline`, paying for its memory from the budget
        through `reserve`; raises what `work` raises, DecodeBusyError or
        InferenceTimeoutError."""
        if self._pool is None:  # first decode of this app's life (only the loop thread gets here)
            self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="galmorph-decode")
        job = self._pool.submit(self._run, work, deadline)
        try:
            return await asyncio.wait_for(
                asyncio.wrap_future(job), timeout=max(0.0, deadline - time.monotonic())
            )
        except TimeoutError:
            job.cancel()  # a decode still queued never starts
            raise _deadline_error("decoding") from None

    def _run(self, work: Callable[[Reserve], T], deadline: float) -> T:
        if time.monotonic() >= deadline:  # waited for a thread past the deadline
            raise _deadline_error("decoding")
        with self.budget.claim() as reserve:
            return work(reserve)

    def shutdown(self) -> None:
        """Drop queued decodes and let running ones finish; a later decode starts a new pool."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def _decode(request: DecodeRequest, reserve: Reserve) -> DecodedCutout:
    data = request.upload.data
    if isinstance(data, memoryview):  # a file inside a larger body: the decoders read bytes
        reserve(data.nbytes, "a copy of the file")
        data = data.tobytes()
    upload = request.upload
    return decode_cutout(
        # A bytearray (a raw body, read into one buffer) has every bytes method the decoders
        # use; converting it would copy the whole upload.
        cast(bytes, data),
        spec=request.card.input_spec,
        filename=upload.filename,
        content_type=upload.content_type,
        stretch=request.stretch,
        fit=request.fit,
        limits=request.limits,
        reserve=reserve,
    )


def _deadline_error(stage: str) -> InferenceTimeoutError:
    return InferenceTimeoutError(
        f"{stage} did not finish within the request timeout (server overloaded)"
    )


async def within_deadline(awaitable: Awaitable[T], deadline: float) -> T:
    """Await `awaitable` until `deadline` (time.monotonic()); InferenceTimeoutError after."""
    remaining = deadline - time.monotonic()
    try:
        return await asyncio.wait_for(awaitable, timeout=max(0.0, remaining))
    except TimeoutError:
        raise _deadline_error("queue and inference") from None
