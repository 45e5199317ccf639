"""Turn an untrusted cutout (FITS, PNG or JPEG bytes) into the uint8 RGB image the model takes.

Used by the server and the batch scorer (torch-free). The formats are registered in
`galmorph.core.cutouts.formats`; a cutout's format is sniffed from its magic bytes, and its file
name and content type are only hints (a mismatch is a warning). Limits are checked before pixels
are read (`DecodeLimits`); refusals are `CutoutError` with a kind, which the server answers
as 413 too large, 415 unsupported format or 422 corrupt/unusable.

Memory: the work is sized by the model's input, not by the file, wherever the format allows:
a FITS image is read only over the field the model sees, and rendered images are resized
without numpy copies. JPEGs are decoded in full, so a JPEG and its decoded pixels get the same
answer (a reduced-scale decode moved it by 0.002-0.20, see raster_io). Before
any pixel is read, the decoders call `reserve` with the most memory the decode will take
(see `galmorph.core.cutouts.limits.Reserve`); the server refuses decodes beyond its budget.

FITS (flux) pipeline, in this order, so the angular scale matches the training images:
1. the first image HDU's header: bands g, r, z by name (or one band), the WCS pixel scale;
2. the window of the image the model needs is chosen and only it is read, NaN/inf -> 0
   (fits_io). If the scale differs from the model's (spec.pixel_scale) by more than 2% on
   either axis, the window is the model's field of view (plus a 2-pixel margin), resampled
   straight to the input size (area average when shrinking): a 0.131"/px cutout is halved,
   an HST 0.06"/px image shrinks 4.4x; a source smaller than the field gives a smaller
   output. Scales outside 1/64 to 8 times the model's are a 422 naming both scales
   (`SCALE_RATIO_RANGE`). No WCS: the model's scale is assumed (warning);
3. fit to spec.input_size: "crop_pad" (default) centre-crops or pads with 0 flux, which the
   stretch renders as the viewer's blank-sky grey, keeping the angular scale the model was
   trained at (a 100x100 cutout at 0.262"/px stays 26" wide inside a 67" field rather than
   being magnified 2.56x, which would change the size cue the classes depend on);
   "resize" squeezes the whole image into the input instead, ignoring the scale (records
   resized_from);
4. single band: sky (median) subtracted and scaled so the robust noise (MAD) of the pixels
   the model sees equals DECaLS r-band sky noise, then rendered grey by the stretch
   ("single band: no colour");
5. flip north up (FITS row 0 is south), stretch (spec.stretch unless chosen), to uint8.

PNG/JPEG (already rendered) pipeline: to RGB or grey (raster_io), then fit to
spec.input_size: "resize" (default; the pixel scale is unknown, so the framing the user
chose is kept): the centre window of the input's aspect ratio, resized with the spec's
interpolation (antialiased); or "crop_pad" (pads with the blank-sky grey). Images already at
the input size are passed through unchanged.
"""

from __future__ import annotations

