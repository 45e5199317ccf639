"""Lazy, validated access to HDF5 files in the Galaxy10 layout.

Layout: `images` uint8 (N, H, W, 3), `ans` integer labels (N,), optional 1-D columns `ra`, `dec`,
`redshift`, `pxscale`, and optional `votes` (N, K): non-negative vote counts per class, in
class order (Galaxy Zoo vote fractions are votes / row total). A file with `votes` and no
`ans` is labelled by each row's most-voted class (the first on a tie).

Class names (label k is the k-th name) come from the caller (`--class-names`), a root
`class_names` attribute or a sidecar text file beside the data (`my_galaxies.classes.txt` for
`my_galaxies.h5`, one name per line); named sources that disagree are an error. A file naming no
classes is read as Galaxy10's ten classes, and `class_names_named` says so: training refuses
that unless the labels are Galaxy10's (`check_class_names`), so a 4-class file is never silently
taken for Galaxy10.

How the images were made (`Galaxy10File.imaging`) comes from root attributes `pixel_scale` (or
`pxscale`, arcsec/pixel), `stretch` and `bands` (the survey bands shown as R, G, B, e.g. "zrg");
without them, the most common value of the `pxscale` column, then Galaxy10 DECaLS's facts
(0.262"/px, dr2_rgb, z/r/g). Rows whose own `pxscale` differs from the file's scale (a few
hundred Galaxy10 DECaLS images are at 0.524"/px) are brought to the file's scale when read.

The real file is 2.5 GB, so images are only ever read by index. The h5py handle is opened on
first use and reopened in any other process (a forked or spawned DataLoader worker), because
an HDF5 handle inherited across fork is not safe to use.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from galmorph.core.cutouts.resample import rescale_rgb
from galmorph.core.inputspec import GALAXY10_DECALS, Imaging

if TYPE_CHECKING:
    import h5py

logger = logging.getLogger(__name__)

GALAXY10_CLASS_NAMES: tuple[str, ...] = (
    "Disturbed",
    "Merging",
    "Round Smooth",
    "In-between Round Smooth",
    "Cigar Shaped Smooth",
    "Barred Spiral",
    "Unbarred Tight Spiral",
    "Unbarred Loose Spiral",
    "Edge-on without Bulge",
    "Edge-on with Bulge",
)
IMAGES_KEY = "images"
LABELS_KEY = "ans"
VOTES_KEY = "votes"
CLASS_NAMES_ATTR = "class_names"
CLASS_NAMES_SIDECAR_SUFFIX = ".classes.txt"
MAX_SIDECAR_BYTES = 1 << 20
OPTIONAL_COLUMNS = ("ra", "dec", "redshift", "pxscale")
# Rows hashed by fingerprint(): enough to tell files apart, cheap on a 2.5 GB file.
FINGERPRINT_SAMPLE_ROWS = 16
# Labels are read whole: refuse absurd row counts before allocating for them.
MAX_IMAGES = 100_000_000
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
# class_names_source when nothing named the classes.
GALAXY10_ASSUMED = "assumed Galaxy10 (the file names no classes)"
# Rows within this fraction of the file's pixel scale are left as they are.
SCALE_TOLERANCE = 0.02


class Galaxy10Error(ValueError):
    """The file is not a usable Galaxy10-layout HDF5 file; the message says why."""


class Galaxy10File:
    """A Galaxy10-layout HDF5 file, validated on construction, images read lazily by index."""

    def __init__(
        self, path: str | os.PathLike[str], class_names: Sequence[str] | None = None
    ) -> None:
        """`class_names`: the names of labels 0..K-1, checked against any the file carries."""
        self.path = Path(path)
        self._handle: h5py.File | None = None
        self._handle_pid: int | None = None
        layout = _validate(self.path, None if class_names is None else tuple(class_names))
        self.labels = layout.labels
        # float64 (N, K) vote counts, or None when the file has no `votes`. K is num_classes,
        # or up to 10 when Galaxy10's names were assumed (check_class_names refuses K != 10).
        self.votes = layout.votes
        self.class_names = layout.class_names
        self.image_shape = layout.image_shape
        self._columns = layout.columns
        self.class_names_source = layout.class_names_source
        self.imaging, self.imaging_source, self._row_zoom = _imaging(
            self.path, self._columns, self.num_images
        )
        self.close()  # validation handle: never carry an open HDF5 id into a fork

    @property
    def num_images(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def class_names_named(self) -> bool:
        """False when nothing named the classes and Galaxy10's ten were assumed."""
        return self.class_names_source != GALAXY10_ASSUMED

    def check_class_names(self) -> None:
        """Raise Galaxy10Error if Galaxy10's names were assumed for labels that are not its ten.

        A file naming no classes whose labels stop short of Galaxy10's last class (or whose
        votes have fewer columns) is almost surely a file of its own classes: reading it as
        Galaxy10 would mislabel every class.
        """
        if self.votes is not None:
            used = int(self.votes.shape[1])
            evidence = f"{used} vote columns"
        else:
            used = int(self.labels.max()) + 1
            evidence = f"labels 0..{used - 1}"
        if self.class_names_named or used == len(GALAXY10_CLASS_NAMES):
            return
        raise Galaxy10Error(
            f"{self.path}: no class names ({evidence}, so {used} classes, not "
            f"Galaxy10's {len(GALAXY10_CLASS_NAMES)}): name them with --class-names "
            f"a,b,c, a '{CLASS_NAMES_ATTR}' attribute, or a sidecar file "
            f"{class_names_sidecar(self.path).name} with one name per line"
        )

    @property
    def columns(self) -> tuple[str, ...]:
        """Optional columns present in the file."""
        return self._columns

    def __len__(self) -> int:
        return self.num_images

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.num_classes)

    @property
    def rows_off_scale(self) -> np.ndarray:
        """Rows whose own `pxscale` differs from the file's; `images()` rescales them."""
        return np.flatnonzero(self._row_zoom != 1.0)

    def image(self, index: int) -> np.ndarray:
        """One image, uint8 (H, W, 3), at the file's pixel scale."""
        return self.images([self._check_index(index)])[0]

    def images(self, indices: Sequence[int] | np.ndarray, *, as_stored: bool = False) -> np.ndarray:
        """Images at `indices` (any order, repeats allowed), uint8 (len, H, W, 3).

        Every row comes at the file's pixel scale (`imaging.pixel_scale`) unless `as_stored`.
        Sorted unique rows are read as contiguous slices, which h5py serves far faster than
        fancy indexing; the result is then put back in the caller's order.
        """
        wanted = np.asarray(indices, dtype=np.int64).reshape(-1)
        out = np.empty((wanted.size, *self.image_shape), np.uint8)
        if wanted.size == 0:
            return out
        for i in (int(wanted.min()), int(wanted.max())):
            self._check_index(i)
        unique, inverse = np.unique(wanted, return_inverse=True)
        rows = np.empty((unique.size, *self.image_shape), np.uint8)
        dataset = self._file()[IMAGES_KEY]
        run_starts = np.flatnonzero(np.diff(unique, prepend=unique[0] - 2) != 1)
        run_ends = np.append(run_starts[1:], unique.size)
        for start, end in zip(run_starts, run_ends, strict=True):
            first = int(unique[start])
            rows[start:end] = dataset[first : first + (end - start)]
        if not as_stored:
            for position in np.flatnonzero(self._row_zoom[unique] != 1.0):
                zoom = float(self._row_zoom[unique[position]])
                rows[position] = rescale_rgb(rows[position], zoom)
        out[:] = rows[inverse]
        return out

    def column(self, name: str) -> np.ndarray | None:
        """An optional per-image column (ra, dec, redshift, pxscale), or None if absent."""
        if name not in OPTIONAL_COLUMNS:
            raise KeyError(f"unknown column {name!r}; known: {', '.join(OPTIONAL_COLUMNS)}")
        if name not in self._columns:
            return None
        return np.asarray(self._file()[name][()], dtype=np.float64)

    def fingerprint(self) -> dict[str, Any]:
        """Cheap, stable identity of the contents (reads labels and a few sampled rows).

        `digest` covers everything but the file name, so a renamed copy matches.
        """
        sample = np.unique(
            np.linspace(0, self.num_images - 1, FINGERPRINT_SAMPLE_ROWS).round().astype(np.int64)
        )
        sample_hash = hashlib.sha256()
        for row in self.images(sample, as_stored=True):
            sample_hash.update(row.tobytes())
        content: dict[str, Any] = {
            "num_images": self.num_images,
            "image_shape": list(self.image_shape),
            "class_names": list(self.class_names),
            "labels_sha256": hashlib.sha256(self.labels.astype("<i8").tobytes()).hexdigest(),
            "sample_rows": sample.tolist(),
            "sample_sha256": sample_hash.hexdigest(),
            "file_size": self.path.stat().st_size,
        }
        # Only when present, so the digests of files without votes stay what they were.
        if self.votes is not None:
            votes_bytes = self.votes.astype("<f8").tobytes()
            content["votes_sha256"] = hashlib.sha256(votes_bytes).hexdigest()
        digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
        return {"file_name": self.path.name, **content, "digest": digest}

    def close(self) -> None:
        if self._handle is not None and self._handle_pid == os.getpid():
            self._handle.close()
        self._handle = None
        self._handle_pid = None

    def __enter__(self) -> Galaxy10File:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        # Spawned DataLoader workers receive a copy without the handle and open their own.
        state = self.__dict__.copy()
        state["_handle"] = None
        state["_handle_pid"] = None
        return state

    def __repr__(self) -> str:
        return (
            f"Galaxy10File({str(self.path)!r}, num_images={self.num_images}, "
            f"image_shape={self.image_shape}, num_classes={self.num_classes})"
        )

    def _file(self) -> h5py.File:
        if self._handle is None or self._handle_pid != os.getpid():
            import h5py

            # An inherited handle belongs to the parent's HDF5 state: drop it, do not close it.
            self._handle = h5py.File(self.path, "r")
            self._handle_pid = os.getpid()
        return self._handle

    def _check_index(self, index: int) -> int:
        index = int(index)
        if not 0 <= index < self.num_images:
            raise IndexError(f"image index {index} out of range for {self.num_images} images")
        return index


