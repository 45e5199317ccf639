"""Turn an untrusted cutout (FITS, PNG or JPEG bytes) into the uint8 RGB image the model takes.

Used by the server and the batch scorer (torch-free). The formats are registered in
`galmorph.core.formats`; a cutout's format is sniffed from its magic bytes, and its file name
and content type are only hints (a mismatch is a warning). Limits are checked before pixels
are read (`DecodeLimits`); refusals are `CutoutError` with a kind, which the server answers
as 413 too large, 415 unsupported format or 422 corrupt/unusable.

FITS (flux) pipeline, in this order, so the angular scale matches the training images:
1. read the first image HDU, pick g, r, z by name (or one band), NaN/inf -> 0 (fits_io);
2. pixel scale from the WCS; if it differs from the model's (card.pixel_scale) by more than
   2% on either axis, crop the source to the field the model sees and resample it to the
   model's scale (area average when shrinking): a 0.131"/px cutout is halved, an HST
   0.06"/px image shrinks 4.4x. No WCS: the model's scale is assumed (warning);
3. fit to card.input_size: "crop_pad" (default) centre-crops or pads with 0 flux, which the
   stretch renders as the viewer's blank-sky grey, keeping the angular scale the model was
   trained at (a 100x100 cutout at 0.262"/px stays 26" wide inside a 67" field rather than
   being magnified 2.56x, which would change the size cue the classes depend on);
   "resize" squeezes the whole field into the input instead (records resized_from);
4. single band: sky (median) subtracted and scaled so the robust noise (MAD) equals DECaLS
   r-band sky noise, then rendered grey by the stretch ("single band: no colour");
5. flip north up (FITS row 0 is south), stretch (card.stretch unless chosen), to uint8.

PNG/JPEG (already rendered) pipeline: to RGB (raster_io), then fit to card.input_size:
"resize" (default; the pixel scale is unknown, so the framing the user chose is kept):
centre-crop to the input's aspect ratio, then antialiased bicubic resize; or "crop_pad"
(pads with the blank-sky grey). Images already at the input size are passed through
unchanged.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from galmorph.core import formats
from galmorph.core.contract import ModelCard
from galmorph.core.cutout_limits import CutoutError, CutoutErrorKind, DecodeLimits
from galmorph.core.fits_io import read_fits
from galmorph.core.formats import CutoutFormat, Reader
from galmorph.core.imaging import STRETCHES, Stretch, flip_north_up, normalise_single_band, to_uint8
from galmorph.core.raster_io import SINGLE_BAND_WARNING, read_raster
from galmorph.core.resample import (
    BLANK_SKY_UINT8,
    centre_window,
    crop_pad,
    crop_to_aspect,
    resample_plane,
    resize_rgb,
)

__all__ = [
    "FIT_MODES",
    "CutoutError",
    "DecodeLimits",
    "DecodedCutout",
    "PreprocessInfo",
    "decode_cutout",
    "decode_path",
    "resolve_stretch",
    "sniff_format",
]

FIT_MODES = ("crop_pad", "resize")
SCALE_TOLERANCE = 0.02
# Content types that say nothing about the format (a raw body, a browser that did not know).
_GENERIC_CONTENT_TYPES = ("application/octet-stream", "multipart/form-data")


@dataclass
class PreprocessInfo:
    """What was done to the input, reported with every prediction."""

    format: str  # a CutoutFormat.name ("fits", "png", "jpeg"), or "galaxy10" in the scorer
    bands_used: list[str]
    original_shape: tuple[int, ...]
    pixel_scale: float | None = None  # arcsec/px from the WCS (mean of the two axes)
    stretch: str | None = None  # None for PNG/JPEG, which arrive rendered
    resized_from: tuple[int, int] | None = None
    resampled_from_scale: float | None = None
    flipped: bool = False
    warnings: list[str] = field(default_factory=list)
    compression: str | None = None  # "gzip" | "fpack" for FITS
    fit: str = "crop_pad"
    crop_pad_from: tuple[int, int] | None = None  # shape before centre crop/pad, if any

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        values = asdict(self)
        for key in ("original_shape", "resized_from", "crop_pad_from"):
            if values[key] is not None:
                values[key] = list(values[key])
        return values


@dataclass
class DecodedCutout:
    image: np.ndarray  # uint8 (H, W, 3) at card.input_size
    info: PreprocessInfo


def resolve_stretch(name: str) -> Stretch:
    try:
        return STRETCHES[name]
    except KeyError:
        raise CutoutError(
            CutoutErrorKind.INVALID,
            f"unknown stretch {name!r}; valid stretches: {', '.join(sorted(STRETCHES))}",
        ) from None


def sniff_format(data: bytes, filename: str | None = None) -> CutoutFormat:
    """The registered format (galmorph.core.formats) from magic bytes; else CutoutError."""
    if not data:
        raise CutoutError(CutoutErrorKind.INVALID, "empty file")
    fmt = formats.identify(data)
    if fmt is not None:
        return fmt
    kind = formats.identify_unsupported(data)
    if kind is None:
        kind = "text" if _looks_like_text(data[:1024]) else "unrecognised binary data"
    named = formats.named_like(filename) if filename else None
    if named is not None:
        raise CutoutError(
            CutoutErrorKind.UNSUPPORTED,
            f"{filename!r} is named like {named.label} but is {kind}: it lacks {named.signature}",
        )
    named_as = f" ({filename!r})" if filename else ""
    raise CutoutError(
        CutoutErrorKind.UNSUPPORTED,
        f"unsupported format{named_as}: {kind}; send {formats.supported_formats()}",
    )


def _looks_like_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(char.isprintable() or char in "\r\n\t" for char in text)


def _hint_warnings(fmt: CutoutFormat, filename: str | None, content_type: str | None) -> list[str]:
    notes = []
    if filename and "." in filename and not fmt.matches_filename(filename):
        notes.append(f"file name {filename!r} ignored: the content is {fmt.label}")
    if (
        content_type
        and not content_type.startswith(_GENERIC_CONTENT_TYPES)
        and not fmt.matches_content_type(content_type)
    ):
        notes.append(f"content type {content_type!r} ignored: the content is {fmt.label}")
    return notes


def decode_cutout(
    data: bytes,
    *,
    card: ModelCard,
    filename: str | None = None,
    content_type: str | None = None,
    stretch: str | None = None,
    fit: str | None = None,
    limits: DecodeLimits = DecodeLimits(),  # noqa: B008 (frozen dataclass: safe default)
) -> DecodedCutout:
    """Decode one cutout to uint8 (H, W, 3) at card.input_size; raises CutoutError.

    `stretch` overrides card.stretch for FITS; `fit` is "crop_pad" or "resize" (default:
    crop_pad for FITS, resize for PNG/JPEG).
    """
    limits.check_encoded_size(len(data))
    fmt = sniff_format(data, filename)
    chosen = resolve_stretch(stretch or card.stretch)
    if fit is not None and fit not in FIT_MODES:
        raise CutoutError(
            CutoutErrorKind.INVALID, f"unknown fit {fit!r}; valid: {', '.join(FIT_MODES)}"
        )
    hints = _hint_warnings(fmt, filename, content_type)
    if fmt.reader is Reader.FITS:
        decoded = _decode_fits(data, card, chosen, fit or "crop_pad", limits)
    else:
        decoded = _decode_raster(data, fmt, card, fit or "resize", limits)
        if stretch is not None:
            decoded.info.warnings.append(f"stretch {stretch!r} ignored: {fmt.label} is rendered")
    decoded.info.warnings[:0] = hints
    return decoded


def decode_path(
    path: str | Path,
    *,
    card: ModelCard,
    stretch: str | None = None,
    fit: str | None = None,
    limits: DecodeLimits = DecodeLimits(),  # noqa: B008
) -> DecodedCutout:
    """Decode a cutout file; its size is checked against limits.max_bytes before reading."""
    path = Path(path)
    try:
        limits.check_encoded_size(path.stat().st_size)
        data = path.read_bytes()
    except OSError as exc:
        raise CutoutError(
            CutoutErrorKind.INVALID, f"cannot read {str(path)!r}: {exc.strerror or exc}"
        ) from None
    return decode_cutout(
        data, card=card, filename=path.name, stretch=stretch, fit=fit, limits=limits
    )


def _decode_fits(
    data: bytes, card: ModelCard, stretch: Stretch, fit: str, limits: DecodeLimits
) -> DecodedCutout:
    fits_image = read_fits(data, limits)
    notes = list(fits_image.warnings)
    planes = fits_image.planes
    target = card.input_size
    scale = fits_image.pixel_scale
    info = PreprocessInfo(
        format="fits",
        bands_used=list(planes),
        original_shape=fits_image.original_shape,
        pixel_scale=None if scale is None else round(math.sqrt(scale[0] * scale[1]), 6),
        stretch=stretch.name,
        flipped=True,
        warnings=notes,
        compression=fits_image.compressed,
        fit=fit,
    )
    if scale is None:
        notes.append(f'no celestial WCS: pixel scale assumed to be {card.pixel_scale}"/px')
        scale = (card.pixel_scale, card.pixel_scale)
    shape = next(iter(planes.values())).shape
    if fit == "resize":
        if shape != target:
            planes = {b: resample_plane(p, target) for b, p in planes.items()}
            info.resized_from = (shape[0], shape[1])
            notes.append(
                f"resized from {shape[0]}x{shape[1]} to {target[0]}x{target[1]}: "
                "the angular scale differs from the model's"
            )
    else:
        planes = _to_model_scale(planes, scale, card, info)
    if fits_image.single_band:
        notes.append(f"{SINGLE_BAND_WARNING} (sky-subtracted, noise-scaled, rendered grey)")
        planes = {b: normalise_single_band(p) for b, p in planes.items()}
    fitted_shape = next(iter(planes.values())).shape
    if fitted_shape != target:
        info.crop_pad_from = (fitted_shape[0], fitted_shape[1])
        notes.append(
            f"centre crop/pad from {fitted_shape[0]}x{fitted_shape[1]} to "
            f"{target[0]}x{target[1]} (padding is blank sky)"
        )
        planes = {b: crop_pad(p, target, 0.0) for b, p in planes.items()}
    planes = {b: flip_north_up(p) for b, p in planes.items()}
    if fits_image.single_band:
        grey = stretch.render_grey(next(iter(planes.values())))
        rgb = np.repeat(grey[..., None], 3, axis=2)
    else:
        rgb = stretch.render_bands(planes)
    return DecodedCutout(to_uint8(rgb), info)


def _to_model_scale(
    planes: dict[str, np.ndarray],
    scale: tuple[float, float],
    card: ModelCard,
    info: PreprocessInfo,
) -> dict[str, np.ndarray]:
    """Resample to card.pixel_scale, first cropping the source to the field the model sees."""
    zoom_x, zoom_y = (s / card.pixel_scale for s in scale)  # output pixels per input pixel
    if abs(zoom_x - 1) <= SCALE_TOLERANCE and abs(zoom_y - 1) <= SCALE_TOLERANCE:
        return planes
    height, width = next(iter(planes.values())).shape
    # Source pixels covering the model's field, plus a margin for the interpolation kernel.
    rows = centre_window(height, math.ceil(card.input_size[0] / zoom_y) + 2)
    cols = centre_window(width, math.ceil(card.input_size[1] / zoom_x) + 2)
    source_h, source_w = rows.stop - rows.start, cols.stop - cols.start
    shape = (max(1, round(source_h * zoom_y)), max(1, round(source_w * zoom_x)))
    info.resampled_from_scale = info.pixel_scale
    info.warnings.append(
        f'resampled from {info.pixel_scale:.4g}"/px to the model\'s {card.pixel_scale}"/px '
        f"({source_h}x{source_w} -> {shape[0]}x{shape[1]} pixels)"
    )
    return {b: resample_plane(p[rows, cols], shape) for b, p in planes.items()}


def _decode_raster(
    data: bytes, fmt: CutoutFormat, card: ModelCard, fit: str, limits: DecodeLimits
) -> DecodedCutout:
    raster = read_raster(data, fmt, limits)
    image = raster.image
    grey = SINGLE_BAND_WARNING in raster.warnings
    info = PreprocessInfo(
        format=fmt.name,
        bands_used=["L"] if grey else ["R", "G", "B"],
        original_shape=tuple(int(s) for s in image.shape),
        warnings=raster.warnings,
        fit=fit,
    )
    return DecodedCutout(fit_rgb(image, card.input_size, fit, info, card.interpolation), info)


def fit_rgb(
    image: np.ndarray,
    target: tuple[int, int],
    fit: str,
    info: PreprocessInfo,
    interpolation: str,
) -> np.ndarray:
    """Bring an already rendered uint8 RGB image to the model's input size (resizing with the
    model card's `interpolation`).

    "resize" crops to the target aspect and resamples (the framing is kept, the pixel scale is
    unknown); "crop_pad" keeps the pixel scale and centre-crops or pads with blank-sky grey.
    What was done is recorded in `info`.
    """
    shape = (image.shape[0], image.shape[1])
    if shape != tuple(target) and fit == "resize":
        cropped = crop_to_aspect(image, target)
        if cropped.shape[:2] != shape:
            info.crop_pad_from = shape
        info.resized_from = (cropped.shape[0], cropped.shape[1])
        info.warnings.append(
            f"resized from {shape[0]}x{shape[1]} to {target[0]}x{target[1]} "
            "(pixel scale unknown: the framing is kept)"
        )
        image = resize_rgb(np.ascontiguousarray(cropped), target, interpolation)
    elif shape != tuple(target):
        info.crop_pad_from = shape
        info.warnings.append(
            f"centre crop/pad from {shape[0]}x{shape[1]} to {target[0]}x{target[1]} "
            "(padding is blank-sky grey)"
        )
        image = crop_pad(image, target, BLANK_SKY_UINT8)
    return np.ascontiguousarray(image)
