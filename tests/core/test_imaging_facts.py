"""What a training file says about its images, per-row pixel scales, duplicates and the card."""

from __future__ import annotations

import io
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from galmorph.core.cutouts.resample import BLANK_SKY_UINT8, rescale_rgb
from galmorph.core.data.duplicates import duplicate_groups
from galmorph.core.data.galaxy10 import Galaxy10Error, Galaxy10File
from galmorph.core.data.splits import Split, make_split
from galmorph.core.inputspec import GALAXY10_DECALS, Imaging
from galmorph.core.modelfile.contract import ModelCard
from galmorph.training.synth import render_galaxy


def write(path: Path, images: np.ndarray, *, attrs: dict | None = None, **columns) -> Path:
    with h5py.File(path, "w") as handle:
        handle["images"] = images
        handle["ans"] = np.arange(len(images)) % 10
        for name, values in columns.items():
            handle[name] = values
        handle.attrs.update(attrs or {})
    return path


def square(size: int, side: int) -> np.ndarray:
    """A grey image with a white centred square of `side` pixels."""
    image = np.full((size, size, 3), 10, np.uint8)
    lo = (size - side) // 2
    image[lo : lo + side, lo : lo + side] = 250
    return image


def white_side(image: np.ndarray) -> int:
    return int((image[image.shape[0] // 2, :, 0] > 128).sum())


def test_defaults_are_galaxy10_decals(tmp_path: Path) -> None:
    data = Galaxy10File(write(tmp_path / "g.h5", np.zeros((2, 8, 8, 3), np.uint8)))
    assert data.imaging == GALAXY10_DECALS
    assert data.imaging == Imaging(0.262, "dr2_rgb", {"R": "z", "G": "r", "B": "g"})
    assert "defaults" in data.imaging_source


def test_attributes_state_the_imaging(tmp_path: Path) -> None:
    attrs = {"pixel_scale": 0.396, "stretch": "lupton", "bands": "irg"}
    data = Galaxy10File(write(tmp_path / "s.h5", np.zeros((2, 8, 8, 3), np.uint8), attrs=attrs))
    assert data.imaging == Imaging(0.396, "lupton", {"R": "i", "G": "r", "B": "g"})
    assert "pixel_scale" in data.imaging_source


def test_the_pxscale_column_gives_the_scale_when_no_attribute_does(tmp_path: Path) -> None:
    scales = np.array([1.048, 1.048, 1.048, 2.096])
    data = Galaxy10File(write(tmp_path / "c.h5", np.zeros((4, 8, 8, 3), np.uint8), pxscale=scales))
    assert data.imaging.pixel_scale == pytest.approx(1.048)
    assert data.rows_off_scale.tolist() == [3]


@pytest.mark.parametrize(
    ("attrs", "needle"),
    [({"bands": "zr"}, "bands"), ({"pixel_scale": -1.0}, "positive"), ({"pxscale": "x"}, "number")],
)
def test_bad_attributes_are_named(tmp_path: Path, attrs: dict, needle: str) -> None:
    path = write(tmp_path / "b.h5", np.zeros((2, 8, 8, 3), np.uint8), attrs=attrs)
    with pytest.raises(Galaxy10Error, match=needle):
        Galaxy10File(path)


def test_rows_at_another_scale_are_read_at_the_file_scale(tmp_path: Path) -> None:
    """A row at twice the pixel scale shows its galaxy half as big: read back, it matches."""
    images = np.stack([square(64, 16), square(64, 8)])
    path = write(
        tmp_path / "r.h5", images, attrs={"pixel_scale": 0.262}, pxscale=np.array([0.262, 0.524])
    )
    data = Galaxy10File(path)
    same, rescaled = data.images([0, 1])
    np.testing.assert_array_equal(same, images[0])
    assert abs(white_side(rescaled) - 16) <= 2
    np.testing.assert_array_equal(data.images([1], as_stored=True)[0], images[1])
    np.testing.assert_array_equal(data.image(1), rescaled)


def test_rescale_shrinks_and_pads_with_blank_sky() -> None:
    shrunk = rescale_rgb(square(64, 32), 0.5)
    assert shrunk.shape == (64, 64, 3) and abs(white_side(shrunk) - 16) <= 2
    assert shrunk[0, 0, 0] == BLANK_SKY_UINT8


def _jpeg_copy(image: np.ndarray) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=95)
    return np.asarray(Image.open(buffer))


def test_duplicates_exact_and_near_exact_but_not_lookalikes(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    # Round smooth galaxies (class 2) look alike: distinct ones must not be grouped.
    smooth = [render_galaxy(2, 64, rng).rgb for _ in range(12)]
    images = np.stack([*smooth, smooth[0], _jpeg_copy(smooth[5])])
    data = Galaxy10File(write(tmp_path / "d.h5", images))
    assert duplicate_groups(data, progress=False) == [[0, 12], [5, 13]]


def test_a_split_keeps_each_duplicate_group_on_one_side(tmp_path: Path) -> None:
    labels = np.repeat(np.arange(4), 25)
    groups = [[0, 1, 2, 3, 4, 5], [30, 31], [99, 50]]
    split = make_split(labels, seed=1, duplicate_groups=groups)
    for group in groups:
        sides = {
            name for name in ("train", "val", "test") for row in group if row in split.indices(name)
        }
        assert len(sides) == 1, (group, sides)
    assert sum(map(sum, split.class_counts.values())) == labels.size
    assert split.duplicate_groups == [[0, 1, 2, 3, 4, 5], [30, 31], [50, 99]]
    split.save(tmp_path / "split.json")
    assert Split.load(tmp_path / "split.json").duplicate_groups == split.duplicate_groups


def test_the_card_carries_the_field_of_view_and_interpolation() -> None:
    card = ModelCard("m", ("a", "b"), (64, 64), (0, 0, 0), (1, 1, 1), pixel_scale=1.048)
    assert card.field_of_view == pytest.approx((67.072, 67.072))
    metadata = card.to_metadata()
    assert metadata["galmorph.field_of_view"] == "[67.072, 67.072]"
    assert ModelCard.from_metadata(metadata) == card
    assert card.imaging == GALAXY10_DECALS.resized(256, 64)
    with pytest.raises(ValueError, match="interpolation"):
        ModelCard("m", ("a",), (64, 64), (0, 0, 0), (1, 1, 1), interpolation="nearest-ish")