def class_names_sidecar(path: str | os.PathLike[str]) -> Path:
    """The text file beside a data file that may name its classes, one per line."""
    path = Path(path)
    return path.with_name(path.stem + CLASS_NAMES_SIDECAR_SUFFIX)


@dataclass(frozen=True)
class _Layout:
    """What a validated file holds (everything but the images)."""

    labels: np.ndarray
    votes: np.ndarray | None
    class_names: tuple[str, ...]
    image_shape: tuple[int, int, int]
    columns: tuple[str, ...]
    class_names_source: str


# Long on purpose: the checks of an untrusted file in the order they must run (signature, then
# shapes and dtypes before any data is read, then labels and votes), one message each.
def _validate(path: Path, given_names: tuple[str, ...] | None) -> _Layout:
    """Check the layout (shapes and dtypes first, then labels and votes); say what it holds."""
    import h5py

    if not path.is_file():
        raise Galaxy10Error(f"{path}: no such file")
    with open(path, "rb") as raw:
        signature = raw.read(len(HDF5_SIGNATURE))
    if signature != HDF5_SIGNATURE:
        raise Galaxy10Error(f"{path}: not an HDF5 file (missing the HDF5 signature)")
    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        raise Galaxy10Error(f"{path}: cannot be opened as HDF5: {exc}") from exc
    with handle:
        images = _dataset(handle, path, IMAGES_KEY)
        if LABELS_KEY not in handle and VOTES_KEY not in handle:
            present = ", ".join(sorted(handle.keys())) or "nothing"
            raise Galaxy10Error(
                f"{path}: missing dataset '{LABELS_KEY}' (labels), and no '{VOTES_KEY}' (vote "
                f"counts) to label the rows by (file has: {present})"
            )
        labels_ds = _dataset(handle, path, LABELS_KEY) if LABELS_KEY in handle else None
        if images.ndim != 4 or images.shape[3] != 3:
            raise Galaxy10Error(
                f"{path}: '{IMAGES_KEY}' must have shape (N, H, W, 3), got {images.shape}"
            )
        if images.dtype != np.uint8:
            raise Galaxy10Error(f"{path}: '{IMAGES_KEY}' must be uint8, got {images.dtype}")
        num_images, height, width, _ = images.shape
        if num_images == 0 or height == 0 or width == 0:
            raise Galaxy10Error(f"{path}: '{IMAGES_KEY}' is empty (shape {images.shape})")
        if num_images > MAX_IMAGES:
            raise Galaxy10Error(f"{path}: {num_images} images exceeds the limit of {MAX_IMAGES}")
        if labels_ds is not None:
            _check_labels_dataset(labels_ds, path, num_images)
        columns = []
        for name in OPTIONAL_COLUMNS:
            if name not in handle:
                continue
            column = _dataset(handle, path, name)
            if column.shape != (num_images,) or column.dtype.kind not in "iuf":
                raise Galaxy10Error(
                    f"{path}: column '{name}' must be numeric with shape ({num_images},), "
                    f"got {column.dtype} {column.shape}"
                )
            columns.append(name)
        class_names, names_source = _resolve_class_names(path, handle, given_names)
        votes = (
            _read_votes(handle, path, num_images, class_names, names_source)
            if VOTES_KEY in handle
            else None
        )
        stored = None if labels_ds is None else np.asarray(labels_ds[()], dtype=np.int64)
    if stored is not None:
        labels = stored
    else:
        assert votes is not None
        labels = np.argmax(votes, axis=1).astype(np.int64)
        logger.info(
            "%s has no '%s': each row's label is its most-voted class in '%s' (the first on a tie)",
            path,
            LABELS_KEY,
            VOTES_KEY,
        )
    bad = (labels < 0) | (labels >= len(class_names))
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        hint = (
            _name_classes_hint(path)
            if names_source == GALAXY10_ASSUMED
            else f" for the {len(class_names)} class names ({names_source})"
        )
        raise Galaxy10Error(
            f"{path}: {int(bad.sum())} label(s) outside 0..{len(class_names) - 1} "
            f"(first at row {first}: {int(labels[first])}){hint}"
        )
    return _Layout(
        labels=labels,
        votes=votes,
        class_names=class_names,
        image_shape=(int(height), int(width), 3),
        columns=tuple(columns),
        class_names_source=names_source,
    )


