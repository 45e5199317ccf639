"""The seams of `galmorph score` / `fetch` a catalog user walks into (issue 23).

A batch with no decodable row; the pixel scale and coordinates as sent, cached and printed; no
argparse abbreviations; bad ra/dec cells; duplicate ids. Each test runs the real command line
(galmorph.cli.main) on small temporary catalogs, against the loopback cutout-service stub.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from galmorph.api.classifier import Classifier
from galmorph.cli import build_parser
from galmorph.cli import main as galmorph_main
from galmorph.core.inputspec import canonical_scale
from galmorph.core.modelfile.contract import METADATA_PREFIX, ModelCard
from galmorph.core.sky.client import CutoutSpec, check_position
from galmorph.core.sky.options import decimal_text
from galmorph.scoring.catalog import open_catalog
from galmorph.scoring.ray_engine import ERROR_COLUMN, IMAGE_COLUMN, OnnxPredictor, _outputs
from tests.support.cutout_factory import make_png
from tests.support.onnx_factory import FactoryModel, write_model
from tests.support.sky_stub import SkyStub

# 0.262"/px read from a float32 HDF5 attribute, at 64 px: what a card held before the fix.
FLOAT32_SCALE = float(np.float32(0.262)) * 4  # 1.0479999780654907
FAST = ["--fetch-rate", "50", "--fetch-timeout", "2", "--fetch-attempts", "2", "--quiet"]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A model with embeddings and an OOD score whose card carries the float32 scale."""
    root = tmp_path_factory.mktemp("seam_models")
    leaky = {f"{METADATA_PREFIX}pixel_scale": json.dumps(FLOAT32_SCALE)}
    spec = FactoryModel(ood_threshold=1.0, metadata_overrides=leaky)
    return {"ood": write_model(root / "ood.onnx", spec)}


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def score_cli(catalog: Path, model: Path, out: Path, *extra: str) -> int:
    argv = ["score", str(catalog), "--model", str(model), "--out", str(out), "--quiet"]
    return galmorph_main([*argv, "--ort-threads", "1", *extra])


# ---------------------------------------------------------------- batches with no good row


NUM_ROWS, BATCH = 60, 4
# Whole batches of missing cutouts at the start, in the middle and at the end of the run.
BAD = {*range(0, 8), *range(28, 36), *range(52, 60)}


@pytest.mark.parametrize("workers", ["0", "1"])
def test_batches_with_no_decodable_row_are_error_rows_and_the_run_goes_on(
    tmp_path: Path, models: dict[str, Path], workers: str, capsys: pytest.CaptureFixture[str]
):
    for i in set(range(NUM_ROWS)) - BAD:
        make_png(tmp_path, size=(64, 64), seed=i, name=f"g{i}.png")
    rows = [[f"obj{i}", f"g{i}.png"] for i in range(NUM_ROWS)]
    catalog = write_csv(tmp_path / "cat.csv", ["id_str", "file_loc"], rows)
    settings = ["--batch-size", str(BATCH), "--shard-size", "16", "--workers", workers]
    assert score_cli(catalog, models["ood"], tmp_path / "out", *settings, "--embeddings") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows_scored"] == NUM_ROWS and summary["errors"] == {"missing": len(BAD)}
    table = pq.read_table(tmp_path / "out" / "scores.parquet").to_pandas()
    assert table.row_index.tolist() == list(range(NUM_ROWS))
    bad = table.row_index.isin(sorted(BAD))
    assert table.error[bad].str.startswith("missing: ").all() and table.error[~bad].isna().all()
    for column in ("pred_label", "ood_score", "in_distribution", "embeddings"):
        assert table[column][bad].isna().all(), column
        assert table[column][~bad].notna().all(), column
    assert np.stack(table.embeddings[~bad]).shape == (NUM_ROWS - len(BAD), 8)


def test_a_catalog_of_only_bad_rows_and_an_empty_offline_cache_finish(
    tmp_path: Path, models: dict[str, Path], capsys: pytest.CaptureFixture[str]
):
    files = write_csv(tmp_path / "files.csv", ["id_str", "file_loc"], [["a", "x.png"], ["b", ""]])
    assert score_cli(files, models["ood"], tmp_path / "files", "--workers", "0") == 0
    assert json.loads(capsys.readouterr().out)["errors"] == {"missing": 2}
    positions = [[f"p{i}", 150 + i / 100, 2.0] for i in range(6)]
    sky = write_csv(tmp_path / "sky.csv", ["id_str", "ra", "dec"], positions)
    offline = ["--cache", str(tmp_path / "empty"), "--offline", "--workers", "0", "--embeddings"]
    assert score_cli(sky, models["ood"], tmp_path / "sky", *offline) == 0
    assert json.loads(capsys.readouterr().out)["errors"] == {"fetch": 6}
    table = pq.read_table(tmp_path / "sky" / "scores.parquet")
    assert table.num_rows == 6 and table.column("ood_score").null_count == 6
    assert table.column("embeddings").null_count == 6


