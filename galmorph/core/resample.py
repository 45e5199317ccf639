"""Geometry of cutouts: resampling to the model's pixel scale, centre crop/pad, resizing.

Flux planes are resampled on float32 data before the stretch (Pillow mode "F"): shrinking
uses the BOX filter, an exact area average, and enlarging uses bilinear interpolation. Pixel
values keep their level (surface brightness is preserved), as the Legacy Survey viewer does
when it shows the sky at other zoom levels, so the stretch sees the same levels at any scale.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# Blank sky in the viewer's dr2_rgb render: 0.127 * 255.
BLANK_SKY_UINT8 = 32


def resample_plane(plane: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resample a float image to (H, W): area average when shrinking, bilinear otherwise."""
    height, width = shape
    shrinking = height <= plane.shape[0] and width <= plane.shape[1]
    flt = Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR
    image = Image.fromarray(np.ascontiguousarray(plane, np.float32), mode="F")
    return np.asarray(image.resize((width, height), flt), np.float32)


def centre_window(size: int, window: int) -> slice:
    """The centred slice of length min(size, window) within an axis of `size`."""
    length = min(size, window)
    start = (size - length) // 2
    return slice(start, start + length)


def crop_pad(image: np.ndarray, shape: tuple[int, int], fill: float) -> np.ndarray:
    """Centre-crop and/or pad the first two axes to `shape` (the centre pixel stays centred)."""
    height, width = shape
    rows = centre_window(image.shape[0], height)
    cols = centre_window(image.shape[1], width)
    cropped = image[rows, cols]
    if cropped.shape[:2] == (height, width):
        return cropped
    out = np.full((height, width, *image.shape[2:]), fill, dtype=image.dtype)
    top = (height - cropped.shape[0]) // 2
    left = (width - cropped.shape[1]) // 2
    out[top : top + cropped.shape[0], left : left + cropped.shape[1]] = cropped
    return out


def crop_to_aspect(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Centre-crop so width/height matches `shape`'s, so a resize does not distort galaxies."""
    height, width = image.shape[:2]
    target = shape[1] / shape[0]
    if abs(width / height - target) < 1e-3:
        return image
    if width / height > target:
        return image[:, centre_window(width, round(height * target))]
    return image[centre_window(height, round(width / target))]


# How rendered images are resized to a model's input: the names a model card may give.
_FILTERS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}
INTERPOLATIONS = tuple(_FILTERS)


def resize_rgb(
    image: np.ndarray, shape: tuple[int, int], interpolation: str = "bicubic"
) -> np.ndarray:
    """Resize a uint8 RGB image with Pillow (antialiased when shrinking); `interpolation` is a
    model card's (bicubic is timm's eval interpolation)."""
    height, width = shape
    resized = Image.fromarray(image, mode="RGB").resize((width, height), _FILTERS[interpolation])
    return np.asarray(resized)


def resize_images(images: np.ndarray, size: int, interpolation: str = "bicubic") -> np.ndarray:
    """uint8 NHWC batch to size x size with `resize_rgb`, the resize the server applies.

    Evaluation and export checks use it too, so reported metrics are measured on the pixels a
    served model receives.
    """
    if tuple(images.shape[1:3]) == (size, size):
        return images
    return np.stack([resize_rgb(image, (size, size), interpolation) for image in images])


def rescale_rgb(image: np.ndarray, zoom: float, interpolation: str = "bicubic") -> np.ndarray:
    """A rendered image at `zoom` times the wanted pixel scale, brought to the wanted scale at
    the same size: zoom > 1 (it covers more sky) crops the centre and enlarges it; zoom < 1
    shrinks it and pads with blank sky. The centre stays centred."""
    height, width = image.shape[:2]
    if zoom >= 1:
        window = image[
            centre_window(height, round(height / zoom)), centre_window(width, round(width / zoom))
        ]
        return resize_rgb(np.ascontiguousarray(window), (height, width), interpolation)
    shrunk = resize_rgb(
        image, (max(1, round(height * zoom)), max(1, round(width * zoom))), interpolation
    )
    return crop_pad(shrunk, (height, width), BLANK_SKY_UINT8)