def _name_classes_hint(path: Path) -> str:
    return (
        f"; a file whose classes are not Galaxy10's must name them (--class-names, a "
        f"'{CLASS_NAMES_ATTR}' attribute or {class_names_sidecar(path).name})"
    )


def _check_labels_dataset(labels: h5py.Dataset, path: Path, num_images: int) -> None:
    if labels.ndim != 1:
        raise Galaxy10Error(f"{path}: '{LABELS_KEY}' must be 1-D, got shape {labels.shape}")
    if labels.dtype.kind not in "iu":
        raise Galaxy10Error(
            f"{path}: '{LABELS_KEY}' must hold integer class ids, got {labels.dtype}"
        )
    if labels.shape[0] != num_images:
        raise Galaxy10Error(
            f"{path}: {num_images} images but {labels.shape[0]} labels in '{LABELS_KEY}'"
        )


def _read_votes(
    handle: h5py.File,
    path: Path,
    num_images: int,
    class_names: tuple[str, ...],
    names_source: str,
) -> np.ndarray:
    """The `votes` counts as float64 (N, K), refused unless every row is a usable count."""
    dataset = _dataset(handle, path, VOTES_KEY)
    num_classes = len(class_names)
    if dataset.ndim != 2 or dataset.shape[0] != num_images:
        raise Galaxy10Error(
            f"{path}: '{VOTES_KEY}' must have shape (N, K) = ({num_images}, {num_classes}), "
            f"one row per image and one column per class, got {dataset.shape}"
        )
    assumed = names_source == GALAXY10_ASSUMED
    # As with labels, fewer columns than Galaxy10's pass when no names were given, so a file
    # opened without them (scoring, export fits) still reads; training refuses it.
    if dataset.shape[1] > num_classes or (dataset.shape[1] < num_classes and not assumed):
        hint = _name_classes_hint(path) if assumed else ""
        raise Galaxy10Error(
            f"{path}: '{VOTES_KEY}' has {dataset.shape[1]} columns but there are "
            f"{num_classes} classes ({names_source}): one column per class, in class "
            f"order{hint}"
        )
    if dataset.dtype.kind not in "iuf":
        raise Galaxy10Error(
            f"{path}: '{VOTES_KEY}' must hold numeric vote counts, got {dataset.dtype}"
        )
    votes = np.asarray(dataset[()], dtype=np.float64)
    totals = votes.sum(axis=1)
    for bad, what in (
        (~np.isfinite(votes).all(axis=1), "NaN or infinite counts"),
        ((votes < 0).any(axis=1), "negative counts"),
        (totals <= 0, "no votes (each row needs at least one)"),
    ):
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            raise Galaxy10Error(
                f"{path}: '{VOTES_KEY}' has {int(bad.sum())} row(s) with {what} (first at "
                f"row {first}: {votes[first].tolist()})"
            )
    return votes


