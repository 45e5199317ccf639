"""Journeys: the documented flows chained as a user types them, each on fresh temporary data.

Every part has its own tests; these walk the seams between them. The commands are the
README's and docs/scoring.md's, run as real `galmorph` processes in a working folder, with
only file names and sizes made small (`--set epochs=1`, a 64 px tiny model, short catalogs).

- own galaxies: a 4-class file (named in the file, or with `--class-names`) -> the small-data
  recipe -> evaluate on a separate file -> export with calibration and the OOD score -> model
  inspect -> serve -> classify -> score, and the Python API on the same files as the server;
- positions: a catalog of ra/dec -> `galmorph fetch` with the documented flags -> offline
  `galmorph score` from that cache with zero requests;
- a survey catalog with missing and corrupt cutouts in long runs: every row is scored or an
  error row, and the run exits 0.
"""

from __future__ import annotations

import json
import shlex
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest

from galmorph.api.classifier import Classifier
from tests.support.server_process import RunningServer, serve
from tests.support.sky_stub import SkyStub
from tests.support.training_helpers import (
    FOUR_CLASSES,
    REPO_ROOT,
    TINY_SYNTHETIC_START,
    child_env,
    four_class_file,
    galmorph_command,
    make_synthetic,
)

# The recipe as the README types it; the sizes are the only change (a test budget, not a recipe).
SMALL = ("--model", "gm_astroformer_tiny", "--set", "epochs=3", "--set", "img_size=64")
# When the recipe starts from the synthetic point: a seconds-long one (tests/conftest.py caches it).
SMALL += TINY_SYNTHETIC_START
REAL_PNGS = sorted((REPO_ROOT / "tests/data/galaxy10-real").glob("*.png"))
# The galaxies themselves, not the error map or the PSF.
REAL_FITS = sorted((REPO_ROOT / "tests/data/hst-fits").glob("abell_2744_*_galaxy_f105w.fits.gz"))


