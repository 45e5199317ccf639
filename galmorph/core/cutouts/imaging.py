"""Colour rendering of flux images into the 8-bit RGB the model was trained on (numpy only).

Every stretch renders Legacy Survey g, r, z images in nanomaggies (colour, `render_bands`)
and a single band (grey, `render_grey`). Single-band images reach `render_grey` already
converted to "nanomaggy-like" units by `normalise_single_band`, so the same stretch
constants apply and blank sky comes out at the same grey as in the viewer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

# legacysurvey/imagine map/views.py `dr2_rgb`: band -> (output channel index, scale)
DR2_RGB_SCALES = {"g": (2, 6.0), "r": (1, 3.4), "z": (0, 2.2)}
DR2_RGB_M = 0.03
DR2_RGB_Q = 20.0
RGB_BANDS = ("g", "r", "z")

# Lupton et al. (2004) via astropy, on the dr2_rgb band scalings so the colour balance matches
# the viewer (fluxes below are nanomaggies times those scales, black at 0). astropy's
# LuptonAsinhStretch is y = asinh(Q*x/stretch) * 0.1/asinh(0.1*Q): slope 1.09/stretch near 0
# and saturation at x = 95*stretch for Q = 8. stretch = 0.5 lifts DECaLS sky noise (~0.025)
# about 14 grey levels above black, so faint discs stay visible, and saturates at 48 (only
# bright cores); Q = 8 is astropy's default softening.
LUPTON_Q = 8.0
LUPTON_STRETCH = 0.5

# Typical DECaLS per-pixel r-band sky noise in nanomaggies: a 5-sigma point-source depth of
# r = 23.9 mag (0.275 nmgy) over a ~56-pixel PSF footprint (1.3" FWHM) gives 0.055/sqrt(56).
SINGLE_BAND_NOISE_NMGY = 0.0074
SINGLE_BAND_SCALE = DR2_RGB_SCALES["r"][1]
_MAD_TO_SIGMA = 1.4826


def dr2_rgb(bands: Mapping[str, np.ndarray]) -> np.ndarray:
    """Render g, r, z nanomaggy images with the viewer's `dr2_rgb` stretch.

    Returns float32 (H, W, 3) in [0, 1], channels R=z, G=r, B=g, in the array's own row order
    (apply `flip_north_up` for FITS data, whose row 0 is south).
    """
    # Channel planes (R, G, B) = (z, r, g), each x_b * s_b + m; planar arrays keep it fast.
    planes = [
        np.asarray(bands[band], np.float32) * np.float32(scale) + np.float32(DR2_RGB_M)
        for band, (_, scale) in sorted(DR2_RGB_SCALES.items(), key=lambda item: item[1][0])
    ]
    intensity = np.maximum(planes[0], 0.0)
    for plane in planes[1:]:
        intensity += np.maximum(plane, 0.0)
    intensity /= np.float32(3.0)
    intensity[intensity == 0] = np.float32(1e-6)
    gain = np.arcsinh(np.float32(DR2_RGB_Q) * intensity)
    gain /= np.float32(np.sqrt(DR2_RGB_Q)) * intensity
    rgb = np.stack([plane * gain for plane in planes], axis=-1)
    return np.clip(rgb, 0.0, 1.0, out=rgb)


def dr2_grey(image: np.ndarray) -> np.ndarray:
    """`dr2_rgb` for one band: with I = x*s + m the colour formula reduces to asinh(Q*I)/sqrt(Q).

    Uses the r-band scale; blank sky (0) renders to the viewer's 0.127 grey.
    """
    intensity = np.maximum(np.asarray(image, np.float32) * SINGLE_BAND_SCALE + DR2_RGB_M, 0.0)
    grey = np.arcsinh(DR2_RGB_Q * intensity) / np.float32(np.sqrt(DR2_RGB_Q))
    return np.clip(grey, 0.0, 1.0).astype(np.float32, copy=False)


def lupton_rgb(bands: Mapping[str, np.ndarray]) -> np.ndarray:
    """Lupton et al. asinh colour composite (astropy's make_lupton_rgb), R=z, G=r, B=g."""
    from astropy.visualization import make_lupton_rgb

    planes = [
        np.asarray(bands[band], np.float32) * DR2_RGB_SCALES[band][1] for band in ("z", "r", "g")
    ]
    with np.errstate(invalid="ignore", divide="ignore"):  # astropy divides 0/0 where I = 0
        rgb = make_lupton_rgb(*planes, stretch=LUPTON_STRETCH, Q=LUPTON_Q, output_dtype=np.float64)
    return np.asarray(rgb, np.float32)


def lupton_grey(image: np.ndarray) -> np.ndarray:
    """`lupton_rgb` of one band in all three channels (equal channels stay grey)."""
    plane = np.asarray(image, np.float32)
    return lupton_rgb({"g": plane, "r": plane, "z": plane}).mean(axis=2)


@dataclass(frozen=True)
class Stretch:
    """A named rendering: colour for g, r, z nanomaggies, grey for one normalised band."""

    name: str
    description: str
    render_bands: Callable[[Mapping[str, np.ndarray]], np.ndarray]
    render_grey: Callable[[np.ndarray], np.ndarray]


STRETCHES: dict[str, Stretch] = {
    s.name: s
    for s in (
        Stretch(
            "dr2_rgb",
            "Legacy Survey viewer asinh stretch (Galaxy10 DECaLS look; blank sky 0.127 grey)",
            dr2_rgb,
            dr2_grey,
        ),
        Stretch(
            "lupton",
            f"Lupton et al. asinh composite (astropy), stretch={LUPTON_STRETCH}, Q={LUPTON_Q}",
            lupton_rgb,
            lupton_grey,
        ),
    )
}


def get_stretch(name: str) -> Stretch:
    """Look a stretch up by name; KeyError names the valid ones."""
    try:
        return STRETCHES[name]
    except KeyError:
        raise KeyError(
            f"unknown stretch {name!r}; valid stretches: {', '.join(sorted(STRETCHES))}"
        ) from None


def normalise_single_band(image: np.ndarray) -> np.ndarray:
    """Bring one band of unknown units to DECaLS-like nanomaggies: sky 0, sky noise 0.0074.

    Sky = median, noise = 1.4826 x MAD (robust to the galaxy itself); when the MAD is zero
    (flat or mostly empty images) the 0.5..99.5 percentile range stands in for the noise scale.
    """
    data = np.asarray(image, np.float32)
    sky = np.float32(np.median(data))
    residual = data - sky
    noise = _MAD_TO_SIGMA * float(np.median(np.abs(residual)))
    if not noise > 0:
        low, high = np.percentile(residual, [0.5, 99.5])
        noise = float(high - low) / 100.0
    if not noise > 0:
        return np.zeros_like(data)
    return residual * np.float32(SINGLE_BAND_NOISE_NMGY / noise)


def flip_north_up(image: np.ndarray) -> np.ndarray:
    """FITS row 0 is south; the viewer's JPEGs (and Galaxy10) have north at the top."""
    return image[::-1]


def to_uint8(rgb: np.ndarray) -> np.ndarray:
    """[0, 1] float image to uint8, rounding as the viewer's JPEG writer does."""
    return np.clip(np.round(rgb * 255.0), 0, 255).astype(np.uint8)
