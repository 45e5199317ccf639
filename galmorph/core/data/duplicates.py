"""Exact and near-exact duplicate images in a Galaxy10-layout file.

Galaxy10 DECaLS holds some galaxies twice (overlapping survey bricks, re-labelled rows). A copy on
each side of a split leaks test images into training, so splits keep every duplicate group on
one side. Exact copies share a SHA-256 of their pixels; near-exact ones (re-encoded or re-rendered
copies) share a coarse key (4x4-block grey means, quantised) and differ by at most
`NEAR_TOLERANCE` grey levels on 16x16-block means, which distinct galaxies - even smooth, round
ones - do not.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

if TYPE_CHECKING:
    from galmorph.core.data.galaxy10 import Galaxy10File

# Greatest difference, in grey levels, between 16x16-block means of near-exact copies.
NEAR_TOLERANCE = 2.0
_KEY_LEVELS = 8
_READ_BATCH = 512


def block_means(images: np.ndarray, blocks: int) -> np.ndarray:
    """Grey means over a blocks x blocks grid, float32 (N, blocks, blocks); sides are cropped to
    a multiple of `blocks`."""
    grey = images.astype(np.float32).mean(axis=3)
    n, height, width = grey.shape
    step_y, step_x = height // blocks, width // blocks
    grey = grey[:, : step_y * blocks, : step_x * blocks]
    return grey.reshape(n, blocks, step_y, blocks, step_x).mean(axis=(2, 4))


def duplicate_groups(data: Galaxy10File, *, progress: bool = True) -> list[list[int]]:
    """Groups (sorted row indices, each of two or more rows) of exact or near-exact copies."""
    parent = list(range(data.num_images))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(i: int, j: int) -> None:
        parent[find(i)] = find(j)

    exact: dict[bytes, int] = {}
    coarse: dict[bytes, list[int]] = defaultdict(list)
    fine = np.empty((data.num_images, 16, 16), np.float32)
    starts = range(0, data.num_images, _READ_BATCH)
    for start in tqdm(starts, desc="duplicates", unit="batch", disable=not progress, leave=False):
        rows = np.arange(start, min(start + _READ_BATCH, data.num_images))
        images = data.images(rows, as_stored=True)
        fine[rows] = block_means(images, 16)
        keys = np.floor(block_means(images, 4) * _KEY_LEVELS / 256).astype(np.uint8)
        for row, image, key in zip(rows.tolist(), images, keys, strict=True):
            digest = hashlib.sha256(image.tobytes()).digest()
            if digest in exact:
                union(row, exact[digest])
            else:
                exact[digest] = row
            coarse[key.tobytes()].append(row)
    for members in coarse.values():
        if len(members) < 2:
            continue
        means = fine[members].reshape(len(members), -1)
        for position, row in enumerate(members[:-1]):
            close = np.abs(means[position + 1 :] - means[position]).max(axis=1) <= NEAR_TOLERANCE
            for other in np.asarray(members[position + 1 :])[close].tolist():
                union(row, other)
    groups: dict[int, list[int]] = defaultdict(list)
    for row in range(data.num_images):
        groups[find(row)].append(row)
    return sorted(sorted(group) for group in groups.values() if len(group) > 1)
