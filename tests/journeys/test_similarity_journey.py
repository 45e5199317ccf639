"""Journey: similarity search from the command line to the server, as docs/similarity.md types it.

Real cutouts (synthetic grz FITS from `galmorph data synth --fits-dir`, real Galaxy10 DECaLS
JPEG/PNG and HST FITS from tests/data) -> `galmorph score --embeddings` -> `galmorph index build`
-> `galmorph similar` by id and by cutout -> `galmorph serve --index` on a socket -> GET and
POST /similar. The server's answers must be the CLI's: the same neighbours in the same order at
the same distances. A server started with another model than the index's refuses to start.

Each command line is the docs' own (`DOC_LINES` asserts they are in the "Use" block), run as a
real `galmorph` or `curl` process in the user's folder; only port 8000 becomes a free port, and
`serve` also gets --host 127.0.0.1, --providers CPUExecutionProvider and --threads 1
(tests/support/server_process.py). Variants the docs do not show (the upload with and without
`in_dist`, a JPEG, the position query) go through httpx. The model is a small factory ONNX model
(tests/support/onnx_factory.py), so the whole journey takes seconds.
"""

from __future__ import annotations

import csv
import io
import json
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.journeys.test_journeys import REAL_PNGS, Workdir
from tests.support.onnx_factory import FactoryModel, write_model
from tests.support.server_process import RunningServer, free_port, serve
from tests.support.training_helpers import REPO_ROOT, child_env, galmorph_command

DOC = REPO_ROOT / "docs/similarity.md"
SCORE = "galmorph score catalog.csv --model models/model.onnx --embeddings --out scored/"
BUILD = "galmorph index build scored/ --out galaxies.index/ --model models/model.onnx"
BY_ID = "galmorph similar galaxies.index/ --id synth3-0000000 -k 3"
BY_CUTOUT = "galmorph similar galaxies.index/ cutout.fits -k 3 --in-dist --format json"
OUTLIERS = "galmorph similar galaxies.index/ --outliers -n 3 --by ood --out odd.csv"
SERVE = "galmorph serve --model models/model.onnx --index galaxies.index/ --port 8000"
GET = 'curl -s "http://127.0.0.1:8000/similar?id=synth3-0000000&k=3"'
POST = 'curl -s -F file=@cutout.fits "http://127.0.0.1:8000/similar?k=3"'
DOC_LINES = (SCORE, BUILD, BY_ID, BY_CUTOUT, OUTLIERS, SERVE, GET, POST)

# The model's OOD threshold sits inside the range of its scores on these cutouts, so --in-dist
# keeps some neighbours and drops others.
MODEL = FactoryModel(input_size=64, ood_threshold=0.5, seed=0)
OTHER_MODEL = FactoryModel(input_size=64, ood_threshold=0.5, seed=1)
DISTANCE_TOLERANCE = 1e-5
pytestmark = pytest.mark.slow
HST = REPO_ROOT / "tests/data/hst-fits"
REAL_FITS = [HST / f"abell_2744_{name}_f105w.fits.gz" for name in ("spiral_galaxy", "cd_galaxy")]


def test_the_journey_uses_the_docs_own_command_lines() -> None:
    text = DOC.read_text()
    for line in DOC_LINES:
        assert line in text, f"docs/similarity.md no longer shows `{line}`"


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Workdir:
    """A user's folder: a catalog of real and synthetic cutouts, scored and indexed."""
    work = Workdir(tmp_path_factory.mktemp("similarity_journey"))
    root = work.root
    (root / "models").mkdir()
    write_model(root / "models/model.onnx", MODEL)
    write_model(root / "models/other.onnx", OTHER_MODEL)
    work.run("galmorph data synth --out held_out.h5 --n 6 --size 64 --seed 3 --fits-dir cutouts")
    with (root / "cutouts/catalog.csv").open(newline="") as synthetic:
        rows = [
            (row["id_str"], f"cutouts/{row['file_loc']}", row["ra"], row["dec"])
            for row in csv.DictReader(synthetic)
        ]
    (root / "real").mkdir()
    for source in [*REAL_PNGS[:3], *REAL_FITS]:
        shutil.copyfile(source, root / "real" / source.name)
        rows.append((source.name.split(".")[0], f"real/{source.name}", "", ""))
    with (root / "catalog.csv").open("w", newline="") as catalog:
        csv.writer(catalog).writerows([("id_str", "file_loc", "ra", "dec"), *rows])
    shutil.copyfile(root / rows[0][1], root / "cutout.fits")
    assert rows[0][0] == "synth3-0000000", rows[0]
    work.run(SCORE)
    built = json.loads(work.run(BUILD, stdout=True))
    assert built["count"] == len(rows), f"rows left out of the index: {built}"
    return work


def cli_rows(work: Workdir, line: str) -> list[dict]:
    """`galmorph similar` as a user types it; CSV and JSON read into the same row dicts."""
    printed = work.run(line, stdout=True)
    if "--format json" in line:
        return json.loads(printed)
    rows = list(csv.DictReader(io.StringIO(printed)))
    for row in rows:
        row["distance"] = float(row["distance"])
    return rows