def test_ray_actor_answers_every_output_for_a_batch_with_no_good_row(models: dict[str, Path]):
    """The Ray engine's inference actor (called directly; no cluster needed)."""
    predictor = OnnxPredictor(str(models["ood"]), 1)
    size = int(np.prod(predictor.shape))
    images = pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(size), 3, [None, pa.py_buffer(np.zeros(3 * size, np.uint8))]
    )
    batch = pa.table({IMAGE_COLUMN: images, ERROR_COLUMN: pa.array(["missing: x"] * 3)})
    outputs = _outputs(predictor(batch), predictor.model.card.num_classes)
    assert outputs.ood_score is not None and outputs.embeddings is not None
    assert outputs.in_distribution is not None and not outputs.in_distribution.any()
    assert np.isnan(outputs.embeddings).all() and outputs.embeddings.shape == (3, 8)


# ---------------------------------------------------------------- pixel scale and positions


def test_positions_wrap_below_360_and_are_sent_without_exponents():
    assert check_position(359.99999999, 0.0) == (0.0, 0.0)  # never 360.0: the service refuses it
    assert check_position(-0.00000001, -0.00000001) == (0.0, 0.0)
    assert str(check_position(-1e-9, 1.0)[0]) == "0.0"  # not -0.0
    params = CutoutSpec().request(359.99999999, 1e-7).params()
    assert (params["ra"], params["dec"]) == ("0.0", "0.0000001")
    assert decimal_text(-2.5e-5) == "-0.000025" and decimal_text(202.4696) == "202.4696"
    with pytest.raises(ValueError) as refused:
        check_position(1e-7, 95.0)
    assert str(refused.value) == "dec 95.0 is outside [-90, 90] degrees"
    # Keys of ordinary positions are those earlier versions wrote: their caches stay valid.
    old = (
        "https://www.legacysurvey.org/viewer/cutout.fits"
        "?ra=202.4696&dec=47.1952&layer=ls-dr10&pixscale=0.262&size=256&bands=grz"
    )
    assert CutoutSpec().request(202.4696, 47.1952).key == hashlib.sha256(old.encode()).hexdigest()


def test_a_float32_pixel_scale_is_the_scale_its_file_meant(models: dict[str, Path]):
    assert canonical_scale(FLOAT32_SCALE) == 1.048 and canonical_scale(0.262) == 0.262
    assert CutoutSpec(pixscale=FLOAT32_SCALE).request(10.0, 1.0).params()["pixscale"] == "1.048"
    card = ModelCard("m", ("a", "b"), (64, 64), (0.5,) * 3, (0.25,) * 3, pixel_scale=FLOAT32_SCALE)
    assert card.pixel_scale == 1.048 and "1.0479999" not in repr(card)
    assert Classifier(models["ood"]).card.pixel_scale == 1.048


def test_a_cache_filled_by_fetch_pixscale_is_found_by_score_offline(
    tmp_path: Path, models: dict[str, Path], capsys: pytest.CaptureFixture[str]
):
    """docs/scoring.md: fetch, then score --cache --offline with zero requests."""
    model = models["ood"]
    positions = [[f"p{i}", round(359.9 + i * 0.01, 8), 1e-7 * i] for i in range(8)]
    positions.append(["edge", 359.99999999, 0.0])
    catalog = write_csv(tmp_path / "positions.csv", ["id_str", "ra", "dec"], positions)
    cache = tmp_path / "cutouts"
    with SkyStub() as stub:
        url = ["--cutout-url", stub.base_url]
        fetch = ["fetch", str(catalog), "--model", str(model), "--out", str(cache), *url, *FAST]
        assert galmorph_main([*fetch, "--pixscale", "1.048"]) == 0
        fetched = json.loads(capsys.readouterr().out)
        assert fetched["failed"] == 0 and fetched["request"]["pixscale"] == 1.048
        sent = [r.params for r in stub.log]
        assert {p["pixscale"] for p in sent} == {"1.048"}
        assert all("e" not in p["ra"] + p["dec"] and p["ra"] != "360.0" for p in sent)
        asked = len(stub.log)
        offline = ["--cache", str(cache), "--offline", *url, "--workers", "0"]
        assert score_cli(catalog, model, tmp_path / "scores", *offline) == 0
        summary = json.loads(capsys.readouterr().out)
        assert summary["errors"] == {} and summary["cutouts"]["cached"] == len(positions)
        # the card's own scale (no --pixscale) names the same cache entries
        assert galmorph_main(fetch) == 0
        assert json.loads(capsys.readouterr().out)["cached"] == len(positions)
        assert len(stub.log) == asked  # zero requests after the first fetch
    manifest = json.loads((tmp_path / "scores" / "manifest.json").read_text())
    assert "1.0479999" not in json.dumps(manifest)


# ---------------------------------------------------------------- no abbreviations


def _parsers(
    parser: argparse.ArgumentParser, path: str = "galmorph"
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, f"{path} {name}")