import errno
import math
import os
import stat
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from galmorph.core.cutouts import formats
from galmorph.core.cutouts.fits_io import read_fits
from galmorph.core.cutouts.formats import CutoutFormat, Reader
from galmorph.core.cutouts.imaging import (
    STRETCHES,
    Stretch,
    flip_north_up,
    normalise_single_band,
    to_uint8,
)
from galmorph.core.cutouts.limits import (
    CutoutError,
    CutoutErrorKind,
    DecodeLimits,
    Reserve,
    reserve_nothing,
)
from galmorph.core.cutouts.raster_io import SINGLE_BAND_WARNING, read_raster
from galmorph.core.cutouts.resample import (
    BLANK_SKY_UINT8,
    ScaleResampling,
    aspect_window,
    centre_window,
    crop_pad,
    plan_scale_resampling,
    resample_plane,
    resize_picture,
)
from galmorph.core.inputspec import InputSpec

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
ARRAY_FORMAT = "array"  # PreprocessInfo.format of a uint8 image given as an array
SCALE_TOLERANCE = 0.02
# Source pixel scales a model accepts, as multiples of its own (others are a 422). Finer than
# 1/64 of it, a 256 px model's field spans 16384 source pixels, twice the widest image
# accepted; coarser than 8 times, each source pixel would become 64 model pixels, leaving
# nothing to classify. HST (0.03-0.06"/px) and SDSS (0.396"/px) cutouts are well inside for a
# Galaxy10 model (0.262"/px at 256 px, 1.048"/px at 64 px).
SCALE_RATIO_RANGE = (1 / 64, 8.0)
# Working memory at the model's input size, per input pixel: the resampled planes, the
# stretch's temporaries (Lupton's in float64), the uint8 image (measured peak ~110 B).
_RENDER_BYTES_PER_PIXEL = 160
_FITS_OVERHEAD_BYTES = 8 * 2**20  # header parsing, WCS, Python objects
_RASTER_FIT_BYTES_PER_PIXEL = 16  # a crop or resize at the input size and its RGB array
_READ_CHUNK = 1 << 20
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
    image: np.ndarray  # uint8 (H, W, 3) at spec.input_size
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
    """The registered format (galmorph.core.cutouts.formats) from magic bytes; else CutoutError."""
    if not data:
        raise CutoutError(CutoutErrorKind.INVALID, "empty file")
    fmt = formats.identify(data)
    if fmt is not None:
        return fmt
    kind = formats.identify_unsupported(data)
    if kind is None:
        text = _looks_like_text(data[: formats.SNIFF_BYTES])
        kind = "text" if text else "unrecognised binary data"
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
    spec: InputSpec,
    filename: str | None = None,
    content_type: str | None = None,
    stretch: str | None = None,
    fit: str | None = None,
    limits: DecodeLimits = DecodeLimits(),  # noqa: B008 (frozen dataclass: safe default)
    reserve: Reserve = reserve_nothing,
) -> DecodedCutout:
    """Decode one cutout to uint8 (H, W, 3) at spec.input_size; raises CutoutError.

    `stretch` overrides spec.stretch for FITS; `fit` is "crop_pad" or "resize" (default:
    crop_pad for FITS, resize for PNG/JPEG). `reserve` is called with the memory the decode
    will need before any pixel is read, and may raise to refuse it.
    """
    limits.check_encoded_size(len(data))
    fmt = sniff_format(data, filename)
    chosen = resolve_stretch(stretch or spec.stretch)
    if fit is not None and fit not in FIT_MODES:
        raise CutoutError(
            CutoutErrorKind.INVALID, f"unknown fit {fit!r}; valid: {', '.join(FIT_MODES)}"
        )
    hints = _hint_warnings(fmt, filename, content_type)
    if fmt.reader is Reader.FITS:
        decoded = _decode_fits(data, spec, chosen, fit or "crop_pad", limits, reserve)
    else:
        decoded = _decode_raster(data, fmt, spec, fit or "resize", limits, reserve)
        if stretch is not None:
            decoded.info.warnings.append(f"stretch {stretch!r} ignored: {fmt.label} is rendered")
    decoded.info.warnings[:0] = hints
    return decoded


def decode_path(
    path: str | Path,
    *,
    spec: InputSpec,
    stretch: str | None = None,
    fit: str | None = None,
    limits: DecodeLimits = DecodeLimits(),  # noqa: B008
) -> DecodedCutout:
    """Decode a cutout file (`read_cutout_file`); a file that cannot be read is a CutoutError."""
    path = Path(path)
    data = read_cutout_file(path, limits)
    return decode_cutout(
        data, spec=spec, filename=path.name, stretch=stretch, fit=fit, limits=limits
    )


@dataclass
class _FitsWindow:
    """Chooses, from the header, the part of a FITS plane the model needs (read_fits's window)
    and reserves the memory of the work that follows the read."""

    spec: InputSpec
    fit: str
    reserve: Reserve
    source_shape: tuple[int, int] = (0, 0)
    resampling: ScaleResampling | None = None

    def __call__(
        self, shape: tuple[int, int], scale: tuple[float, float] | None
    ) -> tuple[slice, slice]:
        self.source_shape = shape
        spec, target = self.spec, self.spec.input_size
        if self.fit == "resize":
            rows, cols = slice(0, shape[0]), slice(0, shape[1])
        elif scale is not None and not _same_scale(scale, spec.pixel_scale):
            _check_scale(scale, spec)
            self.resampling = plan_scale_resampling(shape, scale, spec.pixel_scale, target)
            rows, cols = self.resampling.window
        else:
            rows, cols = centre_window(shape[0], target[0]), centre_window(shape[1], target[1])
        # Pillow's copy of one plane while it is resampled, then the render at the input size.
        window_pixels = (rows.stop - rows.start) * (cols.stop - cols.start)
        render = _RENDER_BYTES_PER_PIXEL * target[0] * target[1]
        self.reserve(4 * window_pixels + render + _FITS_OVERHEAD_BYTES, "FITS render")
        return rows, cols


