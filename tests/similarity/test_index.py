"""The similarity index (galmorph.similarity): build, add, query, refuse; and its CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from galmorph.core.modelfile.engine import OnnxModel
from galmorph.similarity.index import (
    SimilarityError,
    SimilarityIndex,
    add_to_index,
    build_index,
)
from tests.support.onnx_factory import FactoryModel, write_model
from tests.support.similarity_data import (
    SHA_A,
    SHA_B,
    clustered,
    galaxy_pngs,
    score_pngs,
    scored_table,
    write_parts,
)

DIM = 32


def _ids(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i:04d}" for i in range(n)]


@pytest.fixture()
def two_parts(tmp_path: Path) -> tuple[Path, Path]:
    errors = np.zeros(150, bool)
    errors[[3, 77]] = True  # the scorer's error rows: no embeddings
    first = scored_table(_ids("a", 150), clustered(150, DIM, 1), SHA_A, errors=errors)
    second = scored_table(_ids("b", 120), clustered(120, DIM, 2), SHA_A)
    return (
        write_parts(tmp_path / "scores1", [first.slice(0, 80), first.slice(80)]),
        write_parts(tmp_path / "scores2", [second]),
    )


def _galmorph(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "galmorph.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_ids_round_trip_and_a_row_finds_itself(
    two_parts: tuple[Path, Path], tmp_path: Path
) -> None:
    build_index([two_parts[0]], tmp_path / "idx", threads=1)
    index = SimilarityIndex(tmp_path / "idx")
    source = pq.read_table(two_parts[0]).filter(pq.read_table(two_parts[0])["error"].is_null())
    assert index.ids["id_str"].to_pylist() == source["id_str"].to_pylist()
    assert index.manifest.count == 148 and index.manifest.model_sha256 == SHA_A
    embeddings = np.stack(source["embeddings"].to_numpy(zero_copy_only=False))
    for row in (0, 75, 147):
        id_str = source["id_str"][row].as_py()
        key = index.key_of_id(id_str)
        assert key == row
        cosine = embeddings[row] / np.linalg.norm(embeddings[row])
        stored = index.vector(key) / np.linalg.norm(index.vector(key))
        np.testing.assert_allclose(stored, cosine, atol=2e-3)  # float16 storage
        found = index.search(embeddings[row], 3)
        assert found["id_str"][0].as_py() == id_str and found["distance"][0].as_py() < 1e-3
    with pytest.raises(SimilarityError, match="not in the index"):
        index.key_of_id("a0003")  # an error row


def test_incremental_add_equals_a_full_build(two_parts: tuple[Path, Path], tmp_path: Path) -> None:
    build_index([two_parts[0]], tmp_path / "step", threads=1)
    add_to_index(tmp_path / "step", [two_parts[1]], threads=1)
    build_index(list(two_parts), tmp_path / "full", threads=1)
    step, full = SimilarityIndex(tmp_path / "step"), SimilarityIndex(tmp_path / "full")
    assert step.ids.equals(full.ids)
    assert step.manifest.count == full.manifest.count == 268
    assert step.manifest.sources == full.manifest.sources
    for key in range(0, 268, 7):
        vector = full.vector(key)
        np.testing.assert_array_equal(step.vector(key), vector)
        mine, theirs = step.search(vector, 5, exclude=key), full.search(vector, 5, exclude=key)
        assert mine["id_str"].to_pylist() == theirs["id_str"].to_pylist()
    with pytest.raises(SimilarityError, match="already in the index"):
        add_to_index(tmp_path / "step", [two_parts[1]])


def test_scores_of_another_model_are_refused(two_parts: tuple[Path, Path], tmp_path: Path) -> None:
    build_index([two_parts[0]], tmp_path / "idx", threads=1)
    other = write_parts(
        tmp_path / "other", [scored_table(_ids("c", 10), clustered(10, DIM, 3), SHA_B)]
    )
    with pytest.raises(SimilarityError, match="made by model"):
        add_to_index(tmp_path / "idx", [other])
    assert SimilarityIndex(tmp_path / "idx").manifest.count == 148  # unchanged
    with pytest.raises(SimilarityError, match="made by model"):
        build_index([two_parts[1], other], tmp_path / "mixed")
    with pytest.raises(SimilarityError, match="is not the index's model"):
        SimilarityIndex(tmp_path / "idx").check_model(SHA_B)


def test_scores_without_embeddings_are_refused(tmp_path: Path) -> None:
    table = scored_table(_ids("a", 5), clustered(5, DIM, 1), SHA_A).drop_columns(["embeddings"])
    with pytest.raises(SimilarityError, match="score with --embeddings"):
        build_index([write_parts(tmp_path / "s", [table])], tmp_path / "idx")


def test_filters_keep_k_neighbours_of_a_rare_class(tmp_path: Path) -> None:
    n = 400
    labels = ["Round Smooth"] * n
    for row in (5, 150, 260, 390):
        labels[row] = "Merging"
    table = scored_table(_ids("a", n), clustered(n, DIM, 4), SHA_A, labels=labels)
    build_index([write_parts(tmp_path / "s", [table])], tmp_path / "idx", threads=1)
    index = SimilarityIndex(tmp_path / "idx")
    found = index.search(index.vector(0), 3, label="Merging", exclude=0)
    assert found["pred_label"].to_pylist() == ["Merging"] * 3
    inside = index.search(index.vector(0), 20, in_distribution=True, exclude=0)
    assert len(inside) == 20 and all(inside["in_distribution"].to_pylist())
    with pytest.raises(SimilarityError, match="not in the index: Merging, Round Smooth"):
        index.search(index.vector(0), 3, label="Spiral")


def test_outliers_by_isolation_and_by_ood(tmp_path: Path) -> None:
    vectors = clustered(200, DIM, 5)
    vectors[42] = np.random.default_rng(9).normal(0, 1, DIM)  # far from every cluster
    ood = np.full(200, 0.2, np.float32)
    ood[17] = 5.0
    table = scored_table(_ids("a", 200), vectors, SHA_A, ood=ood)
    build_index([write_parts(tmp_path / "s", [table])], tmp_path / "idx", threads=1)
    index = SimilarityIndex(tmp_path / "idx")
    isolated = index.outliers(5)
    assert isolated["id_str"][0].as_py() == "a0042"
    assert isolated["isolation"][0].as_py() > 2 * isolated["isolation"][1].as_py()
    assert index.outliers(1, by="ood")["id_str"].to_pylist() == ["a0017"]


def test_position_query(two_parts: tuple[Path, Path], tmp_path: Path) -> None:
    build_index([two_parts[1]], tmp_path / "idx", threads=1)
    index = SimilarityIndex(tmp_path / "idx")
    ra, dec = index.ids["ra"][30].as_py(), index.ids["dec"][30].as_py()
    assert index.key_at(ra + 0.1 / 3600, dec, radius_arcsec=1.0) == 30
    with pytest.raises(SimilarityError, match=r"no galaxy within 1\.0"):
        index.key_at(ra + 0.5, dec, radius_arcsec=1.0)


def test_cli_cutout_query_with_the_model_and_refusal_of_another(tmp_path: Path) -> None:
    model = write_model(tmp_path / "m.onnx", FactoryModel(input_size=32, ood_threshold=0.5))
    other = write_model(tmp_path / "o.onnx", FactoryModel(input_size=32, seed=1))
    pngs = galaxy_pngs(tmp_path / "png", 30)
    scores = score_pngs(model, pngs, tmp_path / "scores")
    built = _galmorph("index", "build", str(scores), "--out", str(tmp_path / "idx"),
                      "--model", str(model), "--threads", "1")  # fmt: skip
    assert built.returncode == 0, built.stderr
    assert json.loads(built.stdout)["count"] == 30

    found = _galmorph("similar", str(tmp_path / "idx"), str(pngs[7]), "-k", "3", "--format", "json")
    assert found.returncode == 0, found.stderr
    rows = json.loads(found.stdout)
    assert rows[0]["id_str"] == "g007" and rows[0]["distance"] < 1e-3 and len(rows) == 3

    refused = _galmorph("similar", str(tmp_path / "idx"), str(pngs[7]), "--model", str(other))
    assert refused.returncode == 2
    assert "is not the index's model" in refused.stderr and "Traceback" not in refused.stderr
    wrong_build = _galmorph("index", "build", str(scores), "--out", str(tmp_path / "idx2"),
                            "--model", str(other))  # fmt: skip
    assert (
        wrong_build.returncode == 2 and "not " + OnnxModel(other).sha256[:12] in wrong_build.stderr
    )
    assert not (tmp_path / "idx2" / "manifest.json").exists()


def test_cli_by_id_writes_each_format_and_refuses_bad_queries(
    two_parts: tuple[Path, Path], tmp_path: Path
) -> None:
    index = str(tmp_path / "idx")
    assert _galmorph("index", "build", str(two_parts[0]), "--out", index).returncode == 0
    csv = _galmorph("similar", index, "--id", "a0010", "-k", "4", "--class", "Merging")
    assert csv.returncode == 0, csv.stderr
    lines = csv.stdout.strip().splitlines()
    assert lines[0].startswith('"rank","id_str","distance"') and len(lines) == 5
    assert all('"Merging"' in line and '"a0010"' not in line for line in lines[1:])
    out = tmp_path / "n.parquet"
    parquet = _galmorph("similar", index, "--id", "a0010", "--format", "parquet", "--out", str(out))
    assert parquet.returncode == 0 and pq.read_table(out).num_rows == 20
    for args, message in [
        (("--id", "nope"), "'nope' is not in the index"),
        (("--id", "a0010", "--outliers"), "exactly one query"),
        (("--ra", "10"), "--ra and --dec go together"),
        (("--id", "a0010", "--format", "parquet"), "needs --out"),
    ]:
        bad = _galmorph("similar", index, *args)
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr
    missing = _galmorph("similar", str(tmp_path / "none"), "--id", "x")
    assert missing.returncode == 2 and "is not a similarity index" in missing.stderr
