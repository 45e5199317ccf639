"""SIGKILL the scorer mid-run, rerun, merge: the output equals an uninterrupted run."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from galmorph.scoring.catalog import CatalogOptions
from galmorph.scoring.run import ScoreConfig, score
from galmorph.scoring.shards import merge, part_path
from tests.support.cutout_factory import make_grz_fits, make_png
from tests.support.onnx_factory import FactoryModel, write_model

NUM_ROWS = 96
SHARD_SIZE = 8  # a multiple of the batch size: batches line up the same way after a resume
BATCH_SIZE = 8
NUM_PARTS = NUM_ROWS // SHARD_SIZE


def make_catalog(root: Path) -> Path:
    rows = []
    for i in range(NUM_ROWS):
        name = f"c{i:03d}.fits" if i % 2 else f"c{i:03d}.png"
        if i % 2:
            make_grz_fits(root, size=96, seed=i, name=name)
        else:
            make_png(root, size=(96, 96), seed=i, name=name)
        rows.append({"id_str": f"g{i}", "file_loc": name, "ra": i / 4, "dec": -i / 5})
    rows[13]["file_loc"] = "missing.fits"
    with (root / "cat.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root / "cat.csv"


@pytest.mark.slow
def test_sigkill_then_rerun_equals_uninterrupted_run(tmp_path: Path):
    catalog = make_catalog(tmp_path)
    # Slow enough per batch (~tens of ms) that the kill lands while parts are being written.
    model = write_model(
        tmp_path / "m.onnx", FactoryModel(input_size=96, channels=16, extra_convs=6)
    )
    killed_out = tmp_path / "killed"
    command = [
        sys.executable, "-m", "galmorph.cli", "score", str(catalog), "--model", str(model),
        "--out", str(killed_out), "--shard-size", str(SHARD_SIZE),
        "--batch-size", str(BATCH_SIZE), "--workers", "1", "--ort-threads", "1", "--quiet",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not part_path(killed_out, 0).exists():
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "no part written within 60 s"
            time.sleep(0.01)
        assert proc.poll() is None, "the scorer finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    written = sorted(killed_out.glob("part-*.parquet"))
    assert 1 <= len(written) < NUM_PARTS, "the kill must land mid-run"
    assert not (killed_out / "scores.parquet").exists()

    def config(out: Path) -> ScoreConfig:
        return ScoreConfig(
            catalog=catalog,
            model=model,
            out_dir=out,
            catalog_options=CatalogOptions(),
            shard_size=SHARD_SIZE,
            batch_size=BATCH_SIZE,
            workers=1,
            ort_threads=1,
            progress=False,
            merge=False,
        )

    resumed = score(config(killed_out))
    assert resumed.shards_skipped == len(written)
    assert resumed.rows_scored == NUM_ROWS - SHARD_SIZE * len(written)
    assert not list(killed_out.glob(".part-*")), "temporary files of the killed run remain"
    merged = merge(killed_out)
    assert merged.rows == NUM_ROWS
    assert merged.errors == {"missing": 1}

    score(config(tmp_path / "clean"))
    clean = merge(tmp_path / "clean")
    resumed_table = pq.read_table(merged.path)
    clean_table = pq.read_table(clean.path)
    assert resumed_table.num_rows == NUM_ROWS
    assert resumed_table.equals(clean_table)  # row for row, probabilities bit for bit
    assert len({pq.read_table(part_path(killed_out, k)).num_rows for k in range(NUM_PARTS)}) == 1
