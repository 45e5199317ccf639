"""File utilities every artifact goes through: one SHA-256 of a file, one atomic write.

An artifact (checkpoint, split, ONNX model, shard, report, figure) is written under a hidden
temporary name in its own folder, fsynced, renamed over the final name, and then the folder is
fsynced so that the rename itself survives a power cut. Readers therefore see the old file or
the new one, never a torn one, and a crash leaves at most a `.NAME.tmp-*` file behind.
"""

from __future__ import annotations

import glob
import hashlib
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

StrPath = str | os.PathLike[str]


def sha256_file(path: StrPath) -> str:
    """Hex SHA-256 of a file's content, read in chunks (flat memory for multi-GB files)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _temp_name(target: Path) -> Path:
    # Unique per writer: concurrent writers of one target (Slurm tasks) never share a temp.
    return target.with_name(f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def leftover_temps(path: StrPath) -> list[Path]:
    """Temporary files of `path` that killed writers left behind (any process)."""
    target = Path(path)
    return sorted(target.parent.glob(f".{glob.escape(target.name)}.tmp-*"))


@contextmanager
def atomic_write(path: StrPath) -> Iterator[Path]:
    """Yield a temporary path to write; on success it durably replaces `path`.

    The body writes the whole file to the yielded path (any writer: open(), h5py, savefig, ...)
    and closes it. If the body or the commit raises, the temporary file is removed, `path` keeps
    its old content (or stays absent) and the exception propagates.
    """
    target = Path(path)
    temp = _temp_name(target)
    try:
        yield temp
        durable_replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: StrPath, text: str, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` atomically and durably; returns `path` as a Path."""
    target = Path(path)
    with atomic_write(target) as temp:
        temp.write_text(text, encoding=encoding)
    return target


def durable_replace(source: StrPath, target: StrPath) -> None:
    """fsync `source`, rename it over `target` (same filesystem) and fsync the folder.

    The file fsync puts the bytes on disk before the name points at them; the folder fsync
    makes the rename itself durable.
    """
    with open(source, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(source, target)
    folder = os.open(Path(target).parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def user_cache_dir(name: str) -> Path:
    """galmorph's folder `name` in the user's cache: $XDG_CACHE_HOME/galmorph/NAME, else
    ~/.cache/galmorph/NAME (each cache's own environment override is checked by its caller)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "galmorph" / name
