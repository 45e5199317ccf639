"""Batch scorer: catalog formats, error rows, shards, resume, Slurm-style splits, merge."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from galmorph.cli import main as galmorph_main
from galmorph.core.cutouts.decode import decode_path
from galmorph.core.modelfile.engine import OnnxModel
from galmorph.scoring.catalog import CatalogError, CatalogOptions, open_catalog
from galmorph.scoring.rows import class_columns
from galmorph.scoring.run import ScoreConfig, score
from galmorph.scoring.shards import Manifest, ShardError, ShardPlan, merge, part_path
from tests.support.cutout_factory import make_grz_fits, make_png
from tests.support.onnx_factory import FactoryModel, write_model

NUM_ROWS = 40
MISSING_ROW, BAD_ROW = 5, 11


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Cutouts (FITS and PNG), a CSV catalog with one missing and one bad file, two models."""
    root = tmp_path_factory.mktemp("score")
    cutouts = root / "cutouts"
    cutouts.mkdir()
    rows = []
    for i in range(NUM_ROWS):
        if i % 2:
            make_grz_fits(cutouts, size=48 + i, seed=i, name=f"g{i:03d}.fits")
            name = f"g{i:03d}.fits"
        else:
            make_png(cutouts, size=(64, 64), seed=i, name=f"g{i:03d}.png")
            name = f"g{i:03d}.png"
        rows.append(
            {"id_str": f"obj{i}", "file_loc": f"cutouts/{name}", "ra": 10 + i / 7, "dec": -i / 3}
        )
        rows[-1]["mag"] = 18 + i / 10
    rows[MISSING_ROW]["file_loc"] = "cutouts/not_there.fits"
    (cutouts / "broken.fits").write_bytes(b"this is not a FITS file at all")
    rows[BAD_ROW]["file_loc"] = "cutouts/broken.fits"
    with (root / "catalog.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    write_model(root / "model.onnx", FactoryModel())
    write_model(root / "other.onnx", FactoryModel(seed=1))
    return root


def run(workspace: Path, out: str, catalog: str | Path = "catalog.csv", **kwargs: object) -> Path:
    options = kwargs.pop("catalog_options", CatalogOptions(passthrough=("mag",)))
    config = ScoreConfig(
        catalog=workspace / catalog if isinstance(catalog, str) else catalog,
        model=workspace / str(kwargs.pop("model", "model.onnx")),
        out_dir=workspace / out,
        catalog_options=options,  # type: ignore[arg-type]
        progress=False,
        **{"workers": 0, "shard_size": 8, "batch_size": 8, **kwargs},  # type: ignore[arg-type]
    )
    score(config)
    return workspace / out


def read_merged(out: Path) -> pa.Table:
    return pq.read_table(out / "scores.parquet")


@pytest.fixture(scope="module")
def reference(workspace: Path) -> pa.Table:
    """One uninterrupted run with parallel decode workers: the table others must equal."""
    return read_merged(run(workspace, "reference", workers=2))


def test_one_row_per_input_row_in_order_with_error_rows(workspace: Path, reference: pa.Table):
    t = reference
    assert t.num_rows == NUM_ROWS
    assert t.column("row_index").to_pylist() == list(range(NUM_ROWS))
    assert t.column("id_str").to_pylist() == [f"obj{i}" for i in range(NUM_ROWS)]
    names = list(OnnxModel(workspace / "model.onnx", intra_op_threads=1).card.class_names)
    assert t.column_names == [
        "row_index", "id_str", "ra", "dec", "mag", "pred_label", "pred_index", "pred_prob",
        *class_columns(names), "model_sha256", "error",
    ]  # fmt: skip
    errors = t.column("error").to_pylist()
    assert errors[MISSING_ROW].startswith("missing: ")
    assert "not_there.fits" in errors[MISSING_ROW]
    assert errors[BAD_ROW].startswith("unsupported: ")
    good = [i for i in range(NUM_ROWS) if i not in (MISSING_ROW, BAD_ROW)]
    assert all(errors[i] is None for i in good)
    probs = np.stack([t.column(c).to_numpy(zero_copy_only=False) for c in class_columns(names)], 1)
    assert np.isnan(probs[[MISSING_ROW, BAD_ROW]]).all()
    assert t.column("pred_label")[MISSING_ROW].as_py() is None
    np.testing.assert_allclose(probs[good].sum(axis=1), 1.0, rtol=1e-5)
    index = t.column("pred_index").to_numpy(zero_copy_only=False)
    assert (index[good] == probs[good].argmax(axis=1)).all()
    assert t.column("pred_label").to_pylist()[good[0]] == names[int(index[good[0]])]
    np.testing.assert_allclose(t.column("ra").to_numpy()[:3], 10 + np.arange(3) / 7)
    assert set(t.column("model_sha256").to_pylist()) == {
        OnnxModel(workspace / "model.onnx", intra_op_threads=1).sha256
    }


def test_probabilities_equal_the_service_decode_and_model(workspace: Path, reference: pa.Table):
    model = OnnxModel(workspace / "model.onnx", intra_op_threads=1)
    rows = [1, 2, 39]
    images = np.stack(
        [
            decode_path(workspace / "cutouts" / Path(p).name, spec=model.card.input_spec).image
            for p in (f"g{i:03d}.{'fits' if i % 2 else 'png'}" for i in rows)
        ]
    )
    expected = model.predict(images)
    got = np.stack(
        [reference.column(c).to_numpy()[rows] for c in class_columns(model.card.class_names)], 1
    )
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def write_catalog_as(workspace: Path, suffix: str) -> Path:
    from astropy.table import Table

    table = pa.csv.read_csv(workspace / "catalog.csv")
    path = workspace / f"catalog{suffix}"
    if suffix == ".parquet":
        pq.write_table(table, path, row_group_size=7)  # many row groups: cross-group ranges
    else:
        fmt = {".ecsv": "ascii.ecsv", ".fits": "fits", ".vot": "votable"}[suffix]
        Table.from_pandas(table.to_pandas()).write(path, format=fmt, overwrite=True)
    return path


@pytest.mark.parametrize("suffix", [".parquet", ".ecsv", ".fits", ".vot"])
def test_every_catalog_format_gives_the_same_rows(
    workspace: Path, reference: pa.Table, suffix: str
):
    path = write_catalog_as(workspace, suffix)
    got = read_merged(run(workspace, f"out{suffix}", catalog=path))
    assert got.drop_columns(["error"]).equals(reference.drop_columns(["error"]))
    assert [e is None for e in got.column("error").to_pylist()] == [
        e is None for e in reference.column("error").to_pylist()
    ]


def test_catalog_blocks_cover_exactly_the_requested_ranges(workspace: Path):
    for path in (workspace / "catalog.csv", write_catalog_as(workspace, ".parquet")):
        catalog = open_catalog(path)
        ranges = [range(3, 9), range(9, 10), range(20, 31), range(39, 40)]
        blocks = list(catalog.iter_blocks(ranges, block_rows=4))
        rows = np.concatenate([b.column("row_index").to_numpy() for b in blocks])
        assert rows.tolist() == [r for span in ranges for r in span]
        ids = [i for b in blocks for i in b.column("id_str").to_pylist()]
        assert ids == [f"obj{r}" for r in rows]
        assert all(Path(s).is_absolute() for b in blocks for s in b.column("source").to_pylist())


def test_catalog_errors_name_the_problem(workspace: Path):
    with pytest.raises(CatalogError, match=r"no path column 'path'.*--path-col"):
        open_catalog(workspace / "catalog.csv", CatalogOptions(path_col="path"))
    with pytest.raises(CatalogError, match=r"passthrough column.*zmag"):
        open_catalog(workspace / "catalog.csv", CatalogOptions(passthrough=("zmag",)))
    with pytest.raises(CatalogError, match="unknown catalog type"):
        open_catalog(workspace / "model.onnx")


def test_folder_and_glob_of_cutouts(workspace: Path):
    out = run(workspace, "folder", catalog=workspace / "cutouts", catalog_options=CatalogOptions())
    table = read_merged(out)
    files = sorted(p.name for p in (workspace / "cutouts").iterdir())
    assert table.column("id_str").to_pylist() == files
    assert table.column("error").to_pylist().count(None) == len(files) - 1  # broken.fits
    pattern = str(workspace / "cutouts" / "*.png")
    globbed = read_merged(run(workspace, "glob", catalog=pattern, catalog_options=CatalogOptions()))
    assert globbed.column("id_str").to_pylist() == [f for f in files if f.endswith(".png")]


def test_galaxy10_hdf5_scores_every_image(workspace: Path, tmp_path: Path):
    import h5py

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (13, 64, 64, 3), dtype=np.uint8)
    path = tmp_path / "g10.h5"
    with h5py.File(path, "w") as fh:
        fh["images"] = images
        fh["ans"] = rng.integers(0, 10, 13)
        fh["ra"] = rng.uniform(0, 360, 13)
        fh["dec"] = rng.uniform(-30, 30, 13)
    out = run(
        workspace, "g10", catalog=path, catalog_options=CatalogOptions(passthrough=("label",))
    )
    table = read_merged(out)
    assert table.column("id_str").to_pylist() == [str(i) for i in range(13)]
    assert table.column("label").to_pylist() == h5py.File(path)["ans"][()].tolist()
    model = OnnxModel(workspace / "model.onnx", intra_op_threads=1)
    got = np.stack([table.column(c).to_numpy() for c in class_columns(model.card.class_names)], 1)
    np.testing.assert_allclose(got, model.predict(images), rtol=1e-6)