def test_no_parser_of_the_command_line_takes_abbreviations(capsys: pytest.CaptureFixture[str]):
    parsers = dict(_parsers(build_parser()))
    assert {"galmorph fetch", "galmorph score", "galmorph model inspect", "galmorph serve"} <= set(
        parsers
    )
    assert [path for path, p in parsers.items() if p.allow_abbrev] == []
    with pytest.raises(SystemExit) as exit_info:
        galmorph_main(["fetch", "positions.csv", "--out", "cutouts", "--cache", "elsewhere"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --cache elsewhere" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        galmorph_main(["score", "c.csv", "--model", "m.onnx", "--out", "o", "--embed"])
    assert "unrecognized arguments: --embed" in capsys.readouterr().err


# ---------------------------------------------------------------- bad ra/dec cells


def test_bad_position_cells_are_error_rows_naming_the_problem(
    tmp_path: Path, models: dict[str, Path], capsys: pytest.CaptureFixture[str]
):
    rows: list[list[object]] = [[f"g{i}", 150 + i / 100, 2.0] for i in range(12)]
    rows[2][1] = "n/a"  # text in a numeric column, in the first block pyarrow reads
    rows[4][2] = "12:30:49.4"  # one sexagesimal cell (the column is degrees)
    rows[5][1] = "nan"
    rows[6][2] = 95.0
    rows[7][1] = ""
    rows[8][1], rows[8][2] = "east", "north"
    write_csv(tmp_path / "cat.csv", ["id_str", "ra", "dec"], rows)
    pq.write_table(
        pa.table(
            {name: [str(r[k]) for r in rows] for k, name in enumerate(["id_str", "ra", "dec"])}
        ),
        tmp_path / "cat.parquet",
    )
    with SkyStub() as stub:
        options = ["--cutout-url", stub.base_url, "--cache", str(tmp_path / "cache"), *FAST[:-1]]
        for name in ("cat.csv", "cat.parquet"):
            out = tmp_path / name.replace(".", "_")
            assert score_cli(tmp_path / name, models["ood"], out, *options, "--workers", "0") == 0
            assert json.loads(capsys.readouterr().out)["errors"] == {"invalid": 5, "missing": 1}
            table = pq.read_table(out / "scores.parquet").to_pandas()
            errors = dict(zip(table.id_str, table.error, strict=True))
            assert errors["g2"] == "invalid: ra 'n/a' is not a number of degrees"
            assert errors["g4"].startswith("invalid: dec '12:30:49.4' is sexagesimal")
            assert errors["g5"] == "invalid: ra, dec must be finite degrees, got nan, 2.0"
            assert errors["g6"] == "invalid: dec 95.0 is outside [-90, 90] degrees"
            assert errors["g7"] == "missing: no ra/dec in the catalog row"
            assert errors["g8"] == (
                "invalid: ra 'east' is not a number of degrees; "
                "dec 'north' is not a number of degrees"
            )
            good = table.id_str.isin(["g0", "g1", "g3", "g9", "g10", "g11"])
            assert table.error[good].isna().all() and table.pred_label[good].notna().all()
            assert table.ra.dtype == np.float64 and np.isnan(table.ra[2])  # typed, null
            assert table.ra[0] == 150.0


# ---------------------------------------------------------------- duplicate ids


def test_duplicate_ids_are_kept_and_reported(
    tmp_path: Path,
    models: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
):
    make_png(tmp_path, size=(64, 64), seed=1, name="a.png")
    ids = ["a", "b", "a", "c", "b", "a", "d"]
    rows = [[name, "a.png"] for name in ids]
    catalog = write_csv(tmp_path / "dups.csv", ["id_str", "file_loc"], rows)
    with caplog.at_level(logging.WARNING, logger="galmorph.scoring.run"):
        assert score_cli(catalog, models["ood"], tmp_path / "out", "--workers", "0") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["duplicate_ids"] == {"ids": 2, "rows": 5, "examples": {"a": 3, "b": 2}}
    warning = [r.getMessage() for r in caplog.records if r.name == "galmorph.scoring.run"]
    assert warning == [
        "dups.csv: 2 ids are shared by 5 rows, e.g. 'a' (3 rows), 'b' (2 rows); every row is "
        "scored and kept (tell them apart by row_index)"
    ]
    table = pq.read_table(tmp_path / "out" / "scores.parquet")
    assert table.column("id_str").to_pylist() == ids  # every row, in catalog order


def test_a_word_far_down_a_csv_is_that_rows_error_not_the_reader_stopping(tmp_path: Path):
    """pyarrow infers CSV types from the first 4 MiB: a word past them used to stop the run."""
    rows = 250_000
    path = tmp_path / "long.csv"
    with path.open("w") as fh:
        fh.write("id_str,ra,dec\n")
        fh.writelines(f"g{i},{150 + i / 1e6:.6f},2.5\n" for i in range(rows - 1))
        fh.write("last,unknown,2.5\n")
    assert path.stat().st_size > 4 << 20
    catalog = open_catalog(path)
    *_, block = catalog.iter_blocks([range(rows - 3, rows)])
    assert block.column("source").to_pylist()[-1] == {
        "ra": None,
        "dec": 2.5,
        "error": "ra 'unknown' is not a number of degrees",
    }
    assert block.column("ra").type == pa.float64()
