"""The server's cutout fetcher for GET /classify/sky: one per app (per uvicorn worker).

What to ask the cutout service for depends on the model card (its input size, pixel scale and
bands), which exists only once the model has loaded; so the fetcher is made at the first sky
request after that, and closed when the app shuts down. Each worker process has its own, and
with it its own politeness limits (galmorph.core.sky.options.Politeness).
"""

from __future__ import annotations

import asyncio
import math
import tempfile
from pathlib import Path

from fastapi import HTTPException

from galmorph.core.modelfile.contract import ModelCard
from galmorph.core.sky.cache import CutoutCache, default_cache_dir
from galmorph.core.sky.client import CutoutFetcher, CutoutSpec, FetchError
from galmorph.service.settings import Settings


class SkyCutouts:
    """The fetcher the settings describe, made for the loaded model's card on first use."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.cache = CutoutCache(
            settings.cutout_cache or default_cache_dir(), settings.cutout_cache_max_bytes
        )
        if not settings.cutout_offline:
            _check_writable(self.cache.root)
        self._fetcher: CutoutFetcher | None = None
        self._lock = asyncio.Lock()

    async def fetcher(self, card: ModelCard) -> CutoutFetcher:
        async with self._lock:
            if self._fetcher is None:
                settings = self.settings
                fetcher = CutoutFetcher(
                    CutoutSpec.for_input(card.input_spec, settings.cutout_options),
                    self.cache,
                    settings.politeness,
                    offline=settings.cutout_offline,
                    limits=settings.decode_limits,
                )
                self._fetcher = await fetcher.__aenter__()
            return self._fetcher

    async def aclose(self) -> None:
        async with self._lock:
            if self._fetcher is not None:
                await self._fetcher.aclose()
                self._fetcher = None


def _check_writable(folder: Path) -> None:
    """Refuse to start rather than answer every sky request with a cache-write failure (the
    serving image's file system is read-only outside its volumes)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise RuntimeError(
            f"GET /classify/sky is on but the cutout cache {folder} is not writable "
            f"({exc.strerror or exc}): set GALMORPH_CUTOUT_CACHE to a writable volume, or "
            "GALMORPH_CUTOUT_OFFLINE=true to serve from a pre-filled cache"
        ) from None


def fetch_refusal(exc: FetchError, offline: bool) -> HTTPException:
    """The answer that tells a client why its cutout could not be had.

    The service busy (429/503), or holding requests back past the deadline: 503, with the
    wait as Retry-After when there is one. Any other status, or a body that is not the cutout:
    502. No complete answer (a timeout, a refused or reset connection): 504. Offline and not
    cached: 503, without Retry-After (no retry helps until the cache has it).
    """
    if offline:
        detail = "the cutout is not in this server's cache, and the server is offline "
        return HTTPException(503, detail + "(GALMORPH_CUTOUT_OFFLINE): it fetches nothing")
    detail = f"cutout service: {exc}"
    wait = exc.retry_after
    if exc.status in (429, 503) or wait is not None:
        return HTTPException(
            503, detail, {} if wait is None else {"Retry-After": str(math.ceil(wait))}
        )
    return HTTPException(504 if exc.no_answer else 502, detail)
