"""The Python API: classify cutouts from a notebook or a script, no server, no torch.

    from galmorph import Classifier

    clf = Classifier("model.onnx")
    clf.predict("cutout.fits")                      # a FITS/PNG/JPEG path -> Prediction
    clf.predict(rgb)                                # uint8 (H, W, 3) rendered image
    clf.predict(cube, bands="grz", pixel_scale=0.262)  # float (3, H, W) fluxes, nanomaggies
    clf.predict(hdu)                                # an astropy.io.fits HDU or HDUList
    clf.predict([...]).to_pandas()                  # many inputs -> Predictions -> a table
    clf.embed("cutout.fits")                        # the pre-logit representation (D,)

Every input goes through the server's own decoder (galmorph.core.cutouts.decode): paths and bytes
as an
upload of that file, HDUs and flux cubes as the FITS file they make (bands in BANDS/BANDn, a TAN
WCS when `pixel_scale` is given), uint8 images as a PNG of them would be (resized with the
model card's interpolation when not at the input size). The same input therefore gets the same
probabilities, OOD score and embeddings as `POST /classify` and `galmorph score`.
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

import numpy as np
from astropy.io import fits
from tqdm import tqdm

from galmorph.core.cutouts.decode import (
    ARRAY_FORMAT,
    DecodedCutout,
    DecodeLimits,
    PreprocessInfo,
    decode_cutout,
    decode_path,
    fit_array,
)
from galmorph.core.cutouts.limits import CutoutError, CutoutErrorKind
from galmorph.core.modelfile.contract import (
    EMBEDDINGS_NAME,
    OOD_SCORE_NAME,
    ModelCard,
    ModelOutputs,
)
from galmorph.core.modelfile.engine_choice import open_model

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

# What one item of a predict() call may be (astropy's HDU classes included).
Cutout: TypeAlias = str | os.PathLike[str] | bytes | np.ndarray | fits.HDUList | fits.ImageHDU
DEFAULT_BATCH_SIZE = 32
ERROR_MODES = ("raise", "row")
# A list at least this long shows a progress bar when stderr is a terminal (progress=None).
PROGRESS_MIN_ITEMS = 100


class MissingOutputError(ValueError):
    """The model file lacks an output the call needs (files exported before it existed)."""


@dataclass(frozen=True)
class Prediction:
    """The answer for one cutout; with predict(errors="row"), a refused cutout's `error` and
    None (or {}) everywhere else."""

    source: str  # the file name, or what the input was ("array", "hdu", "bytes")
    label: str | None  # the most probable class
    probability: float | None
    probabilities: dict[str, float]  # every class by name
    ood_score: float | None  # None: the model has no OOD score
    in_distribution: bool | None  # ood_score <= the model card's threshold
    embeddings: np.ndarray | None  # float32 (D,), when asked for
    preprocessing: PreprocessInfo | None  # what was done to the input (as the server reports)
    error: str | None = None  # "kind: message", as in the scorer's error column

    def __repr__(self) -> str:
        if self.error is not None:
            return f"Prediction({self.source!r}, error={self.error!r})"
        shown = [f"{self.source!r}", f"label={self.label!r}", f"probability={self.probability:.4g}"]
        if self.ood_score is not None:
            shown += [f"ood_score={self.ood_score:.4g}", f"in_distribution={self.in_distribution}"]
        if self.embeddings is not None:
            shown.append(f"embeddings=({len(self.embeddings)},)")
        return f"Prediction({', '.join(shown)})"


class Predictions(list[Prediction]):
    """Predictions for many cutouts, in input order, with a table view."""

    def __init__(
        self,
        items: Iterable[Prediction],
        class_names: Sequence[str],
        embedding_size: int | None = None,
    ) -> None:
        super().__init__(items)
        self.class_names = tuple(class_names)
        self.embedding_size = embedding_size  # D when embeddings were asked for

    def __repr__(self) -> str:
        errors = sum(p.error is not None for p in self)
        shown = ", ".join(repr(p) for p in self[:3]) + (", ..." if len(self) > 3 else "")
        return (
            f"Predictions({len(self)} cutouts, {errors} refused, "
            f"{len(self.class_names)} classes: [{shown}])"
        )

    def to_arrow(self) -> pa.Table:
        """One row per cutout: source, pred_label, pred_index, pred_prob, p_<class>...,
        ood_score, in_distribution, embeddings when asked for (galmorph.core.data.tables), and
        error; a refused cutout's row is null but for source and error, as the scorer's."""
        import pyarrow as pa

        from galmorph.core.data.tables import (
            IN_DISTRIBUTION_NAME,
            class_columns,
            embeddings_array,
        )

        failed = np.array([p.error is not None for p in self], bool)
        probs = np.array(
            [[p.probabilities.get(name, np.nan) for name in self.class_names] for p in self],
            np.float32,
        ).reshape(len(self), len(self.class_names))
        index = np.nan_to_num(probs, nan=-1.0).argmax(axis=1) if len(self) else np.zeros(0)
        columns: dict[str, Any] = {
            "source": pa.array([p.source for p in self], pa.string()),
            "pred_label": pa.array([p.label for p in self], pa.string()),
            "pred_index": pa.array(index.astype(np.int64), mask=failed),
            "pred_prob": pa.array([p.probability for p in self], pa.float32()),
        }
        for k, name in enumerate(class_columns(self.class_names)):
            columns[name] = pa.array(probs[:, k], mask=failed)
        columns[OOD_SCORE_NAME] = pa.array([p.ood_score for p in self], pa.float32())
        columns[IN_DISTRIBUTION_NAME] = pa.array([p.in_distribution for p in self], pa.bool_())
        size = self.embedding_size or next(
            (len(p.embeddings) for p in self if p.embeddings is not None), None
        )
        if size is not None:
            vectors = np.zeros((len(self), size), np.float32)
            for row, p in enumerate(self):
                if p.embeddings is not None:
                    vectors[row] = p.embeddings
            columns[EMBEDDINGS_NAME] = embeddings_array(vectors, mask=failed)
        columns["error"] = pa.array([p.error for p in self], pa.string())
        return pa.table(columns)

    def to_pandas(self) -> pd.DataFrame:
        """The table as a pandas DataFrame (needs pandas)."""
        return self.to_arrow().to_pandas()


class Classifier:
    """An exported galmorph model (a .onnx file, or the folder of one over 2 GiB).

    providers: onnxruntime providers (default: CUDA when it works, else CPU); threads:
    onnxruntime intra-op threads (default: one per core). engine: auto (openvino bf16 on a
    CPU-only host with bf16 units and galmorph[cpu] installed, else onnxruntime), onnxruntime
    or openvino (galmorph.core.modelfile.engine_choice; default $GALMORPH_ENGINE or auto).
    stretch and fit are the defaults of `predict` (the model's stretch; crop_pad for FITS,
    resize for rendered images).
    """

    def __init__(
        self,
        model: str | os.PathLike[str],
        *,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
        engine: str | None = None,
        stretch: str | None = None,
        fit: str | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        limits: DecodeLimits = DecodeLimits(),  # noqa: B008 (frozen dataclass: safe default)
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.model = open_model(
            Path(model), engine=engine, providers=providers, intra_op_threads=threads
        )
        self.stretch = stretch
        self.fit = fit
        self.batch_size = min(batch_size, self.model.max_batch_size or batch_size)
        self.limits = limits

    def __repr__(self) -> str:
        card = self.card
        height, width = card.input_size
        return (
            f"Classifier({str(self.model.path)!r}, model_name={card.model_name!r}, "
            f"classes={len(card.class_names)}, input={height}x{width}, "
            f'pixel_scale={card.pixel_scale:g}"/px, providers={self.model.providers}, '
            f"engine={self.model.engine})"
        )

    @property
    def card(self) -> ModelCard:
        """What the model file says about itself: classes, input, imaging, calibration, OOD."""
        return self.model.card

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.model.card.class_names)

    def predict(
        self,
        cutouts: Cutout | Sequence[Cutout],
        *,
        bands: str | Sequence[str] | None = None,
        pixel_scale: float | None = None,
        stretch: str | None = None,
        fit: str | None = None,
        embeddings: bool = False,
        errors: Literal["raise", "row"] = "raise",
        progress: bool | None = None,
    ) -> Prediction | Predictions:
        """Classify one cutout (-> Prediction) or many (a list, or a 4-D array -> Predictions).

        bands: the band of each plane of a float flux cube, e.g. "grz" (required for cubes);
        pixel_scale: its arcsec/pixel (default: assumed to be the model's, with a warning).
        embeddings: also return each cutout's embeddings. errors: "raise" stops at the first
        refused cutout with a CutoutError (from galmorph.core.cutouts.decode) naming the problem
        and, for many inputs, which one; "row" gives a refused cutout a Prediction holding only its
        `error` ("kind: message", the scorer's error column) and goes on. progress: a progress
        bar on stderr (default: for 100 inputs or more when stderr is a terminal).
        """
        if errors not in ERROR_MODES:
            raise ValueError(f"errors must be one of {', '.join(ERROR_MODES)}, got {errors!r}")
        items, single = _items(cutouts)
        if embeddings:
            self._require_embeddings()
        if progress is None:
            progress = len(items) >= PROGRESS_MIN_ITEMS and sys.stderr.isatty()
        options = (bands, pixel_scale, stretch, fit)
        results: list[Prediction] = []
        with tqdm(total=len(items), unit="cutout", disable=not progress, leave=False) as bar:
            for start in range(0, len(items), self.batch_size):
                chunk = items[start : start + self.batch_size]
                indices = [None] * len(chunk) if single else range(start, start + len(chunk))
                results += self._predict_chunk(chunk, indices, options, embeddings, errors)
                bar.update(len(chunk))
        if single:
            return results[0]
        return Predictions(
            results, self.class_names, self.model.embedding_size if embeddings else None
        )

    def _predict_chunk(
        self,
        chunk: Sequence[Cutout],
        indices: Sequence[int | None],
        options: tuple[Any, ...],
        embeddings: bool,
        errors: str,
    ) -> list[Prediction]:
        decoded: list[tuple[DecodedCutout, str] | Prediction] = []
        for item, index in zip(chunk, indices, strict=True):
            try:
                decoded.append(self._decode(item, *options))
            except CutoutError as exc:
                if errors == "raise":
                    raise _named(exc, item, index) from None
                decoded.append(_refused(item, exc))
        good = [d for d in decoded if not isinstance(d, Prediction)]
        outputs = self._run(np.stack([d.image for d, _ in good])) if good else None
        results, row = [], 0
        for entry in decoded:
            if isinstance(entry, Prediction):
                results.append(entry)
                continue
            assert outputs is not None
            results.append(self._prediction(outputs.row(row), entry[0].info, entry[1], embeddings))
            row += 1
        return results

    def embed(
        self,
        cutouts: Cutout | Sequence[Cutout],
        *,
        bands: str | Sequence[str] | None = None,
        pixel_scale: float | None = None,
        stretch: str | None = None,
        fit: str | None = None,
    ) -> np.ndarray:
        """The pre-logit representation: float32 (D,) for one cutout, (N, D) for many. Inputs
        as for `predict`; for similarity search, clustering and anomaly finding."""
        self._require_embeddings()
        _, single = _items(cutouts)
        images = self.prepare(
            cutouts, bands=bands, pixel_scale=pixel_scale, stretch=stretch, fit=fit
        )
        embeddings = self._run(images).embeddings
        assert embeddings is not None  # _require_embeddings
        return embeddings[0] if single else embeddings

    def prepare(
        self,
        cutouts: Cutout | Sequence[Cutout],
        *,
        bands: str | Sequence[str] | None = None,
        pixel_scale: float | None = None,
        stretch: str | None = None,
        fit: str | None = None,
    ) -> np.ndarray:
        """The model's input images, uint8 (N, H, W, 3): what the model sees."""
        items, single = _items(cutouts)
        images = []
        for index, item in enumerate(items):
            try:
                images.append(self._decode(item, bands, pixel_scale, stretch, fit)[0].image)
            except CutoutError as exc:
                raise _named(exc, item, None if single else index) from None
        return np.stack(images)

    # ------------------------------------------------------------------ internals
    def _require_embeddings(self) -> None:
        if not self.model.has_embeddings:
            raise MissingOutputError(
                f"{self.model.path} has no embeddings output (exported before galmorph wrote "
                "them): export the run again with `galmorph export`"
            )

    def _run(self, images: np.ndarray) -> ModelOutputs:
        parts = [
            self.model.run(images[start : start + self.batch_size])
            for start in range(0, len(images), self.batch_size)
        ]
        return ModelOutputs(
            probabilities=np.concatenate([p.probabilities for p in parts]),
            embeddings=_joined([p.embeddings for p in parts]),
            ood_score=_joined([p.ood_score for p in parts]),
            in_distribution=_joined([p.in_distribution for p in parts]),
        )

    def _prediction(
        self, row: ModelOutputs, info: PreprocessInfo, source: str, embeddings: bool
    ) -> Prediction:
        probabilities = {
            name: float(p) for name, p in zip(self.class_names, row.probabilities, strict=True)
        }
        top = int(np.argmax(row.probabilities))
        return Prediction(
            source=source,
            label=self.class_names[top],
            probability=float(row.probabilities[top]),
            probabilities=probabilities,
            ood_score=None if row.ood_score is None else float(row.ood_score),
            in_distribution=None if row.in_distribution is None else bool(row.in_distribution),
            embeddings=row.embeddings if embeddings else None,
            preprocessing=info,
        )

    def _decode(
        self,
        item: Cutout,
        bands: str | Sequence[str] | None,
        pixel_scale: float | None,
        stretch: str | None,
        fit: str | None,
    ) -> tuple[DecodedCutout, str]:
        """The decoded cutout and its source name; a refusal is a CutoutError."""
        spec = self.model.card.input_spec
        options: dict[str, Any] = {
            "spec": spec,
            "stretch": stretch or self.stretch,
            "fit": fit or self.fit,
            "limits": self.limits,
        }
        source = _source(item)
        if isinstance(item, str | os.PathLike):
            return decode_path(Path(item), **options), source
        if isinstance(item, bytes):
            return decode_cutout(item, **options), source
        if isinstance(item, _HDU_TYPES):
            return decode_cutout(_hdu_bytes(item), **options), source
        if isinstance(item, np.ndarray):
            if item.dtype == np.uint8:
                return fit_array(item, spec, options["fit"]), source
            return decode_cutout(_flux_fits(item, bands, pixel_scale), **options), source
        raise TypeError(
            f"cannot classify a {type(item).__name__}: give a file path, the bytes of a "
            "FITS/PNG/JPEG file, an astropy.io.fits HDU or HDUList, a uint8 (H, W, 3) image or "
            "a float flux cube (bands, H, W) with its bands"
        )


_HDU_TYPES = (fits.HDUList, fits.PrimaryHDU, fits.ImageHDU, fits.CompImageHDU)


def _source(item: Cutout) -> str:
    """How a result names its input: the file name, else what the input was."""
    if isinstance(item, str | os.PathLike):
        return Path(item).name
    if isinstance(item, bytes):
        return "bytes"
    if isinstance(item, _HDU_TYPES):
        return "hdu"
    return ARRAY_FORMAT


def _named(exc: CutoutError, item: Cutout, index: int | None) -> CutoutError:
    """The refusal naming its input: "input 3" in a list, and a file's name unless the
    message has it already (never an object's repr)."""
    name = _source(item) if isinstance(item, str | os.PathLike) else None
    if name is not None and name in exc.message:
        name = None
    if index is None:
        return CutoutError(exc.kind, f"{name}: {exc.message}") if name else exc
    where = f"input {index} ({name})" if name else f"input {index}"
    return CutoutError(exc.kind, f"{where}: {exc.message}")


def _refused(item: Cutout, exc: CutoutError) -> Prediction:
    """A refused cutout's row, as the scorer writes one: null but for the error."""
    return Prediction(
        source=_source(item),
        label=None,
        probability=None,
        probabilities={},
        ood_score=None,
        in_distribution=None,
        embeddings=None,
        preprocessing=None,
        error=f"{exc.kind.value}: {exc.message}",
    )


def _items(cutouts: Cutout | Sequence[Cutout]) -> tuple[list[Cutout], bool]:
    """(items, whether a single cutout was given)."""
    if isinstance(cutouts, np.ndarray):
        # 4-D: a batch of RGB images (N, H, W, 3) or of flux cubes (N, bands, H, W).
        if cutouts.ndim == 4:
            return list(cutouts), False
        return [cutouts], True
    # An HDUList is a list, of the HDUs of one file.
    if isinstance(cutouts, list | tuple) and not isinstance(cutouts, fits.HDUList):
        if not cutouts:
            raise ValueError("no cutouts given")
        return list(cutouts), False
    return [cutouts], True


def _joined(parts: list[np.ndarray | None]) -> np.ndarray | None:
    present = [p for p in parts if p is not None]
    return np.concatenate(present) if present and len(present) == len(parts) else None


def _hdu_bytes(item: Any) -> bytes:
    """The FITS file an HDU or HDUList makes; an extension HDU gets an empty primary."""
    hdus = item if isinstance(item, fits.HDUList) else None
    if hdus is None:
        hdus = fits.HDUList(
            [item] if isinstance(item, fits.PrimaryHDU) else [fits.PrimaryHDU(), item]
        )
    buffer = io.BytesIO()
    hdus.writeto(buffer)
    return buffer.getvalue()


def _flux_fits(
    cube: np.ndarray, bands: str | Sequence[str] | None, pixel_scale: float | None
) -> bytes:
    """A float image (H, W) or flux cube (bands, H, W) as the FITS file a survey would send."""
    data = np.asarray(cube, dtype=np.float32)
    header = fits.Header()
    if data.ndim == 3:
        names = list(bands) if bands is not None else []
        if isinstance(bands, str) and ("," in bands or " " in bands):
            names = bands.replace(",", " ").split()
        if len(names) != data.shape[0]:
            raise ValueError(
                f"a flux cube of {data.shape[0]} planes needs its bands, one per plane "
                f"(e.g. bands='grz'), got {bands!r}"
            )
        header["BANDS"] = "".join(names) if all(len(n) == 1 for n in names) else ",".join(names)
        for i, name in enumerate(names):
            header[f"BAND{i}"] = name
    elif data.ndim != 2:
        raise CutoutError(
            CutoutErrorKind.INVALID,
            f"a float array must be one band (H, W) or a flux cube (bands, H, W), got "
            f"shape {data.shape}",
        )
    if pixel_scale is not None:
        if not pixel_scale > 0:
            raise ValueError(f"pixel_scale must be positive arcsec/pixel, got {pixel_scale}")
        height, width = data.shape[-2:]
        header["CTYPE1"], header["CTYPE2"] = "RA---TAN", "DEC--TAN"
        header["CRVAL1"], header["CRVAL2"] = 0.0, 0.0
        header["CRPIX1"], header["CRPIX2"] = (width + 1) / 2, (height + 1) / 2
        header["CD1_1"], header["CD1_2"] = -pixel_scale / 3600, 0.0
        header["CD2_1"], header["CD2_2"] = 0.0, pixel_scale / 3600
        header["CUNIT1"], header["CUNIT2"] = "deg", "deg"
    buffer = io.BytesIO()
    fits.PrimaryHDU(data, header).writeto(buffer)
    return buffer.getvalue()
