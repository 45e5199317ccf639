"""Small stand-ins for every file the docs' commands name, made once per test session.

Each document then runs in its own copy of this folder (tests/journeys/test_docs.py), so a command
that writes (`--out runs/a4`, `scores/`) never sees another document's output.
"""

from __future__ import annotations

import csv
import gzip
import shutil
from pathlib import Path

from PIL import Image

from galmorph.training.synth import synthesize
from tests.docs_support.blocks import REPO_ROOT
from tests.support.real_data import REAL_DATA

# Galaxy10's ten classes, balanced: 6 rows each leaves the paper recipe's 10 % validation and
# test shares one row per class, so export has rows to calibrate and fit the OOD threshold on.
GALAXY10_ROWS = 60
OWN_ROWS, OWN_TEST_ROWS = 40, 20
CATALOG_ROWS = 6
POSITIONS = ((202.4696, 47.1952), (150.1, 2.2), (10.68, 41.27), (359.5, -0.5))


def build(root: Path, model: Path) -> Path:
    """Fill `root` with the stand-ins; `model` is a small trained and exported .onnx."""
    synth = root / "data" / "Galaxy10_DECals.h5"
    synth.parent.mkdir(parents=True)
    synthesize(synth, n=GALAXY10_ROWS, size=64, seed=0, progress=False)
    synthesize(root / "mine.h5", n=OWN_ROWS, size=64, seed=1, progress=False)
    synthesize(root / "my_test.h5", n=OWN_TEST_ROWS, size=64, seed=2, progress=False)

    (root / "models").mkdir()
    shutil.copyfile(model, root / "models" / "model.onnx")
    shutil.copyfile(model, root / "model.onnx")
    shutil.copytree(REPO_ROOT / "configs", root / "configs")

    # Legacy-Survey-style grz flux cubes at 0.262"/px with their catalog (id_str, file_loc, ...).
    fits_dir = root / "cutouts_fits"
    synthesize(root / "held_out.h5", n=CATALOG_ROWS, size=64, seed=3, fits_dir=fits_dir,
               progress=False)  # fmt: skip
    _relocate_catalog(fits_dir / "catalog.csv", root / "catalog.csv", prefix="cutouts_fits")
    first_cube = sorted(fits_dir.glob("*.fits"))[0]
    shutil.copyfile(first_cube, root / "cutout.fits")

    # Real images (tests/data): an HST single-band FITS and Galaxy10 DECaLS JPEG/PNG cutouts.
    with gzip.open(REAL_DATA / "hst-fits" / "abell_2744_spiral_galaxy_f105w.fits.gz") as hst:
        (root / "a.fits").write_bytes(hst.read())
    real = REAL_DATA / "galaxy10-real"
    shutil.copyfile(real / "sample_6_Barred_Spiral.jpg", root / "galaxy.jpg")
    shutil.copyfile(real / "sample_3_Round_Smooth.jpg", root / "b.jpg")
    Image.open(real / "sample_8_Unbarred_Loose_Spiral.jpg").save(root / "b.png")
    Image.open(real / "sample_9_Edge_on_without_Bulge.jpg").save(root / "other.png")

    with (root / "positions.csv").open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["id_str", "ra", "dec"])
        writer.writerows((f"pos{i}", ra, dec) for i, (ra, dec) in enumerate(POSITIONS))
    return root


def _relocate_catalog(source: Path, target: Path, *, prefix: str) -> None:
    """The synthesizer's catalog, its relative paths made relative to `target`'s folder."""
    with source.open(newline="") as inp:
        rows = list(csv.DictReader(inp))
    with target.open("w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "file_loc": f"{prefix}/{row['file_loc']}"})
