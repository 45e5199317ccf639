"""Legacy Survey colour rendering of grz flux cubes (numpy only)."""

from __future__ import annotations

import numpy as np

# legacysurvey/imagine map/views.py `dr2_rgb`: band -> (output channel index, scale)
DR2_RGB_SCALES = {"g": (2, 6.0), "r": (1, 3.4), "z": (0, 2.2)}
DR2_RGB_M = 0.03
DR2_RGB_Q = 20.0


def dr2_rgb(bands: dict[str, np.ndarray]) -> np.ndarray:
    """Render g, r, z nanomaggy images with the viewer's `dr2_rgb` stretch.

    Returns float32 (H, W, 3) in [0, 1], channels R=z, G=r, B=g, in the array's own row order
    (apply `flip_north_up` for FITS data, whose row 0 is south).
    """
    first = next(iter(bands.values()))
    h, w = first.shape
    rgb = np.zeros((h, w, 3), np.float32)
    scaled = {}
    for band, (channel, scale) in DR2_RGB_SCALES.items():
        scaled[channel] = bands[band].astype(np.float32) * scale + DR2_RGB_M
    intensity = sum(np.maximum(0.0, scaled[c]) for c in range(3)) / 3.0
    intensity = np.where(intensity == 0, 1e-6, intensity)
    fI = np.arcsinh(DR2_RGB_Q * intensity) / np.sqrt(DR2_RGB_Q) / intensity
    for channel in range(3):
        rgb[..., channel] = scaled[channel] * fI
    return np.clip(rgb, 0.0, 1.0, out=rgb)


def flip_north_up(image: np.ndarray) -> np.ndarray:
    """FITS row 0 is south; the viewer's JPEGs (and Galaxy10) have north at the top."""
    return image[::-1]


def to_uint8(rgb: np.ndarray) -> np.ndarray:
    """[0, 1] float image to uint8, rounding as the viewer's JPEG writer does."""
    return np.clip(np.round(rgb * 255.0), 0, 255).astype(np.uint8)
