"""Decode untrusted PNG/JPEG cutouts with Pillow into RGB or grey, size checked before pixels.

Image.open is lazy: it reads the header only, so the declared size is checked against
`DecodeLimits` (and Pillow's own decompression-bomb guard, which stays on) before `load()`.
Truncated files stay errors (ImageFile.LOAD_TRUNCATED_IMAGES is left False).

Memory: before `load()` the caller is told the most the decode will take (`reserve`), from
the declared size and pixel mode: Pillow holds RGB at 4 bytes a pixel, grey at 1, 16-bit grey
at 2; a progressive JPEG also buffers 2 bytes per colour sample at full size. JPEGs are decoded
in full, never at libjpeg's reduced scales (Pillow's `draft`; why: the comment below).
A JPEG with more scans than `max_jpeg_scans` is refused unread: each progressive scan is a
pass over the full-size coefficients, so scan count, not file size, sets the CPU cost.
The image stays a Pillow image, so cropping and resizing never make numpy copies of a large
picture; `RasterImage.image` gives the uint8 (H, W, 3) array.

Pixel modes: RGB as is; RGBA/LA/PA drop alpha (warning); grey L stays one channel and is
copied to R, G and B at the end ("single band: no colour"); 16-bit grey is scaled by
255/65535 with rounding (warning); palette and CMYK are converted to RGB (warning). Other
modes are a 415.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, UnidentifiedImageError

from galmorph.core.cutouts.formats import CutoutFormat
from galmorph.core.cutouts.limits import (
    CutoutError,
    CutoutErrorKind,
    DecodeLimits,
    Reserve,
    reserve_nothing,
)

SINGLE_BAND_WARNING = "single band: no colour"
_SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I"}
_WITHOUT_ALPHA = {"RGBA": "RGB", "LA": "L", "PA": "RGB"}
# Bytes per pixel of a Pillow image in each mode (every multi-band mode uses 4).
_STORED_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I": 4, "F": 4}
_ROWS_PER_BLOCK = 64  # 16-bit to 8-bit conversion works in blocks of rows
# Why no JPEG is decoded at a reduced scale: libjpeg's scaled IDCT rounds to 8 bits at the
# reduced size, so it is not the full decode. On trained 32, 64 and 128 px models and the real
# Galaxy10 images at 256-4096 px a reduced decode moved the worst image's probabilities by up to
# 0.20 when it kept 1x the input's side, 0.04 at 2x, 0.015 at 4x and still 0.0025-0.009 at
# 8-64x: never within the 1e-3 a served answer may differ from the answer to the same pixels
# (benchmarks/bench_jpeg_draft.py, results/jpeg_draft.json). What it would save is bounded
# anyway: an 8192x8192 JPEG decodes in 0.35 s (0.73 s progressive) against 0.12 s reduced, and
# its 256 MiB (+384 MiB of progressive coefficients) come from the decode memory budget.
# Decoder state, Python objects and the conversions' row blocks, beyond the pictures.
_DECODE_OVERHEAD_BYTES = 8 * 2**20


@dataclass
class RasterImage:
    picture: Image.Image  # loaded, mode "RGB", or "L" for one band
    mode: str  # Pillow mode of the file
    original_shape: tuple[int, int, int]  # (H, W, 3) as declared
    warnings: list[str] = field(default_factory=list)

    @property
    def image(self) -> np.ndarray:
        """uint8 (H, W, 3)."""
        pixels = np.asarray(self.picture)
        return pixels if pixels.ndim == 3 else np.repeat(pixels[..., None], 3, axis=2)


def read_raster(
    data: bytes,
    fmt: CutoutFormat,
    limits: DecodeLimits,
    *,
    reserve: Reserve = reserve_nothing,
) -> RasterImage:
    """Decode a Pillow-read format (PNG, JPEG); raises CutoutError (413 too large, 415 mode,
    422 corrupt)."""
    if fmt.pillow_format is None:
        raise ValueError(f"format {fmt.name!r} is not read with Pillow")
    name = fmt.label
    try:
        # Thread note: catch_warnings swaps the global filter list; two threads doing the
        # same swap can at worst leave this one filter installed, and the explicit size check
        # below refuses the same images anyway.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=[fmt.pillow_format])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise CutoutError(
            CutoutErrorKind.TOO_LARGE, f"{name} image refused as a decompression bomb: {exc}"
        ) from None
    except UnidentifiedImageError:
        # Pillow's own message names the BytesIO it was given ("<_io.BytesIO object at 0x..>").
        raise CutoutError(
            CutoutErrorKind.INVALID, f"corrupt {name} file: Pillow cannot read it as {name}"
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise CutoutError(CutoutErrorKind.INVALID, f"corrupt {name} file: {exc}") from None
    width, height = image.size
    limits.check_declared_shape((height, width), f"{name} image")
    if Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS:
        raise CutoutError(
            CutoutErrorKind.TOO_LARGE,
            f"{name} image of {width}x{height} exceeds Pillow's bomb limit",
        )
    if image.format == "JPEG":
        _check_scan_count(data, limits)
    notes: list[str] = []
    reserve(_decode_bytes(image, (height, width)), f"{name} image")
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise CutoutError(
            CutoutErrorKind.INVALID, f"truncated or corrupt {name} file: {exc}"
        ) from None
    if getattr(image, "n_frames", 1) > 1:
        notes.append("animated image: only the first frame is used")
    if (
        image.format == "PNG"
        and len(data) > 24
        and data[24] == 16
        and image.mode not in _SIXTEEN_BIT_MODES
    ):
        notes.append("16-bit PNG reduced to 8 bit per channel")
    return RasterImage(_to_rgb_or_grey(image, name, notes), image.mode, (height, width, 3), notes)


def _check_scan_count(data: bytes, limits: DecodeLimits) -> None:
    # Entropy-coded data stuffs every 0xFF with 0x00, so each SOS marker found is a real
    # scan (or one of an embedded thumbnail's): an upper bound, read without decoding.
    scans = data.count(b"\xff\xda")
    if scans > limits.max_jpeg_scans:
        raise CutoutError(
            CutoutErrorKind.TOO_LARGE,
            f"JPEG has {scans} scans, over the limit of {limits.max_jpeg_scans} "
            "(a progressive JPEG has about 10): save it again as a baseline JPEG or a PNG",
        )


def _decode_bytes(image: Image.Image, declared: tuple[int, int]) -> int:
    """The most memory decoding and converting `image` takes: the decoded picture, its
    RGB or grey copy, libjpeg's full-size coefficients when progressive. (The fit to the
    model's input resizes from the picture in place, or crops at most the input's size.)"""
    pixels = image.size[0] * image.size[1]
    stored = _STORED_BYTES.get(image.mode, 4)
    if image.mode in _SIXTEEN_BIT_MODES:
        converted = stored + 2  # numpy copy of the values, the grey array, its Pillow copy
    elif image.mode in ("RGB", "L"):
        converted = 0
    else:
        converted = 4 + 1  # an RGB copy; the alpha plane checked as numpy
    total = pixels * (stored + converted) + _DECODE_OVERHEAD_BYTES
    if image.info.get("progressive") or image.info.get("progression"):
        total += _coefficient_bytes(image, declared)
    return total


def _coefficient_bytes(image: Image.Image, declared: tuple[int, int]) -> int:
    """A progressive JPEG's DCT coefficients, held for the whole image at full size whatever
    the scale decoded: 2 bytes per sample of each component (its sampling factors from the
    frame header, Pillow's `layer`; 3 full-size components when unknown)."""
    layer = getattr(image, "layer", None) or []
    factors = [(h, v) for _, h, v, _ in layer]
    samples = 3.0
    if factors:
        most = max(h for h, _ in factors) * max(v for _, v in factors)
        samples = sum(h * v for h, v in factors) / most
    return math.ceil(2 * samples * declared[0] * declared[1])


def _to_rgb_or_grey(image: Image.Image, name: str, notes: list[str]) -> Image.Image:
    if image.mode in _WITHOUT_ALPHA:
        alpha = np.asarray(image.getchannel("A"))
        notes.append(f"alpha channel dropped ({(alpha < 255).mean():.1%} of pixels not opaque)")
        del alpha
        image = image.convert(_WITHOUT_ALPHA[image.mode])
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT_MODES:
        notes.append("16-bit image scaled to 8 bit (x 255/65535)")
        notes.append(SINGLE_BAND_WARNING)
        return Image.fromarray(_sixteen_to_eight_bit(np.asarray(image)), mode="L")
    if mode in ("L", "1"):
        notes.append(SINGLE_BAND_WARNING)
        return image if mode == "L" else image.convert("L")
    if mode in ("P", "CMYK", "YCbCr"):
        notes.append(f"{mode} image converted to RGB")
        return image.convert("RGB")
    raise CutoutError(CutoutErrorKind.UNSUPPORTED, f"unsupported {name} pixel mode {mode!r}")


def _sixteen_to_eight_bit(wide: np.ndarray) -> np.ndarray:
    """round(v * 255 / 65535) clipped to 0..255, in integers, a block of rows at a time
    (v / 257 is never exactly half-way, so the integer rounding is exact)."""
    grey = np.empty(wide.shape, np.uint8)
    for start in range(0, wide.shape[0], _ROWS_PER_BLOCK):
        block = np.clip(wide[start : start + _ROWS_PER_BLOCK].astype(np.int32), 0, 65535)
        grey[start : start + _ROWS_PER_BLOCK] = (block * 510 + 65535) // 131070
    return grey
