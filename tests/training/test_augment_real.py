"""Any-angle rotation (augment.rotation=any) and test-time views over more angles."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from galmorph.training.augment import (
    AugmentSettings,
    BatchAugmenter,
    dihedral_views,
    rotated_views,
)
from galmorph.training.config import ConfigError, TrainConfig

SIZE = 48
GALAXY = AugmentSettings(
    policy="galaxy", shift_fraction=0.0, scale_range=(1.0, 1.0), color_jitter=0
)


def _bar(n: int) -> torch.Tensor:
    """A bright horizontal bar on a grey sky: its orientation is easy to measure."""
    image = np.full((SIZE, SIZE, 3), 60, np.uint8)
    image[SIZE // 2 - 2 : SIZE // 2 + 2, 8:-8] = 250
    return torch.from_numpy(np.repeat(image[None], n, axis=0))


def _orientation_deg(image: np.ndarray) -> float:
    """The bar's angle from the image's second moments, folded into [0, 90)."""
    weight = image[..., 0].astype(np.float64) - 60
    ys, xs = np.mgrid[0:SIZE, 0:SIZE] - (SIZE - 1) / 2
    total = weight.sum()
    mxx, myy, mxy = (weight * xs * xs).sum(), (weight * ys * ys).sum(), (weight * xs * ys).sum()
    angle = 0.5 * math.degrees(math.atan2(2 * mxy / total, (mxx - myy) / total))
    return angle % 90


def _augment(settings: AugmentSettings, n: int = 64) -> np.ndarray:
    out = BatchAugmenter(settings, SIZE)(_bar(n), torch.Generator().manual_seed(3))
    return out.numpy()


def _distance_from_axes(angle: float) -> float:
    return min(angle, 90 - angle)


def test_dihedral_keeps_the_bar_on_the_axes() -> None:
    angles = [_orientation_deg(image) for image in _augment(GALAXY)]
    assert max(_distance_from_axes(a) for a in angles) < 1.0


def test_any_angle_turns_the_bar_off_the_axes() -> None:
    angles = [_orientation_deg(image) for image in _augment(replace(GALAXY, rotation="any"))]
    oblique = [a for a in angles if _distance_from_axes(a) > 10]
    assert len(oblique) > len(angles) // 2, angles


def test_any_angle_fills_the_corners_from_the_sky() -> None:
    """Reflection padding: a rotated sky has no black corners (they would be a cue)."""
    out = _augment(replace(GALAXY, rotation="any"))
    corners = out[:, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert corners.min() >= 55


def test_quarter_turn_views_are_the_dihedral_views() -> None:
    images = np.random.default_rng(0).integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
    turned = rotated_views(images, (0, 90, 180, 270))
    dihedral = dihedral_views(images)
    assert len(turned) == len(dihedral) == 8
    remaining = [v.tobytes() for v in dihedral]
    for view in turned:
        remaining.remove(view.tobytes())  # each view matches exactly one dihedral view
    assert remaining == []


def test_oblique_views_rotate_the_galaxy() -> None:
    views = rotated_views(_bar(1).numpy(), (0, 45))
    assert [round(_orientation_deg(v[0])) % 90 for v in views[:2]] == [0, 45]


def test_an_unknown_rotation_is_refused_by_name() -> None:
    config = TrainConfig(data="x.h5", out="runs/x", augment=replace(GALAXY, rotation="sideways"))
    with pytest.raises(ConfigError, match=r"augment\.rotation"):
        config.validate()