def test_rerun_skips_finished_shards_and_redoes_damaged_ones(workspace: Path, reference: pa.Table):
    out = run(workspace, "resume", workers=1)
    part = part_path(out, 2)
    part.write_bytes(b"truncated")  # as if a copy went wrong
    (out / "scores.parquet").unlink()
    config = ScoreConfig(
        catalog=workspace / "catalog.csv",
        model=workspace / "model.onnx",
        out_dir=out,
        catalog_options=CatalogOptions(passthrough=("mag",)),
        workers=0,
        shard_size=8,
        batch_size=8,
        progress=False,
    )
    summary = score(config)
    assert (summary.shards_skipped, summary.rows_scored) == (4, 8)
    assert read_merged(out).equals(reference)


def test_rerun_with_another_model_or_shard_size_is_refused(workspace: Path):
    out = run(workspace, "refuse")
    with pytest.raises(ShardError, match="model_sha256"):
        run(workspace, "refuse", model="other.onnx")
    with pytest.raises(ShardError, match="shard_size"):
        run(workspace, "refuse", shard_size=5)
    assert Manifest.read(out).shard_size == 8


def test_slurm_style_tasks_partition_the_shards(workspace: Path, reference: pa.Table):
    for shard_index in range(3):
        run(workspace, "array", shard_index=shard_index, num_shards=3)
        assert not (workspace / "array" / "scores.parquet").exists()
    result = merge(workspace / "array")
    assert result.rows == NUM_ROWS
    assert result.errors == {"missing": 1, "unsupported": 1}
    assert read_merged(workspace / "array").equals(reference)