def _same_scale(scale: tuple[float, float], model_scale: float) -> bool:
    return all(abs(s / model_scale - 1) <= SCALE_TOLERANCE for s in scale)


def _check_scale(scale: tuple[float, float], spec: InputSpec) -> None:
    low, high = (spec.pixel_scale * ratio for ratio in SCALE_RATIO_RANGE)
    if all(low <= s <= high for s in scale):
        return
    shown = f"{scale[0]:.4g}" if scale[0] == scale[1] else f"{scale[0]:.4g}x{scale[1]:.4g}"
    raise CutoutError(
        CutoutErrorKind.INVALID,
        f'pixel scale {shown}"/px (from the WCS) is outside what this model accepts: '
        f'{low:.4g} to {high:.4g}"/px, 1/64 to 8 times its own {spec.pixel_scale}"/px; '
        "send a cutout nearer the model's scale, or fit=resize to fill the input whatever "
        "the scale",
    )


def read_cutout_file(path: Path, limits: DecodeLimits) -> bytes:
    """The bytes of a regular file of at most limits.max_bytes, read within read_timeout_s.

    Catalogs name files the reader does not control. The file is opened without blocking (a
    FIFO with no writer would block the open forever) and checked with fstat before a byte is
    read: a FIFO, device, directory or socket is refused, as is a symlink loop (ELOOP). Reading
    stops one byte past the limit whatever the size claimed (files in /proc claim 0), and a
    read still going after the timeout is abandoned between chunks; a read blocked inside
    the kernel (a hung network mount) is beyond what a process can interrupt.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        descriptor = os.open(path, flags)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if exc.errno == errno.ENXIO:  # what opening a Unix socket answers
            reason = "it is a socket or a device without a driver, not a regular file"
        raise CutoutError(CutoutErrorKind.INVALID, f"cannot read {str(path)!r}: {reason}") from None
    try:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode):
            raise CutoutError(
                CutoutErrorKind.INVALID,
                f"cannot read {str(path)!r}: it is {_file_kind(status.st_mode)}, "
                "not a regular file",
            )
        limits.check_encoded_size(status.st_size)
        return _read_bounded(descriptor, path, limits)
    except OSError as exc:
        raise CutoutError(
            CutoutErrorKind.INVALID, f"cannot read {str(path)!r}: {exc.strerror or exc}"
        ) from None
    finally:
        os.close(descriptor)


def _read_bounded(descriptor: int, path: Path, limits: DecodeLimits) -> bytes:
    deadline = time.monotonic() + limits.read_timeout_s
    chunks: list[bytes] = []
    total = 0
    while chunk := os.read(descriptor, min(_READ_CHUNK, limits.max_bytes + 1 - total)):
        chunks.append(chunk)
        total += len(chunk)
        if total > limits.max_bytes:
            raise CutoutError(
                CutoutErrorKind.TOO_LARGE,
                f"{str(path)!r} holds more than the limit of {limits.max_bytes} bytes",
            )
        if time.monotonic() > deadline:
            raise CutoutError(
                CutoutErrorKind.INVALID,
                f"cannot read {str(path)!r}: still reading after {limits.read_timeout_s:g} s "
                f"({total} bytes)",
            )
    return b"".join(chunks)


def _file_kind(mode: int) -> str:
    kinds = (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    )
    return next((name for test, name in kinds if test(mode)), "an unknown kind of file")


def _decode_fits(
    data: bytes,
    spec: InputSpec,
    stretch: Stretch,
    fit: str,
    limits: DecodeLimits,
    reserve: Reserve,
) -> DecodedCutout:
    window = _FitsWindow(spec, fit, reserve)
    fits_image = read_fits(data, limits, window=window, reserve=reserve)
    notes = list(fits_image.warnings)
    planes = fits_image.planes
    target = spec.input_size
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
        notes.append(f'no celestial WCS: pixel scale assumed to be {spec.pixel_scale}"/px')
    shape = window.source_shape
    fitted_shape = shape  # what the centre crop/pad starts from
    resampling = window.resampling
    if fit == "resize":
        if shape != target:
            planes = {b: resample_plane(p, target) for b, p in planes.items()}
            info.resized_from = (shape[0], shape[1])
            notes.append(
                f"resized from {shape[0]}x{shape[1]} to {target[0]}x{target[1]}: "
                "the angular scale differs from the model's"
            )
        fitted_shape = target
    elif resampling is not None:
        planes = {b: resample_plane(p, resampling.shape, resampling.box) for b, p in planes.items()}
        left, top, right, bottom = resampling.box
        info.resampled_from_scale = info.pixel_scale
        notes.append(
            f'resampled from {info.pixel_scale:.4g}"/px to the model\'s {spec.pixel_scale}"/px '
            f"({bottom - top:.4g}x{right - left:.4g} -> {resampling.shape[0]}x"
            f"{resampling.shape[1]} pixels)"
        )
        fitted_shape = resampling.shape
    if fits_image.single_band:
        notes.append(f"{SINGLE_BAND_WARNING} (sky-subtracted, noise-scaled, rendered grey)")
        planes = {b: normalise_single_band(p) for b, p in planes.items()}
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


def _decode_raster(
    data: bytes,
    fmt: CutoutFormat,
    spec: InputSpec,
    fit: str,
    limits: DecodeLimits,
    reserve: Reserve,
) -> DecodedCutout:
    target = spec.input_size
    reserve(_RASTER_FIT_BYTES_PER_PIXEL * target[0] * target[1], f"{fmt.label} fit")
    raster = read_raster(data, fmt, limits, reserve=reserve)
    grey = SINGLE_BAND_WARNING in raster.warnings
    info = PreprocessInfo(
        format=fmt.name,
        bands_used=["L"] if grey else ["R", "G", "B"],
        original_shape=raster.original_shape,
        warnings=raster.warnings,
        fit=fit,
    )
    image = fit_picture(raster.picture, target, fit, info, spec.interpolation)
    return DecodedCutout(image, info)


def fit_rgb(
    image: np.ndarray,
    target: tuple[int, int],
    fit: str,
    info: PreprocessInfo,
    interpolation: str,
) -> np.ndarray:
    """`fit_picture` for a uint8 (H, W, 3) array (the scorer's Galaxy10 images)."""
    return fit_picture(Image.fromarray(image, mode="RGB"), target, fit, info, interpolation)


def fit_picture(
    picture: Image.Image,
    target: tuple[int, int],
    fit: str,
    info: PreprocessInfo,
    interpolation: str,
) -> np.ndarray:
    """Bring an already rendered RGB or grey image to the model's input size as uint8
    (H, W, 3), resizing with the InputSpec's `interpolation`.

    "resize" resizes the centre window of the target's aspect (the framing is kept, the pixel
    scale is unknown); "crop_pad" keeps the pixel scale and centre-crops or pads with
    blank-sky grey. Only the input-sized result is copied out of the picture. What was done
    is recorded in `info`.
    """
    shape = (picture.height, picture.width)
    target = (target[0], target[1])
    if shape != target and fit == "resize":
        rows, cols = aspect_window(shape, target)
        window = (rows.stop - rows.start, cols.stop - cols.start)
        if window != shape:
            info.crop_pad_from = shape
        info.resized_from = window
        info.warnings.append(
            f"resized from {shape[0]}x{shape[1]} to {target[0]}x{target[1]} "
            "(pixel scale unknown: the framing is kept)"
        )
        return _rgb_array(resize_picture(picture, target, interpolation, (rows, cols)))
    if shape != target:
        info.crop_pad_from = shape
        info.warnings.append(
            f"centre crop/pad from {shape[0]}x{shape[1]} to {target[0]}x{target[1]} "
            "(padding is blank-sky grey)"
        )
        rows, cols = centre_window(shape[0], target[0]), centre_window(shape[1], target[1])
        centre = picture.crop((cols.start, rows.start, cols.stop, rows.stop))
        return crop_pad(_rgb_array(centre), target, BLANK_SKY_UINT8)
    return _rgb_array(picture)


def _rgb_array(picture: Image.Image) -> np.ndarray:
    pixels = np.asarray(picture)
    if pixels.ndim == 2:
        return np.repeat(pixels[..., None], 3, axis=2)
    return np.ascontiguousarray(pixels)


def fit_array(image: np.ndarray, spec: InputSpec, fit: str | None) -> DecodedCutout:
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
    fitted = fit_picture(picture, spec.input_size, info.fit, info, spec.interpolation)
    return DecodedCutout(fitted, info)
