"""Synthetic Galaxy10: determinism, layout, FITS cutouts consistent with the RGB images."""

from __future__ import annotations

import csv
from pathlib import Path

import h5py
import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from galmorph.cli import main
from galmorph.core.cutouts.imaging import dr2_rgb, flip_north_up, to_uint8
from galmorph.core.data.galaxy10 import GALAXY10_CLASS_NAMES, Galaxy10File
from galmorph.training.synth import class_labels, pixel_scale, render_galaxy, synthesize


def read_images(path: Path) -> np.ndarray:
    with h5py.File(path, "r") as handle:
        return np.asarray(handle["images"][()])


def test_layout_and_columns(tmp_path: Path) -> None:
    path = synthesize(tmp_path / "s.h5", n=30, size=64, seed=4, progress=False)
    data = Galaxy10File(path)
    assert data.num_images == 30 and data.image_shape == (64, 64, 3)
    assert data.class_names == GALAXY10_CLASS_NAMES
    np.testing.assert_array_equal(data.class_counts(), np.full(10, 3))
    assert set(data.columns) == {"ra", "dec", "redshift", "pxscale"}
    pxscale = data.column("pxscale")
    assert pxscale is not None
    np.testing.assert_allclose(pxscale, 0.262 * 4, rtol=1e-6)
    dec, redshift = data.column("dec"), data.column("redshift")
    assert dec is not None and redshift is not None
    assert np.all((dec > -21) & (dec < 34)) and np.all((redshift > 0) & (redshift < 0.2))
    images = data.images(range(30))
    # Dark sky with the dr2_rgb grey of blank sky (0.127 -> 32), bright galaxy cores.
    corners = np.concatenate([images[:, :8, :8], images[:, -8:, -8:]], axis=1)
    assert 25 <= np.median(corners) <= 40
    centres = images[:, 28:36, 28:36].max(axis=(1, 2, 3))
    assert np.median(centres) > 150


def test_deterministic_by_seed_whatever_the_workers(tmp_path: Path) -> None:
    a = synthesize(tmp_path / "a.h5", n=40, size=64, seed=7, progress=False)
    b = synthesize(tmp_path / "b.h5", n=40, size=64, seed=7, num_workers=2, progress=False)
    c = synthesize(tmp_path / "c.h5", n=40, size=64, seed=8, progress=False)
    assert read_images(a).tobytes() == read_images(b).tobytes()
    assert read_images(a).tobytes() != read_images(c).tobytes()
    assert Galaxy10File(a).fingerprint()["digest"] == Galaxy10File(b).fingerprint()["digest"]


def test_class_frequencies() -> None:
    galaxy10 = np.bincount(class_labels(17736, 0, "galaxy10"), minlength=10)
    np.testing.assert_array_equal(
        galaxy10, [1081, 1853, 2645, 2027, 334, 2043, 1829, 2628, 1423, 1873]
    )
    balanced = np.bincount(class_labels(1005, 0), minlength=10)
    assert balanced.max() - balanced.min() == 1 and balanced.sum() == 1005


def test_classes_differ_in_the_expected_ways() -> None:
    """Coarse physics checks: ellipticals redder than spiral arms, edge-ons elongated."""

    def mean_colour(label: int) -> float:
        ratios = []
        for i in range(6):
            cube = render_galaxy(label, 64, np.random.default_rng([99, label, i])).cube
            centre = cube[:, 24:40, 24:40].clip(0).sum(axis=(1, 2))
            ratios.append(centre[0] / centre[2])  # g / z flux: bluer is larger
        return float(np.median(ratios))

    assert mean_colour(2) < mean_colour(7)  # round smooth redder than loose spirals

    def elongation(label: int) -> float:
        values = []
        for i in range(6):
            image = render_galaxy(label, 64, np.random.default_rng([98, label, i])).cube[1]
            weights = np.clip(image - 3 * np.median(np.abs(image)), 0, None)[16:48, 16:48]
            y, x = np.mgrid[16:48, 16:48]
            total = weights.sum()
            mx, my = (weights * x).sum() / total, (weights * y).sum() / total
            cov = np.cov(np.stack([x.ravel() - mx, y.ravel() - my]), aweights=weights.ravel())
            eig = np.linalg.eigvalsh(cov)
            values.append(float(np.sqrt(eig[0] / eig[1])))
        return float(np.median(values))

    assert elongation(8) < 0.45 < elongation(2)


def test_fits_cutouts_and_catalog(tmp_path: Path) -> None:
    fits_dir = tmp_path / "cutouts"
    path = synthesize(tmp_path / "s.h5", n=12, size=96, seed=2, fits_dir=fits_dir, progress=False)
    data = Galaxy10File(path)
    with open(fits_dir / "catalog.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["id_str", "file_loc", "ra", "dec", "label"]
    assert len(rows) == 12
    ra, dec = data.column("ra"), data.column("dec")
    assert ra is not None and dec is not None
    for index, row in enumerate(rows):
        assert int(row["label"]) == data.labels[index]
        cutout = fits_dir / row["file_loc"]  # relative to the catalog's folder
        with fits.open(cutout) as hdul:
            header, cube = hdul[0].header, hdul[0].data
        assert cube.dtype == np.dtype(">f4") and cube.shape == (3, 96, 96)
        assert header["BANDS"] == "grz" and [header[f"BAND{i}"] for i in range(3)] == list("grz")
        assert header["BUNIT"] == "nanomaggy"
        assert header["CD1_1"] == pytest.approx(-pixel_scale(96) / 3600)
        assert header["CD2_2"] == pytest.approx(pixel_scale(96) / 3600)
        wcs = WCS(header, naxis=2)  # axis 3 is the band, as in real cutouts
        centre = wcs.pixel_to_world_values(47.5, 47.5)
        assert centre[0] == pytest.approx(ra[index], abs=1e-6)
        assert centre[1] == pytest.approx(dec[index], abs=1e-6)
        assert float(row["ra"]) == pytest.approx(ra[index], abs=1e-6)
        # Row 0 is south: rendering the cube like a real cutout gives the stored image.
        rgb = to_uint8(flip_north_up(dr2_rgb({b: cube[i] for i, b in enumerate("grz")})))
        np.testing.assert_array_equal(rgb, data.image(index))


def test_size_256_uses_the_legacy_survey_scale() -> None:
    assert pixel_scale(256) == pytest.approx(0.262)
    galaxy = render_galaxy(5, 256, np.random.default_rng(0))
    assert galaxy.rgb.shape == (256, 256, 3) and galaxy.cube.shape == (3, 256, 256)


def test_bad_options(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="size"):
        synthesize(tmp_path / "x.h5", n=2, size=32)
    with pytest.raises(ValueError, match="n must"):
        synthesize(tmp_path / "x.h5", n=0)
    assert (
        main(["data", "synth", "--out", str(tmp_path / "x.h5"), "--n", "2", "--size", "300"]) == 2
    )
    assert not (tmp_path / "x.h5").exists()


def test_cli_synth(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli.h5"
    args = ["data", "synth", "--out", str(out), "--n", "20", "--size", "64", "--seed", "3"]
    assert main([*args, "--quiet", "--class-balance", "galaxy10"]) == 0
    assert "wrote" in capsys.readouterr().out
    data = Galaxy10File(out)
    assert data.num_images == 20 and data.image_shape == (64, 64, 3)
    expected = np.bincount(class_labels(20, 3, "galaxy10"), minlength=10)
    np.testing.assert_array_equal(data.class_counts(), expected)