def test_shard_assignment_is_an_exact_partition():
    for num_rows in (1, 7, 100, 1001):
        for size in (1, 3, 10):
            plan = ShardPlan(num_rows, size)
            rows = [r for k in range(plan.num_shards) for r in plan.rows(k)]
            assert rows == list(range(num_rows))
            for tasks in (1, 2, 5, 13):
                shards = [k for i in range(tasks) for k in plan.assigned(i, tasks)]
                assert shards == list(range(plan.num_shards))
    with pytest.raises(ValueError, match="shard-index"):
        ShardPlan(10, 2).assigned(3, 3)


def test_merge_refuses_missing_or_foreign_parts(workspace: Path):
    out = run(workspace, "merge_checks", shard_index=0, num_shards=2)
    with pytest.raises(ShardError, match=r"3 of 5 parts missing.*2-4"):
        merge(out)
    run(workspace, "merge_checks", shard_index=1, num_shards=2)
    # A part holding the wrong rows (e.g. copied from another run) must not pass.
    pq.write_table(pq.read_table(part_path(out, 1)), part_path(out, 3))
    with pytest.raises(ShardError, match=r"part-00003\.parquet is rows differ from 24\.\.31"):
        merge(out)


def test_csv_and_fits_outputs_hold_the_same_rows(workspace: Path, reference: pa.Table):
    from astropy.table import Table

    out = workspace / "reference"
    merge(out, out / "scores.csv")
    merge(out, out / "scores.fits")
    from_csv = pa.csv.read_csv(out / "scores.csv")
    fits = Table.read(out / "scores.fits")
    assert from_csv.column("id_str").to_pylist() == reference.column("id_str").to_pylist()
    assert list(fits["id_str"]) == reference.column("id_str").to_pylist()
    for name in ("pred_prob", "p_round_smooth", "ra"):
        expected = reference.column(name).to_numpy(zero_copy_only=False).astype(float)
        np.testing.assert_allclose(np.ma.filled(fits[name], np.nan), expected, rtol=1e-6)
        np.testing.assert_allclose(
            from_csv.column(name).to_numpy(zero_copy_only=False).astype(float), expected, rtol=1e-6
        )
    assert fits["pred_index"].mask[MISSING_ROW]
    assert fits["error"][BAD_ROW].startswith("unsupported")


