"""Real images for the export's parity check and int8 calibration/evaluation: a seeded sample
from a Galaxy10-layout HDF5 file, or every PNG/JPEG in a folder, resized to the model's input
with the resize the server applies (`galmorph.core.cutouts.resample.resize_images`)."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from galmorph.core.cutouts.formats import raster_suffixes
from galmorph.core.cutouts.resample import resize_images
from galmorph.core.inputspec import DEFAULT_INTERPOLATION

if TYPE_CHECKING:
    from galmorph.core.data.galaxy10 import Galaxy10File

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
    class_names: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """(uint8 (N, size, size, 3), labels or None). At most `count` images, chosen at random
    (seeded) from `indices` (e.g. a split's test rows) or from the whole source, resized with
    the model card's `interpolation`. With a model's `class_names`, the labels of a
    Galaxy10-layout file are indices of those classes (`open_in_classes`)."""
    source = Path(path)
    resize = functools.partial(_resize, size=size, interpolation=interpolation)
    if source.is_dir():
        return _from_folder(source, resize=resize, count=count, seed=seed), None
    if source.suffix.lower() in (".h5", ".hdf5"):
        return _from_galaxy10(
            source,
            resize=resize,
            count=count,
            seed=seed,
            indices=indices,
            class_names=class_names,
        )
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
    class_names: Sequence[str] | None,
) -> tuple[np.ndarray, np.ndarray]:
    from galmorph.core.data.galaxy10 import Galaxy10File

    if class_names is None:
        data = Galaxy10File(path)
        all_labels = data.labels
    else:
        data, all_labels = open_in_classes(path, class_names)
    with data:
        candidates = np.arange(data.num_images) if indices is None else np.asarray(indices)
        if len(candidates) and (candidates.min() < 0 or candidates.max() >= data.num_images):
            raise ValueError(f"{path}: split indices out of range for {data.num_images} images")
        chosen = _pick(candidates, count, seed)
        images = data.images(chosen)
        labels = all_labels[chosen]
    return resize(images), labels


def open_in_classes(
    path: str | os.PathLike[str], class_names: Sequence[str]
) -> tuple[Galaxy10File, np.ndarray]:
    """A Galaxy10-layout file and its labels as indices of `class_names` (a model's classes).

    A file naming no classes is read with these names (so its fingerprint is the one training
    recorded for names given with --class-names); the same names in another order are mapped;
    other class sets raise ValueError.
    """
    from galmorph.core.data.galaxy10 import Galaxy10Error, Galaxy10File

    names = tuple(class_names)
    try:
        data = Galaxy10File(path, class_names=names)
    except Galaxy10Error:
        # Names of its own that differ from these, perhaps only in order (anything else wrong
        # with the file is raised here again); a file naming none does not fit these names.
        data = Galaxy10File(path)
        if not data.class_names_named:
            data.close()
            raise
    try:
        return data, labels_in_classes(data, names)
    except ValueError:
        data.close()
        raise


def labels_in_classes(data: Galaxy10File, class_names: Sequence[str]) -> np.ndarray:
    """The file's labels as indices of `class_names`; ValueError for another class set."""
    names, wanted = tuple(data.class_names), tuple(class_names)
    if names == wanted:
        return data.labels
    if sorted(names) != sorted(wanted):
        raise ValueError(
            f"the model's classes {list(wanted)} differ from those of {data.path} "
            f"{list(names)}: use data with the classes the model was trained on"
        )
    mapping = np.asarray([wanted.index(name) for name in names], dtype=np.int64)
    return mapping[data.labels]


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
