"""Contact sheets: a grid of labelled thumbnails, to look at a data set at a glance."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (24, 24, 24)
TEXT_COLOUR = (230, 230, 230)


def examples_per_class(labels: np.ndarray, per_class: int, *, seed: int = 0) -> np.ndarray:
    """Up to `per_class` seeded random indices of each class, grouped by class."""
    rng = np.random.default_rng(seed)
    chosen = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        chosen.append(np.sort(rng.choice(members, min(per_class, members.size), replace=False)))
    return np.concatenate(chosen) if chosen else np.zeros(0, np.int64)


def contact_sheet(
    images: np.ndarray,
    labels: Sequence[int] | np.ndarray,
    class_names: Sequence[str],
    path: str | os.PathLike[str],
    *,
    columns: int | None = None,
    thumb_size: int = 128,
    title: str | None = None,
) -> Path:
    """Write a PNG grid of uint8 (N, H, W, 3) images with each class name under its image."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    labels = np.asarray(labels)
    if labels.shape != (images.shape[0],):
        raise ValueError(f"{images.shape[0]} images but labels of shape {labels.shape}")
    if images.shape[0] == 0:
        raise ValueError("no images to put on a contact sheet")
    font = ImageFont.load_default(size=max(10, thumb_size // 11))
    line_height = int(font.getbbox("Ag")[3]) + 2
    captions = [_wrap(f"{int(k)} {class_names[int(k)]}", font, thumb_size) for k in labels]
    caption_height = line_height * max(len(c) for c in captions) + 4
    count = images.shape[0]
    columns = columns or min(count, 10)
    rows = -(-count // columns)
    title_height = line_height + 8 if title else 0
    cell_w, cell_h = thumb_size + 4, thumb_size + caption_height + 4
    sheet = Image.new("RGB", (columns * cell_w, title_height + rows * cell_h), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((4, 4), title, fill=TEXT_COLOUR, font=font)
    for i, (image, caption) in enumerate(zip(images, captions, strict=True)):
        x = (i % columns) * cell_w + 2
        y = title_height + (i // columns) * cell_h + 2
        thumb = Image.fromarray(image).resize((thumb_size, thumb_size), Image.Resampling.LANCZOS)
        sheet.paste(thumb, (x, y))
        for line_index, line in enumerate(caption):
            draw.text(
                (x, y + thumb_size + 2 + line_index * line_height),
                line,
                fill=TEXT_COLOUR,
                font=font,
            )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def _wrap(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int) -> list[str]:
    """Greedy word wrap by rendered width, at most two lines (the second cut with an ellipsis)."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    if len(lines) > 2:
        lines = [lines[0], " ".join(lines[1:])]
    while font.getlength(lines[-1]) > width and len(lines[-1]) > 1:
        lines[-1] = lines[-1][:-2] + "…"
    return lines