def _dataset(handle: h5py.File, path: Path, key: str) -> h5py.Dataset:
    import h5py

    if key not in handle:
        present = ", ".join(sorted(handle.keys())) or "nothing"
        raise Galaxy10Error(f"{path}: missing dataset '{key}' (file has: {present})")
    node = handle[key]
    if not isinstance(node, h5py.Dataset):
        raise Galaxy10Error(f"{path}: '{key}' is a group, expected a dataset")
    return node


def _resolve_class_names(
    path: Path, handle: h5py.File, given: tuple[str, ...] | None
) -> tuple[tuple[str, ...], str]:
    """The class names and where they came from; named sources must agree."""
    named: dict[str, tuple[str, ...]] = {}
    if given is not None:
        named["the given class names"] = _checked_names(given, path, "the given class names")
    if CLASS_NAMES_ATTR in handle.attrs:
        raw = np.asarray(handle.attrs[CLASS_NAMES_ATTR]).reshape(-1)
        stored = tuple(v.decode() if isinstance(v, bytes) else str(v) for v in raw.tolist())
        what = f"attribute '{CLASS_NAMES_ATTR}'"
        named[what] = _checked_names(stored, path, what)
    sidecar = class_names_sidecar(path)
    if sidecar.is_file():
        if sidecar.stat().st_size > MAX_SIDECAR_BYTES:
            raise Galaxy10Error(f"{sidecar}: too large for a list of class names")
        lines = sidecar.read_text(encoding="utf-8").splitlines()
        what = f"sidecar {sidecar.name}"
        named[what] = _checked_names(tuple(x.strip() for x in lines if x.strip()), path, what)
    if not named:
        return GALAXY10_CLASS_NAMES, GALAXY10_ASSUMED
    (source, names), *others = named.items()
    for other, other_names in others:
        if other_names != names:
            raise Galaxy10Error(
                f"{path}: class names disagree: {source} says {list(names)}, "
                f"{other} says {list(other_names)}"
            )
    return names, source


