"""Decoding uploads within bounds the server sets: memory, threads and the request's time.

- Memory: a budget of bytes (`decode_memory_budget_bytes`) shared by every decode in the
  process. The decoder reserves what it will need from the file's headers, before it reads
  or decompresses a pixel (`galmorph.core.cutout_limits.Reserve`); when the budget cannot
  hold it the upload is refused at once with 503 and Retry-After (`DecodeBusyError`), and
  one that alone needs more than the whole budget gets 413. The reservation is returned
  when the decode ends, however it ends.
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
from collections.abc import Awaitable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from typing import TypeVar

from galmorph.service.batching import InferenceTimeoutError
from galmorph.service.uploads import Upload

from galmorph.core.contract import ModelCard
from galmorph.core.cutout_limits import MIB, CutoutError, CutoutErrorKind, DecodeLimits, Reserve
from galmorph.core.decode import DecodedCutout, decode_cutout

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


class MemoryBudget:
    """Bytes that decodes running at once may reserve, together (thread-safe)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._used = 0
        self._lock = threading.Lock()

    @property
    def used(self) -> int:
        return self._used

    @contextmanager
    def claim(self) -> Iterator[Reserve]:
        """A `Reserve` for one decode; everything it reserved is returned on exit."""
        held = 0

        def reserve(nbytes: int, what: str) -> None:
            nonlocal held
            with self._lock:
                if held + nbytes > self.capacity:
                    raise CutoutError(
                        CutoutErrorKind.TOO_LARGE,
                        f"{what} needs about {held + nbytes} bytes to decode, more than the "
                        f"server's decode memory budget of {self.capacity} bytes",
                    )
                if self._used + nbytes > self.capacity:
                    raise DecodeBusyError(nbytes, self.capacity - self._used, self.capacity)
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
        if self._pool is None:  # first decode of this app's life (only the loop thread gets here)
            self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="galmorph-decode")
        job = self._pool.submit(self._run, request, deadline)
        try:
            return await asyncio.wait_for(
                asyncio.wrap_future(job), timeout=max(0.0, deadline - time.monotonic())
            )
        except TimeoutError:
            job.cancel()  # a decode still queued never starts
            raise _deadline_error("decoding") from None

    def _run(self, request: DecodeRequest, deadline: float) -> DecodedCutout:
        if time.monotonic() >= deadline:  # waited for a thread past the deadline
            raise _deadline_error("decoding")
        upload = request.upload
        with self.budget.claim() as reserve:
            return decode_cutout(
                upload.data,
                card=request.card,
                filename=upload.filename,
                content_type=upload.content_type,
                stretch=request.stretch,
                fit=request.fit,
                limits=request.limits,
                reserve=reserve,
            )

    def shutdown(self) -> None:
        """Drop queued decodes and let running ones finish; a later decode starts a new pool."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


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