def assert_same_neighbours(cli: list[dict], served: list[dict]) -> None:
    assert cli, "no neighbours"
    assert [r["id_str"] for r in served] == [r["id_str"] for r in cli]
    for mine, theirs in zip(cli, served, strict=True):
        assert theirs["distance"] == pytest.approx(mine["distance"], abs=DISTANCE_TOLERANCE)


@pytest.fixture(scope="module")
def server(work: Workdir) -> Iterator[RunningServer]:
    # SERVE on a free port: serve() adds --model models/model.onnx and --port itself.
    with serve(Path("models/model.onnx"), work.root, "--index", "galaxies.index/") as running:
        yield running


def curl(work: Workdir, server: RunningServer, line: str) -> dict:
    """A docs curl line against the test's server, its JSON answer (curl fails on an error)."""
    args = shlex.split(line.replace(":8000/", f":{server.port}/"))
    assert args[:2] == ["curl", "-s"], line
    done = subprocess.run(
        ["curl", "--fail-with-body", *args[1:]],
        cwd=work.root,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"`{line}` exited {done.returncode}: {done.stdout}{done.stderr}"
    answer: dict = json.loads(done.stdout)
    return answer


def test_cli_by_id_and_get_similar_agree(work: Workdir, server: RunningServer) -> None:
    cli = cli_rows(work, BY_ID)
    assert [int(r["rank"]) for r in cli] == [1, 2, 3]
    assert "synth3-0000000" not in {r["id_str"] for r in cli}, "the query itself is left out"
    assert_same_neighbours(cli, curl(work, server, GET)["neighbours"])


def test_cli_by_cutout_and_the_docs_curl_upload_agree(work: Workdir, server: RunningServer) -> None:
    cli = cli_rows(work, BY_CUTOUT.replace(" --in-dist", ""))  # the curl line has no in_dist
    served = curl(work, server, POST)["neighbours"]
    assert_same_neighbours(cli, served)
    # cutout.fits is synth3-0000000's own file: its indexed copy is the nearest, at ~0.
    assert served[0]["id_str"] == "synth3-0000000"
    assert served[0]["distance"] < 1e-3


def test_cli_by_cutout_in_dist_and_post_similar_agree(work: Workdir, server: RunningServer) -> None:
    cli = cli_rows(work, BY_CUTOUT)
    with (work.root / "cutout.fits").open("rb") as cutout:
        answer = httpx.post(
            f"{server.url}/similar",
            params={"k": 3, "in_dist": "true"},
            files={"file": ("cutout.fits", cutout)},
            timeout=60,
        )
    assert answer.status_code == 200, answer.text
    assert_same_neighbours(cli, answer.json()["neighbours"])
    assert all(r["in_distribution"] for r in cli), cli
    # The filter changed the answer: the unfiltered nearest (the cutout's own copy) is out.
    assert "synth3-0000000" not in {r["id_str"] for r in cli}


def test_a_real_jpeg_not_in_the_index_gets_the_same_neighbours_both_ways(
    work: Workdir, server: RunningServer
) -> None:
    jpeg = next(p for p in sorted((REPO_ROOT / "tests/data/galaxy10-real").glob("*.jpg")))
    shutil.copyfile(jpeg, work.root / "galaxy.jpg")
    cli = cli_rows(work, "galmorph similar galaxies.index/ galaxy.jpg -k 5 --format json")
    answer = httpx.post(
        f"{server.url}/similar",
        params={"k": 5},
        files={"file": ("galaxy.jpg", jpeg.read_bytes())},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    assert_same_neighbours(cli, answer.json()["neighbours"])
    assert cli[0]["distance"] > 1e-3, "a galaxy not in the index has no zero-distance twin"


def test_cli_by_position_is_the_galaxy_there(work: Workdir) -> None:
    """docs/similarity.md "Queries": --ra/--dec finds the indexed galaxy at that position."""
    with (work.root / "cutouts/catalog.csv").open(newline="") as synthetic:
        first = next(csv.DictReader(synthetic))
    by_position = cli_rows(
        work, f"galmorph similar galaxies.index/ --ra {first['ra']} --dec {first['dec']} -k 3"
    )
    assert by_position == cli_rows(work, BY_ID)


def test_outliers_by_ood_as_the_docs_type_it(work: Workdir) -> None:
    work.run(OUTLIERS)
    with (work.root / "odd.csv").open(newline="") as table:
        rows = list(csv.DictReader(table))
    assert len(rows) == 3
    scores = [float(r["ood_score"]) for r in rows]
    assert scores == sorted(scores, reverse=True), scores


def test_a_server_with_another_model_than_the_index_refuses_to_start(work: Workdir) -> None:
    line = SERVE.replace("models/model.onnx", "models/other.onnx").replace("8000", str(free_port()))
    done = subprocess.run(
        galmorph_command(*line.split()[1:], "--host", "127.0.0.1", "--threads", "1"),
        cwd=work.root,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    printed = done.stdout + done.stderr
    assert done.returncode == 2, printed
    assert "Traceback" not in printed, printed
    assert "models/other.onnx" in printed and "is not the index's model" in printed, printed
    assert len(printed.strip().splitlines()) == 1, printed
