"""Geometry of cutouts: resampling to the model's pixel scale, centre crop/pad, resizing.

Flux planes are resampled on float32 data before the stretch (Pillow mode "F"): shrinking
uses the BOX filter, an exact area average, and enlarging uses bilinear interpolation. Pixel
values keep their level (surface brightness is preserved), as the Legacy Survey viewer does
when it shows the sky at other zoom levels, so the stretch sees the same levels at any scale.

A cutout at another pixel scale is resampled straight from the part of the sky the model
sees (`plan_scale_resampling`): the output is never larger than the model's input, whatever
the ratio of the scales, and the source read is that field plus a 2-pixel margin for the
interpolation kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from galmorph.core.inputspec import DEFAULT_INTERPOLATION

# Blank sky in the viewer's dr2_rgb render: 0.127 * 255.
BLANK_SKY_UINT8 = 32
# Source pixels read beyond the model's field on each side: bilinear interpolation reaches
# one pixel past a sample, the BOX filter none.
RESAMPLE_MARGIN = 2

Box = tuple[float, float, float, float]  # left, top, right, bottom, in pixels


def resample_plane(plane: np.ndarray, shape: tuple[int, int], box: Box | None = None) -> np.ndarray:
    """Resample a float image (or its `box` region) to (H, W): area average when shrinking,
    bilinear otherwise."""
    height, width = shape
    left, top, right, bottom = box or (0.0, 0.0, float(plane.shape[1]), float(plane.shape[0]))
    shrinking = height <= bottom - top and width <= right - left
    flt = Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR
    image = Image.fromarray(np.ascontiguousarray(plane, np.float32), mode="F")
    return np.asarray(image.resize((width, height), flt, box=box), np.float32)


@dataclass(frozen=True)
class ScaleResampling:
    """How a cutout at one pixel scale becomes the model's field at the model's scale."""

    window: tuple[slice, slice]  # source rows and columns to read: the field plus a margin
    box: Box  # the field inside the window (source pixels, fractional)
    shape: tuple[int, int]  # output (H, W): the model's input, less where the source is smaller


def plan_scale_resampling(
    source_shape: tuple[int, int],
    source_scale: tuple[float, float],
    target_scale: float,
    target_shape: tuple[int, int],
) -> ScaleResampling:
    """The centred window of a (H, W) source at (x, y) arcsec/px that covers `target_shape`
    pixels at `target_scale`, and the output shape; the source centre stays the centre."""
    windows, starts, ends, sizes = [], [], [], []
    # numpy order: rows use the y scale, columns the x scale
    for size, scale, target in zip(
        source_shape, (source_scale[1], source_scale[0]), target_shape, strict=True
    ):
        field = target * target_scale / scale
        if field >= size:  # the whole axis fits in the field: it shrinks to its own extent
            low, high, out = 0.0, float(size), min(target, max(1, round(size / field * target)))
        else:
            low, high, out = (size - field) / 2, (size + field) / 2, target
        first = max(0, math.floor(low) - RESAMPLE_MARGIN)
        last = min(size, math.ceil(high) + RESAMPLE_MARGIN)
        windows.append(slice(first, last))
        starts.append(low - first)
        ends.append(high - first)
        sizes.append(out)
    return ScaleResampling(
        window=(windows[0], windows[1]),
        box=(starts[1], starts[0], ends[1], ends[0]),
        shape=(sizes[0], sizes[1]),
    )


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


def aspect_window(size: tuple[int, int], shape: tuple[int, int]) -> tuple[slice, slice]:
    """The centred rows and columns of a (H, W) image whose width/height is `shape`'s."""
    height, width = size
    target = shape[1] / shape[0]
    if abs(width / height - target) < 1e-3:
        return slice(0, height), slice(0, width)
    if width / height > target:
        return slice(0, height), centre_window(width, round(height * target))
    return centre_window(height, round(width / target)), slice(0, width)


def crop_to_aspect(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Centre-crop so width/height matches `shape`'s, so a resize does not distort galaxies."""
    rows, cols = aspect_window((image.shape[0], image.shape[1]), shape)
    return image[rows, cols]


# The Pillow filter behind each interpolation an InputSpec may name.
_FILTERS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}


def resize_rgb(
    image: np.ndarray, shape: tuple[int, int], interpolation: str = DEFAULT_INTERPOLATION
) -> np.ndarray:
    """Resize a uint8 RGB image with Pillow (antialiased when shrinking); `interpolation` is a
    model card's (bicubic is timm's eval interpolation)."""
    return np.asarray(resize_picture(Image.fromarray(image, mode="RGB"), shape, interpolation))


def resize_picture(
    picture: Image.Image,
    shape: tuple[int, int],
    interpolation: str = DEFAULT_INTERPOLATION,
    window: tuple[slice, slice] | None = None,
) -> Image.Image:
    """`resize_rgb` on a Pillow image, of its `window` (rows, columns) when given: the window is
    read in place, never copied out (neighbours outside it feed the filter at its edges)."""
    height, width = shape
    box = None
    if window is not None:
        rows, cols = window
        box = (cols.start, rows.start, cols.stop, rows.stop)
    return picture.resize((width, height), _FILTERS[interpolation], box=box)


def resize_images(
    images: np.ndarray, size: int, interpolation: str = DEFAULT_INTERPOLATION
) -> np.ndarray:
    """uint8 NHWC batch to size x size with `resize_rgb`, the resize the server applies.

    Evaluation and export checks use it too, so reported metrics are measured on the pixels a
    served model receives.
    """
    if tuple(images.shape[1:3]) == (size, size):
        return images
    return np.stack([resize_rgb(image, (size, size), interpolation) for image in images])


def rescale_rgb(
    image: np.ndarray, zoom: float, interpolation: str = DEFAULT_INTERPOLATION
) -> np.ndarray:
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