@dataclass
class Workdir:
    """A user's working folder: commands run in it and relative paths are the user's."""

    root: Path

    def run(self, line: str, timeout: float = 300, expect: int = 0, stdout: bool = False) -> str:
        """Run one documented command line; fail with the step and its output when it fails.

        Returns what it printed (stdout and stderr; only stdout with `stdout=True`).
        """
        args = shlex.split(line)
        assert args[0] == "galmorph", line
        done = subprocess.run(
            galmorph_command(*args[1:]),
            cwd=self.root,
            env=child_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        output = done.stdout + done.stderr
        assert done.returncode == expect, (
            f"`{line}` exited {done.returncode} (expected {expect}):\n{output[-4000:]}"
        )
        assert "Traceback" not in output, f"`{line}` printed a traceback:\n{output[-4000:]}"
        return done.stdout if stdout else output


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("synthetic")
    return {
        "train": make_synthetic(root / "train.h5", n=160, seed=11),
        "test": make_synthetic(root / "test.h5", n=48, seed=12),
    }


@dataclass(frozen=True)
class OwnGalaxies:
    work: Workdir
    model: Path
    printed: dict[str, str]  # each step's output, by step name


@pytest.fixture(scope="module")
def own_galaxies(
    synthetic: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> OwnGalaxies:
    """README "Train on your own labelled galaxies", as typed, with class names in the file."""
    work = Workdir(tmp_path_factory.mktemp("own_galaxies"))
    (work.root / "configs").symlink_to(REPO_ROOT / "configs")
    four_class_file(work.root / "mine.h5", synthetic["train"], FOUR_CLASSES)
    four_class_file(work.root / "my_test.h5", synthetic["test"], FOUR_CLASSES)
    recipe = " ".join(SMALL)
    printed = {
        "train": work.run(
            "galmorph train --data mine.h5 --out runs/mine --config configs/small_data.yaml "
            + recipe
        ),
        "evaluate": work.run("galmorph evaluate runs/mine --data my_test.h5 --tta"),
        "export": work.run("galmorph export runs/mine --data my_test.h5 --out models/mine.onnx"),
        "inspect": work.run("galmorph model inspect models/mine.onnx"),
    }
    return OwnGalaxies(work, work.root / "models/mine.onnx", printed)


def card_of(work: Workdir, model: str) -> dict:
    return json.loads(work.run(f"galmorph model inspect {model} --json", stdout=True))


def test_own_galaxies_train_evaluate_export_inspect(own_galaxies: OwnGalaxies) -> None:
    printed = own_galaxies.printed
    assert "top-1" in printed["evaluate"].lower() or "top1" in printed["evaluate"].lower()
    for name in FOUR_CLASSES:
        assert name in printed["inspect"], f"class {name!r} missing from the card"
    card = card_of(own_galaxies.work, "models/mine.onnx")
    assert list(card["class_names"]) == list(FOUR_CLASSES)
    # Calibration and the OOD score were fitted, not silently dropped.
    assert card["calibration"]["temperature"] > 0, card["calibration"]
    assert card["ood"]["threshold"] > 0, card["ood"]
    assert card["pixel_scale"] == pytest.approx(1.048, abs=1e-6)


def test_own_galaxies_with_class_names_flag_export(
    synthetic: dict[str, Path], tmp_path: Path
) -> None:
    """A file naming no classes, trained with --class-names: the names travel to the export."""
    work = Workdir(tmp_path)
    (tmp_path / "configs").symlink_to(REPO_ROOT / "configs")
    four_class_file(tmp_path / "mine.h5", synthetic["train"], None)
    four_class_file(tmp_path / "my_test.h5", synthetic["test"], None)
    names = ",".join(FOUR_CLASSES)
    work.run(
        f"galmorph train --data mine.h5 --out runs/mine --config configs/small_data.yaml "
        f"--class-names {names} {' '.join(SMALL)}"
    )
    work.run(f"galmorph evaluate runs/mine --data my_test.h5 --class-names {names}")
    work.run("galmorph export runs/mine --data my_test.h5 --out models/mine.onnx")
    assert list(card_of(work, "models/mine.onnx")["class_names"]) == list(FOUR_CLASSES)


@pytest.fixture(scope="module")
def server(own_galaxies: OwnGalaxies) -> Iterator[RunningServer]:
    with serve(own_galaxies.model, own_galaxies.work.root) as running:
        yield running


def cutouts_of(work: Workdir) -> list[Path]:
    """The user's cutouts: real Galaxy10 PNGs, real HST FITS, and survey-style grz FITS."""
    folder = work.root / "cutouts"
    if not folder.exists():
        folder.mkdir()
        for source in [*REAL_PNGS[:4], *REAL_FITS[:2]]:
            (folder / source.name).write_bytes(source.read_bytes())
        work.run("galmorph data synth --out survey.h5 --n 4 --size 64 --fits-dir cutouts --quiet")
    return sorted(p for p in folder.iterdir() if p.name.endswith((".png", ".fits", ".fits.gz")))


def test_own_galaxies_served_classified_scored_and_from_python(
    own_galaxies: OwnGalaxies, server: RunningServer
) -> None:
    work = own_galaxies.work
    files = cutouts_of(work)
    printed = work.run(
        f"galmorph classify {' '.join(str(p.relative_to(work.root)) for p in files)} "
        f"--url {server.url}"
    )
    assert any(name in printed for name in FOUR_CLASSES), printed

    work.run("galmorph score cutouts --model models/mine.onnx --out scores --embeddings --quiet")
    table = pq.read_table(work.root / "scores/scores.parquet").to_pandas()
    assert len(table) == len(files) and table["error"].isna().all(), table.get("error")

    served = {}
    for path in files:
        answer = httpx.post(
            f"{server.url}/classify", files={"file": (path.name, path.read_bytes())}, timeout=60
        )
        assert answer.status_code == 200, answer.text
        served[path.name] = answer.json()
    clf = Classifier(own_galaxies.model, threads=1)
    predictions = clf.predict([str(p) for p in files])
    for path, prediction in zip(files, predictions, strict=True):
        reference = served[path.name]
        assert prediction.label == reference["top_class"], path.name
        for name in FOUR_CLASSES:
            assert prediction.probabilities[name] == pytest.approx(
                reference["probabilities"][name], abs=1e-6
            ), (path.name, name)
        assert prediction.in_distribution == reference["in_distribution"], path.name
    # The scorer's rows are the same answers again.
    by_source = table.set_index(table["id_str"].map(lambda s: Path(s).name))
    for path in files:
        assert by_source.loc[path.name, "pred_label"] == served[path.name]["top_class"], path.name


def test_positions_fetch_then_offline_score_makes_no_request(
    own_galaxies: OwnGalaxies, tmp_path: Path
) -> None:
    """docs/scoring.md: fetch on a node with network, then score offline from the cache."""
    work = Workdir(tmp_path)
    (tmp_path / "mine.onnx").write_bytes(own_galaxies.model.read_bytes())
    positions = [(10.0, -5.0), (202.4696, 47.1952), (359.99999999, 1e-7), (150.1, 2.2)]
    lines = ["id_str,ra,dec", *(f"g{i},{ra!r},{dec!r}" for i, (ra, dec) in enumerate(positions))]
    (tmp_path / "positions.csv").write_text("\n".join(lines) + "\n")
    with SkyStub() as stub:
        url = stub.base_url
        fetched = work.run(
            f"galmorph fetch positions.csv --model mine.onnx --out cutouts/ --pixscale 1.048 "
            f"--cutout-url {url} --quiet"
        )
        asked = stub.requests()
        assert asked, fetched
        for request in asked:
            assert request.params["pixscale"] == "1.048", request.params
            assert 0 <= float(request.params["ra"]) < 360, request.params
            assert "e" not in request.params["dec"].lower(), request.params
        before = len(stub.log)
        work.run(
            f"galmorph score positions.csv --model mine.onnx --cache cutouts/ --offline "
            f"--out scores/ --cutout-url {url} --quiet"
        )
        assert len(stub.log) == before, "offline scoring made requests"
    table = pq.read_table(tmp_path / "scores/scores.parquet").to_pandas()
    assert len(table) == len(positions)
    assert table["error"].isna().all(), table["error"].tolist()


def survey_catalog(work: Workdir, rows: int) -> tuple[Path, dict[str, str]]:
    """A long catalog of synthetic grz FITS cutouts with whole batches missing or corrupt."""
    work.run("galmorph data synth --out survey.h5 --n 12 --size 64 --fits-dir fits --quiet")
    good = sorted((work.root / "fits").glob("*.fits"))
    corrupt = work.root / "fits/corrupt.fits"
    corrupt.write_bytes(good[0].read_bytes()[:5000])
    expected: dict[str, str] = {}
    lines = ["id_str,file_loc"]
    for i in range(rows):
        if i < 80 or rows - 40 <= i:  # whole batches at the start and end: no file
            path, kind = f"fits/missing_{i}.fits", "missing"
        elif 200 <= i < 264:  # whole batches in the middle: corrupt
            path, kind = "fits/corrupt.fits", "corrupt"
        else:
            path, kind = str(good[i % len(good)].relative_to(work.root)), "ok"
        lines.append(f"row{i},{path}")
        expected[f"row{i}"] = kind
    catalog = work.root / "catalog.csv"
    catalog.write_text("\n".join(lines) + "\n")
    return catalog, expected


def test_survey_catalog_with_missing_and_corrupt_batches_finishes(
    own_galaxies: OwnGalaxies, tmp_path: Path
) -> None:
    work = Workdir(tmp_path)
    (tmp_path / "model.onnx").write_bytes(own_galaxies.model.read_bytes())
    _, expected = survey_catalog(work, rows=360)
    work.run(
        "galmorph score catalog.csv --model model.onnx --out scores/ --batch-size 16 "
        "--shard-size 100 --embeddings --quiet"
    )
    table = pq.read_table(tmp_path / "scores/scores.parquet").to_pandas()
    assert table["id_str"].tolist() == list(expected), "one output row per input row, in order"
    is_error = table["error"].notna().to_numpy()
    kinds = np.array(list(expected.values()))
    assert (is_error == (kinds != "ok")).all()
    good = table[~is_error]
    assert good["ood_score"].notna().all() and good["embeddings"].notna().all()
    bad = table[is_error]
    assert bad["ood_score"].isna().all() and bad["pred_label"].isna().all()


def test_a_catalog_of_only_bad_rows_ends_with_error_rows(
    own_galaxies: OwnGalaxies, tmp_path: Path
) -> None:
    work = Workdir(tmp_path)
    (tmp_path / "model.onnx").write_bytes(own_galaxies.model.read_bytes())
    rows = ["id_str,file_loc", *(f"m{i},nowhere/{i}.fits" for i in range(40))]
    (tmp_path / "catalog.csv").write_text("\n".join(rows) + "\n")
    work.run("galmorph score catalog.csv --model model.onnx --out scores/ --embeddings --quiet")
    table = pq.read_table(tmp_path / "scores/scores.parquet").to_pandas()
    assert len(table) == 40 and table["error"].notna().all()
    # A rerun finds the finished run instead of failing at the same batch.
    work.run("galmorph score catalog.csv --model model.onnx --out scores/ --embeddings --quiet")