def _checked_names(names: tuple[str, ...], path: Path, what: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in names)
    if not names or any(not name for name in names):
        raise Galaxy10Error(f"{path}: {what}: a class name is empty")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise Galaxy10Error(f"{path}: {what}: class name {repeated[0]!r} appears twice")
    return names


def _imaging(
    path: Path, columns: tuple[str, ...], num_images: int
) -> tuple[Imaging, str, np.ndarray]:
    """The file's imaging facts, where they came from, and each row's zoom (own / file scale)."""
    import h5py

    with h5py.File(path, "r") as handle:
        attrs = handle.attrs
        row_scales = np.asarray(handle["pxscale"][()], np.float64) if "pxscale" in columns else None
        scale_attr = next((k for k in ("pixel_scale", "pxscale") if k in attrs), None)
        sources = []
        if scale_attr is not None:
            pixel_scale = _positive_float(attrs[scale_attr], path, scale_attr)
            sources.append(f"attribute {scale_attr}")
        elif row_scales is not None and np.isfinite(row_scales).any():
            values, counts = np.unique(row_scales[np.isfinite(row_scales)], return_counts=True)
            pixel_scale = _positive_float(values[np.argmax(counts)], path, "pxscale column")
            sources.append("pxscale column")
        else:
            pixel_scale = GALAXY10_DECALS.pixel_scale
        stretch = _text(attrs["stretch"]) if "stretch" in attrs else GALAXY10_DECALS.stretch
        bands = _bands(attrs["bands"], path) if "bands" in attrs else dict(GALAXY10_DECALS.bands)
        sources += [f"attribute {key}" for key in ("stretch", "bands") if key in attrs]
    zoom = np.ones(num_images, np.float64)
    if row_scales is not None:
        ratio = row_scales / pixel_scale
        usable = np.isfinite(ratio) & (ratio > 0)
        off = usable & (np.abs(ratio - 1) > SCALE_TOLERANCE)
        zoom[off] = ratio[off]
    source = ", ".join(sources) if sources else "Galaxy10 DECaLS defaults (no attributes)"
    return Imaging(pixel_scale, stretch, bands), source, zoom


def _positive_float(value: Any, path: Path, what: str) -> float:
    try:
        number = float(np.asarray(value).reshape(-1)[0])
    except (TypeError, ValueError, IndexError):
        raise Galaxy10Error(f"{path}: {what} must be a number, got {value!r}") from None
    if not (np.isfinite(number) and number > 0):
        raise Galaxy10Error(f"{path}: {what} must be a positive pixel scale, got {number}")
    return number


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _bands(value: Any, path: Path) -> dict[str, str]:
    """ "zrg" (the bands shown as R, G, B) or a JSON object {"R": "z", ...}."""
    text = _text(value).strip()
    if text.startswith("{"):
        mapping = json.loads(text)
    else:
        mapping = dict(zip("RGB", text, strict=False)) if len(text) == 3 else {}
    if set(mapping) != {"R", "G", "B"}:
        raise Galaxy10Error(
            f"{path}: attribute 'bands' = {text!r}: give the bands shown as R, G, B, e.g. 'zrg'"
        )
    return {channel: str(band) for channel, band in mapping.items()}
