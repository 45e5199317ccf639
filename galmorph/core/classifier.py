"""The Python API: classify cutouts from a notebook or a script, no server, no torch.

    from galmorph import Classifier

    clf = Classifier("model.onnx")
    clf.predict("cutout.fits")                      # a FITS/PNG/JPEG path -> Prediction
    clf.predict(rgb)                                # uint8 (H, W, 3) rendered image
    clf.predict(cube, bands="grz", pixel_scale=0.262)  # float (3, H, W) fluxes, nanomaggies
    clf.predict(hdu)                                # an astropy.io.fits HDU or HDUList
    clf.predict([...]).to_pandas()                  # many inputs -> Predictions -> a table
    clf.embed("cutout.fits")                        # the pre-logit representation (D,)

Every input goes through the server's own decoder (galmorph.core.decode): paths and bytes as an
upload of that file, HDUs and flux cubes as the FITS file they make (bands in BANDS/BANDn, a TAN
WCS when `pixel_scale` is given), uint8 images as a PNG of them would be (resized with the
model card's interpolation when not at the input size). The same input therefore gets the same
probabilities, OOD score and embeddings as `POST /classify` and `galmorph score`.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np
from astropy.io import fits
from PIL import Image

from galmorph.core.contract import ModelCard, ModelOutputs
from galmorph.core.cutout_limits import CutoutError, CutoutErrorKind
from galmorph.core.decode import (
    FIT_MODES,
    DecodedCutout,
    DecodeLimits,
    PreprocessInfo,
    decode_cutout,
    decode_path,
    fit_picture,
)
from galmorph.core.engine import OnnxModel
from galmorph.core.raster_io import SINGLE_BAND_WARNING

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

# What one item of a predict() call may be (astropy's HDU classes included).
Cutout: TypeAlias = str | os.PathLike[str] | bytes | np.ndarray | fits.HDUList | fits.ImageHDU
ARRAY_FORMAT = "array"  # PreprocessInfo.format of a uint8 image given as an array
DEFAULT_BATCH_SIZE = 32


class MissingOutputError(ValueError):
    """The model file lacks an output the call needs (files exported before it existed)."""


@dataclass(frozen=True)
class Prediction:
    """The answer for one cutout."""

    source: str  # the file name, or what the input was ("array", "hdu", "bytes")
    label: str  # the most probable class
    probability: float
    probabilities: dict[str, float]  # every class by name
    ood_score: float | None  # None: the model has no OOD score
    in_distribution: bool | None  # ood_score <= the model card's threshold
    embeddings: np.ndarray | None  # float32 (D,), when asked for
    preprocessing: PreprocessInfo  # what was done to the input (as the server reports it)


class Predictions(list[Prediction]):
    """Predictions for many cutouts, in input order, with a table view."""

    def __init__(self, items: Iterable[Prediction], class_names: Sequence[str]) -> None:
        super().__init__(items)
        self.class_names = tuple(class_names)

    def to_arrow(self) -> pa.Table:
        """One row per cutout: source, pred_label, pred_index, pred_prob, p_<class>...,
        ood_score, in_distribution and, when asked for, embeddings (galmorph.core.tables)."""
        import pyarrow as pa

        from galmorph.core.tables import (
            EMBEDDINGS_NAME,
            IN_DISTRIBUTION_NAME,
            OOD_SCORE_NAME,
            class_columns,
            embeddings_array,
        )

        probs = np.array(
            [[p.probabilities[name] for name in self.class_names] for p in self], np.float32
        ).reshape(len(self), len(self.class_names))
        index = probs.argmax(axis=1) if len(self) else np.zeros(0, np.int64)
        columns: dict[str, Any] = {
            "source": pa.array([p.source for p in self], pa.string()),
            "pred_label": pa.array([p.label for p in self], pa.string()),
            "pred_index": pa.array(index.astype(np.int64)),
            "pred_prob": pa.array([p.probability for p in self], pa.float32()),
        }
        for k, name in enumerate(class_columns(self.class_names)):
            columns[name] = pa.array(probs[:, k])
        columns[OOD_SCORE_NAME] = pa.array([p.ood_score for p in self], pa.float32())
        columns[IN_DISTRIBUTION_NAME] = pa.array([p.in_distribution for p in self], pa.bool_())
        if self and all(p.embeddings is not None for p in self):
            columns[EMBEDDINGS_NAME] = embeddings_array(
                np.stack([p.embeddings for p in self if p.embeddings is not None])
            )
        return pa.table(columns)

    def to_pandas(self) -> pd.DataFrame:
        """The table as a pandas DataFrame (needs pandas)."""
        return self.to_arrow().to_pandas()


class Classifier:
    """An exported galmorph model (a .onnx file, or the folder of one over 2 GiB).

    providers: onnxruntime providers (default: CUDA when it works, else CPU); threads:
    onnxruntime intra-op threads (default: one per core). stretch and fit are the defaults of
    `predict` (the model's stretch; crop_pad for FITS, resize for rendered images).
    """

    def __init__(
        self,
        model: str | os.PathLike[str],
        *,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
        stretch: str | None = None,
        fit: str | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        limits: DecodeLimits = DecodeLimits(),  # noqa: B008 (frozen dataclass: safe default)
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.model = OnnxModel(Path(model), providers=providers, intra_op_threads=threads)
        self.stretch = stretch
        self.fit = fit
        self.batch_size = min(batch_size, self.model.max_batch_size or batch_size)
        self.limits = limits

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
    ) -> Prediction | Predictions:
        """Classify one cutout (-> Prediction) or many (a list, or a 4-D array -> Predictions).

        bands: the band of each plane of a float flux cube, e.g. "grz" (required for cubes);
        pixel_scale: its arcsec/pixel (default: assumed to be the model's, with a warning).
        embeddings: also return each cutout's embeddings. Refusals are CutoutError (from
        galmorph.core.decode) naming the problem and, for many inputs, which one.
        """
        items, single = _items(cutouts)
        if embeddings:
            self._require_embeddings()
        decoded = [
            self._decode(item, bands, pixel_scale, stretch, fit, index if not single else None)
            for index, item in enumerate(items)
        ]
        outputs = self._run(np.stack([d.image for d, _ in decoded]))
        results = [
            self._prediction(outputs.row(i), decoded[i][0].info, decoded[i][1], embeddings)
            for i in range(len(decoded))
        ]
        return results[0] if single else Predictions(results, self.class_names)

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
        items, single = _items(cutouts)
        images = self.prepare(items, bands=bands, pixel_scale=pixel_scale, stretch=stretch, fit=fit)
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
        return np.stack(
            [
                self._decode(item, bands, pixel_scale, stretch, fit, None if single else i)[0].image
                for i, item in enumerate(items)
            ]
        )

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
        index: int | None,
    ) -> tuple[DecodedCutout, str]:
        card = self.model.card
        options: dict[str, Any] = {
            "card": card,
            "stretch": stretch or self.stretch,
            "fit": fit or self.fit,
            "limits": self.limits,
        }
        try:
            if isinstance(item, str | os.PathLike):
                return decode_path(Path(item), **options), Path(item).name
            if isinstance(item, bytes):
                return decode_cutout(item, **options), "bytes"
            if isinstance(item, fits.HDUList | fits.PrimaryHDU | fits.ImageHDU | fits.CompImageHDU):
                return decode_cutout(_hdu_bytes(item), **options), "hdu"
            if isinstance(item, np.ndarray):
                if item.dtype == np.uint8:
                    return fit_array(item, card, options["fit"]), ARRAY_FORMAT
                fits_file = _flux_fits(item, bands, pixel_scale)
                return decode_cutout(fits_file, **options), ARRAY_FORMAT
        except CutoutError as exc:
            if index is None:
                raise
            raise CutoutError(exc.kind, f"input {index}: {exc.message}") from None
        raise TypeError(
            f"cannot classify a {type(item).__name__}: give a file path, the bytes of a "
            "FITS/PNG/JPEG file, an astropy.io.fits HDU or HDUList, a uint8 (H, W, 3) image or "
            "a float flux cube (bands, H, W) with its bands"
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
        raise ValueError(
            f"a float array must be one band (H, W) or a flux cube (bands, H, W), got "
            f"shape {data.shape}"
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


def fit_array(image: np.ndarray, card: ModelCard, fit: str | None) -> DecodedCutout:
    """A rendered uint8 image (H, W, 3) or (H, W) fitted to the model's input exactly as the
    decoder fits a PNG of it."""
    if not (image.ndim == 3 and image.shape[2] == 3) and image.ndim != 2:
        raise CutoutError(
            CutoutErrorKind.INVALID,
            f"a uint8 image must be RGB (H, W, 3) or grey (H, W), got shape {image.shape}",
        )
    if fit is not None and fit not in FIT_MODES:
        raise CutoutError(
            CutoutErrorKind.INVALID, f"unknown fit {fit!r}; valid: {', '.join(FIT_MODES)}"
        )
    grey = image.ndim == 2
    info = PreprocessInfo(
        format=ARRAY_FORMAT,
        bands_used=["L"] if grey else ["R", "G", "B"],
        original_shape=tuple(image.shape),
        fit=fit or "resize",
        warnings=[SINGLE_BAND_WARNING] if grey else [],
    )
    picture = Image.fromarray(np.ascontiguousarray(image))
    fitted = fit_picture(picture, card.input_size, info.fit, info, card.interpolation)
    return DecodedCutout(fitted, info)
