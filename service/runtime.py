"""The model's life in the server: wait for it, load it, warm it up, verify its provider.

Loading runs in the background so the process is live at once and `/readyz` says what it is
waiting for. Ready means: model loaded, warmed up at batch sizes 1 and the maximum (so the
first requests do not pay for allocation), and the active provider checked.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from pathlib import Path

from galmorph.service.batching import MicroBatcher
from galmorph.service.metrics import ServiceMetrics
from galmorph.service.settings import Settings

from galmorph.core.engine import ModelLoadError, OnnxModel

logger = logging.getLogger(__name__)


class ServiceRuntime:
    def __init__(self, settings: Settings, metrics: ServiceMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.model: OnnxModel | None = None
        self.batcher: MicroBatcher | None = None
        self.ready = False
        self.reason: str | None = "starting"
        self._loader: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._loader = asyncio.get_running_loop().create_task(self._load(), name="model-loader")

    async def wait_until_settled(self) -> None:
        """Return when loading has finished, successfully or not (for tests and benchmarks)."""
        if self._loader is not None:
            await asyncio.shield(self._loader)

    async def stop(self) -> None:
        if self._loader is not None and not self._loader.done():
            self._loader.cancel()
            await asyncio.gather(self._loader, return_exceptions=True)
        if self.batcher is not None:
            await self.batcher.stop()
        self.ready = False
        self.metrics.ready.set(0)

    async def _load(self) -> None:
        path = self.settings.model_path
        if path is None:
            self._not_ready("no model configured (set GALMORPH_MODEL_PATH or --model)")
            return
        try:
            model = await self._open(path)
            sizes = sorted({1, self.settings.max_batch_size})
            await asyncio.to_thread(model.warm_up, sizes)
        except ModelLoadError as exc:
            self._not_ready(f"model failed to load: {exc}")
            return
        self.model = model
        self.metrics.model_info.labels(
            model.card.model_name, model.sha256[:12], model.sha256, ",".join(model.providers)
        ).set(1)
        max_batch = self.settings.max_batch_size
        if model.max_batch_size is not None:
            max_batch = min(max_batch, model.max_batch_size)
        self.batcher = MicroBatcher(
            model.predict,
            dataclasses.replace(self.settings.batcher_config, max_batch_size=max_batch),
            on_batch=self.metrics.observe_batch,
        )
        self.batcher.start()
        if self.settings.require_gpu and not model.cuda_active:
            self._not_ready(
                f"require_gpu is set but the session runs on {model.providers}: "
                "CUDAExecutionProvider did not load (check CUDA/cuDNN and the GPU)"
            )
            return
        self.ready, self.reason = True, None
        self.metrics.ready.set(1)
        logger.info(
            "ready: model %s sha256 %s on %s (onnxruntime %s), batches up to %d",
            model.card.model_name,
            model.sha256,
            model.providers,
            model.ort_version,
            max_batch,
        )

    async def _open(self, path: Path) -> OnnxModel:
        """Open the model; in wait mode keep retrying (a missing or half-written file)."""
        settings = self.settings
        started = time.monotonic()
        while True:
            try:
                return await asyncio.to_thread(
                    OnnxModel,
                    path,
                    providers=settings.providers or None,
                    intra_op_threads=settings.intra_op_threads,
                    inter_op_threads=settings.inter_op_threads,
                )
            except ModelLoadError as exc:
                waited = time.monotonic() - started
                timeout = settings.model_wait_timeout_s
                if not settings.wait_for_model or (timeout is not None and waited >= timeout):
                    raise
                self.reason = f"waiting for model at {path}"
                logger.info(
                    "waiting for model at %s (%s); next check in %g s",
                    path,
                    exc,
                    settings.model_wait_interval_s,
                )
                await asyncio.sleep(settings.model_wait_interval_s)

    def _not_ready(self, reason: str) -> None:
        self.ready, self.reason = False, reason
        self.metrics.ready.set(0)
        logger.error("not ready: %s", reason)