def test_class_column_names_are_identifiers():
    assert class_columns(["In-between Round Smooth", "Edge-on with Bulge"]) == [
        "p_in_between_round_smooth",
        "p_edge_on_with_bulge",
    ]
    with pytest.raises(ValueError, match="collide"):
        class_columns(["Round smooth", "round-smooth"])


def test_cli_scores_and_reports(workspace: Path, capsys: pytest.CaptureFixture[str]):
    out = workspace / "cli"
    argv = ["score", str(workspace / "catalog.csv"), "--model", str(workspace / "model.onnx")]
    argv += ["--out", str(out), "--format", "csv", "--workers", "1", "--shard-size", "16"]
    assert galmorph_main([*argv, "--quiet", "--passthrough", "mag"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows_total"] == summary["rows_scored"] == NUM_ROWS
    assert summary["errors"] == {"missing": 1, "unsupported": 1}
    assert summary["images_per_second"] > 0
    assert summary["startup_seconds"] > 0
    assert (out / "scores.csv").is_file()
    assert galmorph_main([*argv, "--quiet", "--id-col", "nope"]) == 2
    assert "no id column 'nope'" in capsys.readouterr().err
    assert galmorph_main(["merge", str(out), "--out", str(out / "m.parquet")]) == 0
    assert pq.read_table(out / "m.parquet").num_rows == NUM_ROWS


def test_cli_providers_choose_the_session_and_a_typo_is_refused(
    workspace: Path, capsys: pytest.CaptureFixture[str]
):
    argv = ["score", str(workspace / "catalog.csv"), "--model", str(workspace / "model.onnx")]
    argv += ["--workers", "0", "--shard-size", "16", "--quiet"]
    cpu_only = [*argv, "--out", str(workspace / "cpu_only"), "--providers", "CPUExecutionProvider"]
    assert galmorph_main(cpu_only) == 0
    assert json.loads(capsys.readouterr().out)["rows_scored"] == NUM_ROWS
    typo = [*argv, "--out", str(workspace / "typo"), "--providers", "CPUExecutionProvidr"]
    assert galmorph_main(typo) == 2
    assert "unknown onnxruntime provider(s) CPUExecutionProvidr" in capsys.readouterr().err


def test_slurm_array_script_scores_every_task_then_merges(workspace: Path, reference: pa.Table):
    """Run scripts/slurm/score_array.sbatch as Slurm would, with a stand-in `sbatch`."""
    script = Path(__file__).resolve().parents[2] / "scripts" / "slurm" / "score_array.sbatch"
    bin_dir = workspace / "fake_bin"
    bin_dir.mkdir()
    submitted = workspace / "submitted.txt"
    (bin_dir / "sbatch").write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" >> {submitted}\n')
    (bin_dir / "sbatch").chmod(0o755)
    galmorph = Path(sys.executable).parent / "galmorph"
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "CATALOG": "catalog.csv",
        "MODEL": "model.onnx",
        "OUT": "slurm_out",
        "SHARD_SIZE": "8",
        "BATCH_SIZE": "8",
        "GALMORPH": str(galmorph),
        "SLURM_ARRAY_JOB_ID": "4242",
        "SLURM_ARRAY_TASK_COUNT": "2",
        "SLURM_ARRAY_TASK_MIN": "0",
        "SLURM_CPUS_PER_TASK": "2",
    }

    def run_task(task: str, **slurm: str) -> None:
        subprocess.run(
            ["bash", str(script)],
            cwd=workspace,
            env={**env, **slurm, "SLURM_ARRAY_TASK_ID": task},
            check=True,
            capture_output=True,
        )

    def merges_submitted() -> list[str]:
        args = submitted.read_text().splitlines()
        return [a.removeprefix("--dependency=") for a in args if a.startswith("--dependency=")]

    for task in ("1", "0", "0"):  # task 0 twice: requeued by Slurm, still one merge
        run_task(task)
    assert merges_submitted() == ["afterok:4242"]
    assert "--kill-on-invalid-dep=yes" in submitted.read_text().splitlines()

    # Say task 1 of array 4242 had failed: its merge never runs (Slurm drops it). Resubmitting
    # that task (sbatch --array=1, a new array job) must submit that array's own merge.
    run_task("1", SLURM_ARRAY_JOB_ID="4343", SLURM_ARRAY_TASK_MIN="1")
    assert merges_submitted() == ["afterok:4242", "afterok:4343"]

    args = submitted.read_text().splitlines()
    merge_command = [a for a in args if a.startswith("--wrap=")][-1].removeprefix("--wrap=")
    subprocess.run(["bash", "-c", merge_command], cwd=workspace, env=env, check=True)
    merged = pq.read_table(workspace / "slurm_out" / "scores.parquet")
    assert merged.equals(reference.drop_columns(["mag"]))  # no --passthrough in the script
    assert not (workspace / "slurm_out" / ".merge_submitted.4343").exists()


def test_galaxy10_rows_of_another_size_are_fitted_like_uploaded_images(
    workspace: Path, tmp_path: Path
):
    import h5py
    from PIL import Image

    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (4, 96, 96, 3), dtype=np.uint8)  # the model takes 64x64
    path = tmp_path / "g10_96.h5"
    with h5py.File(path, "w") as fh:
        fh["images"] = images
        fh["ans"] = rng.integers(0, 10, 4)
    table = read_merged(run(workspace, "g10_96", catalog=path, catalog_options=CatalogOptions()))
    assert table.column("error").to_pylist() == [None] * 4
    model = OnnxModel(workspace / "model.onnx", intra_op_threads=1)
    as_png = []
    for image in images:  # the server's answer for the same pixels sent as PNG
        png = tmp_path / "row.png"
        Image.fromarray(image).save(png)
        as_png.append(decode_path(png, spec=model.card.input_spec).image)
    got = np.stack([table.column(c).to_numpy() for c in class_columns(model.card.class_names)], 1)
    np.testing.assert_allclose(got, model.predict(np.stack(as_png)), rtol=1e-6)
