"""galmorph.core.files: the one SHA-256 of a file and the one atomic, durable write."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from galmorph.core import files
from galmorph.core.files import (
    atomic_write,
    atomic_write_text,
    durable_replace,
    leftover_temps,
    sha256_file,
)


class Boom(Exception):
    pass


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


def test_sha256_file_matches_hashlib_over_many_chunks(tmp_path: Path) -> None:
    # Several MiB plus an odd tail: larger than any read buffer, not a multiple of one.
    data = os.urandom(3 * (1 << 20) + 12345)
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    assert sha256_file(str(path)) == hashlib.sha256(data).hexdigest()


def test_sha256_file_of_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty"
    path.write_bytes(b"")
    assert sha256_file(path) == hashlib.sha256(b"").hexdigest()


def test_atomic_write_commits_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    with atomic_write(target) as temp:
        assert temp.parent == tmp_path and temp.name.startswith(".out.json.tmp-")
        assert not target.exists(), "the target must not appear before the commit"
        temp.write_text("new")
    assert target.read_text() == "new"
    assert _siblings(target) == ["out.json"]


def test_failed_write_leaves_no_target_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    with pytest.raises(Boom), atomic_write(target) as temp:
        temp.write_bytes(b"half a file")
        raise Boom
    assert not target.exists()
    assert _siblings(target) == []


def test_failed_write_keeps_old_content(tmp_path: Path) -> None:
    target = atomic_write_text(tmp_path / "out.txt", "old")
    with pytest.raises(Boom), atomic_write(target) as temp:
        temp.write_text("partial new")
        raise Boom
    assert target.read_text() == "old"
    assert _siblings(target) == ["out.txt"]


def test_failed_commit_removes_temp_and_keeps_old_content(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = atomic_write_text(tmp_path / "out.txt", "old")

    def failing_replace(src: object, dst: object) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(files.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk gone"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert _siblings(target) == ["out.txt"]


def test_file_is_fsynced_before_rename_and_folder_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src: str, dst: str) -> None:
        events.append("replace")
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "fsync", fsync)
    monkeypatch.setattr(files.os, "replace", replace)
    atomic_write_text(tmp_path / "a.txt", "x")
    assert events == ["fsync file", "replace", "fsync dir"]


def test_durable_replace_moves_a_finished_file(tmp_path: Path) -> None:
    part = tmp_path / "data.h5.part"
    part.write_bytes(b"payload")
    durable_replace(part, tmp_path / "data.h5")
    assert (tmp_path / "data.h5").read_bytes() == b"payload"
    assert not part.exists()


def test_killed_writer_leaves_only_a_findable_temp(tmp_path: Path) -> None:
    target = tmp_path / "part-00000.parquet"
    # os._exit skips every cleanup, as kill -9 would.
    script = (
        "import os, sys\n"
        "from galmorph.core.files import atomic_write\n"
        "with atomic_write(sys.argv[1]) as temp:\n"
        "    temp.write_text('half')\n"
        "    os._exit(3)\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(target)], check=False)
    assert result.returncode == 3
    assert not target.exists()
    left = leftover_temps(target)
    assert len(left) == 1 and left[0].read_text() == "half"
    assert leftover_temps(tmp_path / "part-00001.parquet") == []


def test_streaming_table_writer_commits_only_the_expected_rows(tmp_path: Path) -> None:
    from galmorph.scoring.table_writers import StreamingTableWriter

    schema = pa.schema([("x", pa.int64())])
    table = pa.table({"x": [1, 2, 3]})
    out = tmp_path / "scores.csv"
    with (
        pytest.raises(RuntimeError, match="wrote 3 rows, expected 4"),
        StreamingTableWriter(out, "csv", schema, num_rows=4) as writer,
    ):
        writer.write(table)
    assert _siblings(out) == []
    with StreamingTableWriter(out, "csv", schema, num_rows=3) as writer:
        writer.write(table)
    assert out.read_text().split() == ['"x"', "1", "2", "3"]
    assert _siblings(out) == ["scores.csv"]


def test_training_state_raises_the_model_checkpoint_error(tmp_path: Path) -> None:
    from galmorph.model.checkpoint import CheckpointError
    from galmorph.training.state import load_checkpoint

    with pytest.raises(CheckpointError, match="no training checkpoint"):
        load_checkpoint(tmp_path)
