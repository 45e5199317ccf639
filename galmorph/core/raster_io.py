"""Decode untrusted PNG/JPEG cutouts with Pillow into uint8 RGB, size checked before pixels.

Image.open is lazy: it reads the header only, so the declared size is checked against
`DecodeLimits` (and Pillow's own decompression-bomb guard, which stays on) before `load()`.
Truncated files stay errors (ImageFile.LOAD_TRUNCATED_IMAGES is left False).

Pixel modes: RGB as is; RGBA/LA drop alpha (warning); grey L is copied to R, G and B
("single band: no colour"); 16-bit grey is scaled by 255/65535 with rounding (warning);
palette and CMYK are converted to RGB (warning). Other modes are a 415.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, UnidentifiedImageError

from galmorph.core.cutout_limits import CutoutError, CutoutErrorKind, DecodeLimits
from galmorph.core.formats import CutoutFormat

SINGLE_BAND_WARNING = "single band: no colour"
_SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I"}
_WITHOUT_ALPHA = {"RGBA": "RGB", "LA": "L", "PA": "RGB"}


@dataclass
class RasterImage:
    image: np.ndarray  # uint8 (H, W, 3)
    mode: str  # Pillow mode of the file
    warnings: list[str] = field(default_factory=list)


def read_raster(data: bytes, fmt: CutoutFormat, limits: DecodeLimits) -> RasterImage:
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
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise CutoutError(CutoutErrorKind.INVALID, f"corrupt {name} file: {exc}") from None
    width, height = image.size
    limits.check_declared_shape((height, width), f"{name} image")
    if Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS:
        raise CutoutError(
            CutoutErrorKind.TOO_LARGE,
            f"{name} image of {width}x{height} exceeds Pillow's bomb limit",
        )
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise CutoutError(
            CutoutErrorKind.INVALID, f"truncated or corrupt {name} file: {exc}"
        ) from None
    notes: list[str] = []
    if getattr(image, "n_frames", 1) > 1:
        notes.append("animated image: only the first frame is used")
    if (
        image.format == "PNG"
        and len(data) > 24
        and data[24] == 16
        and image.mode not in _SIXTEEN_BIT_MODES
    ):
        notes.append("16-bit PNG reduced to 8 bit per channel")
    return RasterImage(_to_rgb(image, name, notes), image.mode, notes)


def _to_rgb(image: Image.Image, name: str, notes: list[str]) -> np.ndarray:
    if image.mode in _WITHOUT_ALPHA:
        alpha = np.asarray(image.getchannel("A"))
        notes.append(f"alpha channel dropped ({(alpha < 255).mean():.1%} of pixels not opaque)")
        image = image.convert(_WITHOUT_ALPHA[image.mode])
    mode = image.mode
    if mode == "RGB":
        return np.asarray(image)
    if mode in _SIXTEEN_BIT_MODES:
        wide = np.asarray(image).astype(np.float32)
        grey = np.clip(np.round(wide * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
        notes.append("16-bit image scaled to 8 bit (x 255/65535)")
        notes.append(SINGLE_BAND_WARNING)
        return np.repeat(grey[..., None], 3, axis=2)
    if mode in ("L", "1"):
        notes.append(SINGLE_BAND_WARNING)
        grey = np.asarray(image.convert("L"))
        return np.repeat(grey[..., None], 3, axis=2)
    if mode in ("P", "CMYK", "YCbCr"):
        notes.append(f"{mode} image converted to RGB")
        return np.asarray(image.convert("RGB"))
    raise CutoutError(CutoutErrorKind.UNSUPPORTED, f"unsupported {name} pixel mode {mode!r}")
