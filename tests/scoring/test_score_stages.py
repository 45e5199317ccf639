"""The scoring run's stages alone (galmorph.scoring.run): the config refused before anything is
opened, the plan of what is left to score, the rows handed on, and the assembly's check that
every shard filled. The whole run is tests/scoring/test_score.py's."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from galmorph.scoring.assembly import ShardAssembler
from galmorph.scoring.run import (
    ScoreConfig,
    assemble,
    check_config,
    open_model,
    plan_run,
    read_catalog,
    rows_to_score,
    score,
)
from galmorph.scoring.shards import ROW_INDEX, ShardError, part_path
from tests.support.cutout_factory import make_png
from tests.support.onnx_factory import FactoryModel, write_model

NUM_ROWS = 10
SHARD_SIZE = 3  # shards of 3, 3, 3 and 1 rows


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("stages")
    cutouts = root / "cutouts"
    cutouts.mkdir()
    for i in range(NUM_ROWS):
        make_png(cutouts, size=(24, 24), seed=i, name=f"g{i:02d}.png")
    write_model(root / "model.onnx", FactoryModel(input_size=16, embeddings=False))
    return root


def config(workspace: Path, out: str, **kwargs: object) -> ScoreConfig:
    settings = {
        "catalog": workspace / "cutouts",
        "model": workspace / "model.onnx",
        "out_dir": workspace / out,
        "workers": 0,
        "shard_size": SHARD_SIZE,
        "batch_size": 4,
        "progress": False,
    }
    return ScoreConfig(**{**settings, **kwargs})  # type: ignore[arg-type]


def test_a_config_no_run_could_honour_is_refused_before_anything_is_opened(
    tmp_path: Path,
) -> None:
    nowhere = ScoreConfig(catalog=tmp_path / "none.csv", model=tmp_path / "none.onnx",
                          out_dir=tmp_path / "out")  # fmt: skip
    with pytest.raises(ValueError, match="unknown engine 'spark'; choose from local, ray"):
        check_config(ScoreConfig(**{**nowhere.__dict__, "engine": "spark"}))
    with pytest.raises(ValueError, match="unknown stretch 'asinh'"):
        check_config(ScoreConfig(**{**nowhere.__dict__, "stretch": "asinh"}))
    csv = {**nowhere.__dict__, "embeddings": True, "output_format": "csv"}
    with pytest.raises(ValueError, match="CSV has no list columns"):
        check_config(ScoreConfig(**csv))
    check_config(nowhere)
    assert not (tmp_path / "out").exists()


def test_the_plan_leaves_out_the_shards_a_killed_run_finished(workspace: Path) -> None:
    first = config(workspace, "resume", num_shards=2, shard_index=0)
    score(first)  # shards 0 and 1 of 4
    part = part_path(workspace / "resume", 3)
    stale = part.with_name(f".{part.name}.tmp-killed")  # what a writer killed mid-part leaves
    stale.write_bytes(b"half a part")
    whole = config(workspace, "resume")
    catalog, _ = read_catalog(whole)
    run = plan_run(whole, catalog, open_model(whole))
    assert list(run.assigned) == [0, 1, 2, 3]
    assert run.done == {0, 1} and run.todo == [2, 3]
    assert run.todo_rows == NUM_ROWS - 2 * SHARD_SIZE
    assert not stale.exists()
    blocks, fetch = rows_to_score(whole, catalog, run)
    assert fetch is None  # files, not sky positions: no fetch stage
    rows = pa.concat_tables(blocks).column(ROW_INDEX).to_pylist()
    assert rows == list(range(2 * SHARD_SIZE, NUM_ROWS))


def test_a_plan_for_another_model_is_refused_in_a_folder_pinned_to_one(
    workspace: Path, tmp_path: Path
) -> None:
    score(config(workspace, "pinned"))
    other = write_model(tmp_path / "other.onnx", FactoryModel(input_size=16, seed=1))
    moved = config(workspace, "pinned", model=other)
    catalog, _ = read_catalog(moved)
    with pytest.raises(ShardError, match=r"differs in: .*model_sha256"):
        plan_run(moved, catalog, open_model(moved))


def test_assembly_refuses_an_end_before_every_shard_is_full(workspace: Path) -> None:
    whole = config(workspace, "short")
    catalog, _ = read_catalog(whole)
    run = plan_run(whole, catalog, open_model(whole))
    assembler = ShardAssembler(whole.out_dir, run.plan, run.todo)
    with pytest.raises(ShardError, match=r"ended before shards \[0, 1, 2, 3\] were full"):
        assemble(iter([]), assembler, run.todo_rows, progress=False)
