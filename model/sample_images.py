"""Real images for the export's parity check and int8 calibration/evaluation: a seeded sample
from a Galaxy10-layout HDF5 file, or every PNG/JPEG in a folder, resized to the model's input
with the resize the server applies (`galmorph.core.resample.resize_images`)."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from galmorph.core.formats import raster_suffixes
from galmorph.core.resample import DEFAULT_INTERPOLATION, resize_images

MAX_IMAGE_FILE_BYTES = 64 << 20
MAX_IMAGE_PIXELS = 8192 * 8192


def load_images(
    path: str | os.PathLike[str],
    *,
    size: int,
    count: int,
    seed: int = 0,
    indices: np.ndarray | None = None,
    interpolation: str = DEFAULT_INTERPOLATION,
) -> tuple[np.ndarray, np.ndarray | None]:
    """(uint8 (N, size, size, 3), labels or None). At most `count` images, chosen at random
    (seeded) from `indices` (e.g. a split's test rows) or from the whole source, resized with
    the model card's `interpolation`."""
    source = Path(path)
    resize = functools.partial(_resize, size=size, interpolation=interpolation)
    if source.is_dir():
        return _from_folder(source, resize=resize, count=count, seed=seed), None
    if source.suffix.lower() in (".h5", ".hdf5"):
        return _from_galaxy10(source, resize=resize, count=count, seed=seed, indices=indices)
    raise ValueError(f"{source}: expected a Galaxy10-layout .h5 file or a folder of PNG/JPEG")


def _pick(candidates: np.ndarray, count: int, seed: int) -> np.ndarray:
    if len(candidates) <= count:
        return np.sort(candidates)
    return np.sort(np.random.default_rng(seed).choice(candidates, size=count, replace=False))


def _resize(images: np.ndarray, *, size: int, interpolation: str) -> np.ndarray:
    return np.ascontiguousarray(resize_images(images, size, interpolation))


def _from_galaxy10(
    path: Path,
    *,
    resize: Callable[[np.ndarray], np.ndarray],
    count: int,
    seed: int,
    indices: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    from galmorph.core.galaxy10 import Galaxy10File

    with Galaxy10File(path) as data:
        candidates = np.arange(data.num_images) if indices is None else np.asarray(indices)
        if len(candidates) and (candidates.min() < 0 or candidates.max() >= data.num_images):
            raise ValueError(f"{path}: split indices out of range for {data.num_images} images")
        chosen = _pick(candidates, count, seed)
        images = data.images(chosen)
        labels = data.labels[chosen]
    return resize(images), labels


def _from_folder(
    folder: Path, *, resize: Callable[[np.ndarray], np.ndarray], count: int, seed: int
) -> np.ndarray:
    from PIL import Image

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in raster_suffixes())
    if not files:
        raise ValueError(f"{folder}: no PNG or JPEG images")
    chosen = [files[i] for i in _pick(np.arange(len(files)), count, seed)]
    images = []
    for file in chosen:
        if file.stat().st_size > MAX_IMAGE_FILE_BYTES:
            raise ValueError(f"{file}: larger than {MAX_IMAGE_FILE_BYTES} bytes")
        with Image.open(file) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise ValueError(f"{file}: {image.width}x{image.height} pixels is too large")
            rgb = np.array(image.convert("RGB"))
        images.append(resize(rgb[None])[0])
    return np.stack(images)
