"""Decoding cutouts for the scorer: the code that runs in decode processes and Ray tasks.

Functions a ProcessPoolExecutor calls must be module-level in an importable module, so they
live here, apart from the driver. Decoding is galmorph.core.cutouts.decode, the same code the server
runs, so a cutout gets the same pixels from both. A bad or missing cutout becomes a zero image
plus an error text (`kind: message`); it never stops the run.

Sky catalogs arrive here already fetched (galmorph.scoring.sky_fetch): each source is the
cache file of its cutout or the error text of its row, so workers never touch the network.
A cache file is checked as it is decoded (it must parse and have the shape that was asked
for); one that fails is removed from the cache, so the next fetch gets it again.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from galmorph.core.cutouts.decode import (
    CutoutError,
    DecodeLimits,
    PreprocessInfo,
    decode_path,
    fit_rgb,
)
from galmorph.core.modelfile.contract import ModelCard


@dataclass(frozen=True)
class DecodeSettings:
    """Everything a decode worker needs; picklable, sent once per worker."""

    card: ModelCard
    stretch: str | None
    source_kind: str  # "path" | "galaxy10" | "sky"
    galaxy10_path: str | None = None
    limits: DecodeLimits = field(default_factory=DecodeLimits)
    # sky: the shape a cached cutout must have (galmorph.core.sky.client.CutoutSpec.expected_shape)
    cutout_shape: tuple[int, ...] | None = None


class RowError(Exception):
    """A row that failed before decoding (fetch, position); its text is the error column."""


_galaxy10_files: dict[str, Any] = {}


def decode_sources(
    settings: DecodeSettings, sources: list[Any]
) -> tuple[np.ndarray, list[str | None]]:
    """Decode cutouts to a uint8 (n, H, W, 3) batch; failed rows are zeros plus an error."""
    height, width = settings.card.input_size
    images = np.zeros((len(sources), height, width, 3), np.uint8)
    errors: list[str | None] = [None] * len(sources)
    for i, source in enumerate(sources):
        try:
            images[i] = _decode_one(settings, source)
        except Exception as exc:  # one bad cutout must never stop a catalog
            errors[i] = describe_error(exc)
    return images, errors


def _decode_one(settings: DecodeSettings, source: Any) -> np.ndarray:
    if settings.source_kind == "sky":
        return _sky_image(settings, source)
    if source is None:
        raise FileNotFoundError("no cutout path in the catalog row")
    if settings.source_kind == "galaxy10":
        return _galaxy10_image(settings, int(source))
    try:
        return decode_path(
            source, spec=settings.card.input_spec, stretch=settings.stretch, limits=settings.limits
        ).image
    except CutoutError:
        if not os.path.exists(source):  # checked only on failure: no extra stat per cutout
            raise FileNotFoundError(2, "cutout not found", source) from None
        raise


def _sky_image(settings: DecodeSettings, source: dict[str, str | None]) -> np.ndarray:
    path = source["path"]
    if path is None:
        raise RowError(source["error"] or "fetch: no cutout")
    try:
        decoded = decode_path(
            path, spec=settings.card.input_spec, stretch=settings.stretch, limits=settings.limits
        )
        problem = None
        if decoded.info.original_shape != settings.cutout_shape:
            problem = f"shape {decoded.info.original_shape}, not {settings.cutout_shape}"
    except CutoutError as exc:
        problem = f"{exc.kind.value}: {exc.message}"
    if problem is None:
        return decoded.image
    # Fetched files were checked before they were cached: this one was damaged since.
    with contextlib.suppress(OSError):
        os.unlink(path)
    raise RowError(f"fetch: cached cutout {path} is unusable ({problem}); removed, fetch again")


def _galaxy10_image(settings: DecodeSettings, index: int) -> np.ndarray:
    from galmorph.core.data.galaxy10 import Galaxy10File

    assert settings.galaxy10_path is not None
    handle = _galaxy10_files.get(settings.galaxy10_path)
    if handle is None:  # one lazily opened HDF5 handle per worker process
        handle = _galaxy10_files[settings.galaxy10_path] = Galaxy10File(settings.galaxy10_path)
    image = handle.image(index)
    # Same fitting as an uploaded PNG of that size: the scorer and the server agree on pixels.
    info = PreprocessInfo(format="galaxy10", bands_used=["R", "G", "B"], original_shape=image.shape)
    return fit_rgb(image, settings.card.input_size, "resize", info, settings.card.interpolation)


def describe_error(exc: BaseException) -> str:
    """`kind: message` for the error column; the kind is what the summary counts."""
    if isinstance(exc, RowError):
        return str(exc)
    if isinstance(exc, CutoutError):
        return f"{exc.kind.value}: {exc.message}"
    if isinstance(exc, FileNotFoundError):
        return f"missing: {exc.filename}" if exc.filename else f"missing: {exc}"
    if isinstance(exc, OSError):
        return f"io: {exc}"
    return f"decode: {type(exc).__name__}: {exc}"


# Set once per pool process by init_worker, so each task carries only its sources.
_worker_settings: DecodeSettings | None = None


def init_worker(settings: DecodeSettings) -> None:
    """ProcessPoolExecutor initializer: keep the settings for every later decode_in_worker."""
    global _worker_settings
    _worker_settings = settings


def decode_in_worker(sources: list[Any]) -> tuple[np.ndarray, list[str | None]]:
    """ProcessPoolExecutor task: decode_sources with the settings given to init_worker."""
    assert _worker_settings is not None, "decode worker was not initialised"
    return decode_sources(_worker_settings, sources)
