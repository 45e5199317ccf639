"""Dynamic micro-batching: concurrent requests share one model run.

Requests wait in a bounded queue. A single worker task takes the oldest request and waits at
most `max_delay_ms` (counted from when that request arrived) for others to fill the batch up to
`max_batch_size`, then runs the model in a dedicated thread so the event loop keeps serving.
A full queue refuses new work at once (the caller answers 503 with Retry-After) instead of
letting latency grow without bound; each request also has its own timeout.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from galmorph.core.modelfile.contract import ModelOutputs

logger = logging.getLogger(__name__)

Predict = Callable[[np.ndarray], ModelOutputs]
BatchObserver = Callable[[int, float], None]  # (batch size, inference seconds)


@dataclass(frozen=True)
class BatcherConfig:
    max_batch_size: int = 16
    max_delay_ms: float = 2.0
    max_queue: int = 256
    timeout_s: float = 30.0


class QueueFullError(Exception):
    """No room for the request; retry after `retry_after_s` seconds."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"inference queue is full; retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class InferenceTimeoutError(Exception):
    """The request was not answered within the per-request timeout."""


class BatcherStoppedError(Exception):
    """The service is shutting down (or never started): no inference is possible."""


@dataclass(frozen=True)
class Prediction:
    outputs: ModelOutputs  # this image's row: probabilities (K,) and the optional outputs
    queue_s: float  # from submission to the start of its batch
    inference_s: float  # the model run of its batch
    batch_size: int

    @property
    def probabilities(self) -> np.ndarray:
        return self.outputs.probabilities


@dataclass
class _Pending:
    image: np.ndarray
    enqueued: float
    future: asyncio.Future[Prediction]


class MicroBatcher:
    def __init__(
        self,
        predict: Predict,
        config: BatcherConfig,
        *,
        on_batch: BatchObserver | None = None,
    ) -> None:
        self._predict = predict
        self.config = config
        self._on_batch = on_batch
        self._pending: deque[_Pending] = deque()
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="galmorph-infer")
        self._worker: asyncio.Task[None] | None = None
        self._batch_seconds = 0.0  # moving average, for Retry-After estimates

    @property
    def queue_length(self) -> int:
        return len(self._pending)

    def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._run(), name="batcher")

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
            self._worker = None
        self._fail(self._pending, BatcherStoppedError("service is shutting down"))
        self._pending.clear()
        await asyncio.to_thread(self._executor.shutdown, wait=True)

    @staticmethod
    def _fail(items: Iterable[_Pending], error: Exception) -> None:
        for item in items:
            if not item.future.done():
                item.future.set_exception(error)

    async def submit(self, image: np.ndarray) -> Prediction:
        """Classify one uint8 (H, W, 3) image together with whatever else is queued."""
        (prediction,) = await self.submit_many([image])
        return prediction

    async def submit_many(self, images: Sequence[np.ndarray]) -> list[Prediction]:
        """Queue all images or none (QueueFullError), then wait for all of them."""
        if self._worker is None or self._worker.done():
            raise BatcherStoppedError("inference worker is not running")
        if len(self._pending) + len(images) > self.config.max_queue:
            raise QueueFullError(self.retry_after_s(len(images)))
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        items = [_Pending(image, now, loop.create_future()) for image in images]
        self._pending.extend(items)
        self._arrived.set()
        futures = [item.future for item in items]
        try:
            return list(
                await asyncio.wait_for(asyncio.gather(*futures), timeout=self.config.timeout_s)
            )
        except TimeoutError:
            # gather cancelled the futures; the worker skips cancelled items.
            raise InferenceTimeoutError(
                f"no answer within {self.config.timeout_s:g} s (server overloaded)"
            ) from None

    def retry_after_s(self, extra: int = 1) -> int:
        batches_ahead = math.ceil((len(self._pending) + extra) / self.config.max_batch_size)
        return max(1, math.ceil(batches_ahead * self._batch_seconds))

    async def _run(self) -> None:
        while True:
            while not self._pending:
                self._arrived.clear()
                await self._arrived.wait()
            await self._fill_batch()
            batch = self._take_batch()
            if batch:
                await self._run_batch(batch)

    async def _fill_batch(self) -> None:
        """Wait until a batch is full or the oldest request has waited max_delay_ms."""
        deadline = self._pending[0].enqueued + self.config.max_delay_ms / 1000.0
        while len(self._pending) < self.config.max_batch_size:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), timeout=remaining)
            except TimeoutError:
                return

    def _take_batch(self) -> list[_Pending]:
        batch: list[_Pending] = []
        while self._pending and len(batch) < self.config.max_batch_size:
            item = self._pending.popleft()
            if not item.future.done():  # done here means cancelled by a timeout
                batch.append(item)
        return batch

    async def _run_batch(self, batch: list[_Pending]) -> None:
        started = time.perf_counter()
        images = np.stack([item.image for item in batch])
        loop = asyncio.get_running_loop()
        try:
            outputs = await loop.run_in_executor(self._executor, self._predict, images)
        except asyncio.CancelledError:
            self._fail(batch, BatcherStoppedError("service is shutting down"))
            raise
        except Exception as exc:
            logger.exception("inference failed for a batch of %d", len(batch))
            self._fail(batch, exc)
            return
        elapsed = time.perf_counter() - started
        self._batch_seconds = (
            0.8 * self._batch_seconds + 0.2 * elapsed if self._batch_seconds else elapsed
        )
        if self._on_batch is not None:
            self._on_batch(len(batch), elapsed)
        for index, item in enumerate(batch):
            if not item.future.done():
                item.future.set_result(
                    Prediction(outputs.row(index), started - item.enqueued, elapsed, len(batch))
                )
