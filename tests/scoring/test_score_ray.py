"""`--engine ray` on a local Ray instance gives the same rows as the local engine."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from galmorph.scoring.catalog import CatalogOptions
from galmorph.scoring.run import ScoreConfig, score
from tests.support.cutout_factory import make_grz_fits, make_png
from tests.support.onnx_factory import FactoryModel, write_model

NUM_ROWS = 30


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    import ray

    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=80 * 2**20,
        log_to_driver=False,
        configure_logging=False,
    )
    yield
    ray.shutdown()


@pytest.mark.slow
def test_ray_engine_matches_local_engine(tmp_path: Path, local_ray: None):
    rows = []
    for i in range(NUM_ROWS):
        name = f"c{i}.fits" if i % 3 else f"c{i}.png"
        if i % 3:
            make_grz_fits(tmp_path, size=64, seed=i, name=name)
        else:
            make_png(tmp_path, size=(80, 64), seed=i, name=name)
        rows.append({"id_str": f"g{i}", "file_loc": name, "ra": i * 0.5, "dec": 1.0 - i})
    rows[4]["file_loc"] = "gone.fits"
    with (tmp_path / "cat.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    # With an OOD score and the embeddings: every output crosses the Ray pipeline.
    write_model(tmp_path / "m.onnx", FactoryModel(ood_threshold=0.4))

    def run(engine: str) -> Path:
        config = ScoreConfig(
            catalog=tmp_path / "cat.csv",
            model=tmp_path / "m.onnx",
            out_dir=tmp_path / engine,
            catalog_options=CatalogOptions(),
            shard_size=12,
            batch_size=8,
            workers=1,
            engine=engine,
            progress=False,
            embeddings=True,
        )
        summary = score(config)
        assert summary.rows_scored == NUM_ROWS
        assert summary.errors == {"missing": 1}
        return tmp_path / engine / "scores.parquet"

    local = pq.read_table(run("local"))
    on_ray = pq.read_table(run("ray"))
    assert on_ray.num_rows == NUM_ROWS
    assert {"ood_score", "in_distribution", "embeddings"} <= set(local.column_names)
    assert on_ray.equals(local)
    # Same parts on disk, so a Ray run resumes and merges like a local one.
    assert sorted(p.name for p in (tmp_path / "ray").glob("part-*")) == [
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
    ]
