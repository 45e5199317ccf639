"""A size-bounded disk cache of fetched cutouts, shared by the server, the scorer and processes.

Entries are files named by a key that the caller derives from every request parameter
(galmorph.core.sky.client: the SHA-256 of the full request URL, so base URL, layer, bands, pixel
scale, size and position all count): `ROOT/v1/<key[:2]>/<key><suffix>`.

- Writes go through galmorph.core.files.atomic_write (temporary name, fsync, rename): an entry
  exists whole or not at all, and a writer killed mid-write leaves at most a `.NAME.tmp-*` file,
  which is never read as an entry and is removed by the next eviction scan once stale.
- `lookup` is one stat (the file exists and is plausibly whole), cheap enough per catalog row;
  `read` verifies the content with the caller's check and removes an entry that fails it, so a
  damaged entry becomes a miss (fetched again), never a classification.
- Size bound, least recently used first: a hit sets the entry's modification time (access
  times are unreliable: many file systems mount `noatime`/`relatime`); when a write takes the
  cache over `max_bytes`, the oldest entries are removed until it is under `LOW_WATER` of it.
- Several processes may share one cache (login node prefetch, a Slurm array, a server):
  temporary names are unique per writer, renames are atomic, and an entry that another
  process evicted or replaced meanwhile is simply a miss.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from galmorph.core.files import atomic_write

GIB = 2**30
DEFAULT_MAX_BYTES = 20 * GIB
LOW_WATER = 0.9  # eviction frees down to this fraction of max_bytes, so it runs rarely
STALE_TEMP_SECONDS = 3600.0  # a temporary file this old belongs to a dead writer
LAYOUT = "v1"
CACHE_ENV = "GALMORPH_CUTOUT_CACHE"


def default_cache_dir() -> Path:
    """$GALMORPH_CUTOUT_CACHE, else $XDG_CACHE_HOME/galmorph/cutouts, else ~/.cache/..."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "galmorph" / "cutouts"


@dataclass(frozen=True)
class CacheUsage:
    entries: int
    bytes: int


class CutoutCache:
    """Cutout files by key; see the module docstring for the guarantees."""

    def __init__(self, root: str | os.PathLike[str], max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_bytes < 1:
            raise ValueError(f"cache size must be at least 1 byte, got {max_bytes}")
        self.root = Path(root)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()  # puts may run in worker threads of one process
        self._used: int | None = None  # this process's running estimate; None until scanned

    @property
    def entries_dir(self) -> Path:
        return self.root / LAYOUT

    def path(self, key: str, suffix: str) -> Path:
        if len(key) < 3 or not key.isalnum():
            raise ValueError(f"cache key must be alphanumeric, got {key!r}")
        return self.entries_dir / key[:2] / f"{key}{suffix}"

    def lookup(self, key: str, suffix: str, plausible: Callable[[int], bool] = bool) -> Path | None:
        """The entry's path if it exists and `plausible(size)` holds; marks it recently used."""
        path = self.path(key, suffix)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return None
        if not plausible(size):
            self._discard(path)
            return None
        self._touch(path)
        return path

    def read(self, key: str, suffix: str, verify: Callable[[bytes], None]) -> bytes | None:
        """The entry's bytes if `verify(data)` accepts them; a rejected entry is removed."""
        path = self.path(key, suffix)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            verify(data)
        except Exception:
            self._discard(path)
            return None
        self._touch(path)
        return data

    def put(self, key: str, suffix: str, data: bytes) -> Path:
        """Store `data` atomically under the key, then evict if the cache is over its bound."""
        path = self.path(key, suffix)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as temp:
            temp.write_bytes(data)
        with self._lock:
            if self._used is None:
                self._used = self.usage().bytes
            else:
                self._used += len(data)
            over = self._used > self.max_bytes
        if over:
            self.evict()
        return path

    def remove(self, key: str, suffix: str) -> None:
        self._discard(self.path(key, suffix))

    def usage(self) -> CacheUsage:
        entries = self._scan()
        return CacheUsage(len(entries), sum(size for _, size, _ in entries))

    def evict(self, target_bytes: int | None = None) -> CacheUsage:
        """Remove least recently used entries until at most `target_bytes` remain (default:
        LOW_WATER of max_bytes); also removes stale temporary files. Returns what was removed."""
        target = int(self.max_bytes * LOW_WATER) if target_bytes is None else target_bytes
        entries = self._scan(remove_stale_temps=True)
        total = sum(size for _, size, _ in entries)
        removed = CacheUsage(0, 0)
        for path, size, _ in sorted(entries, key=lambda entry: entry[2]):
            if total <= target:
                break
            self._discard(path)
            total -= size
            removed = CacheUsage(removed.entries + 1, removed.bytes + size)
        with self._lock:
            self._used = total
        return removed

    def _scan(self, remove_stale_temps: bool = False) -> list[tuple[Path, int, float]]:
        """(path, size, mtime) of every entry; entries vanishing meanwhile are skipped."""
        found: list[tuple[Path, int, float]] = []
        now = time.time()
        try:
            folders = list(os.scandir(self.entries_dir))
        except FileNotFoundError:
            return found
        for folder in folders:
            if not folder.is_dir():
                continue
            for entry in os.scandir(folder.path):
                try:
                    stat = entry.stat()
                except FileNotFoundError:
                    continue
                if entry.name.startswith("."):
                    if remove_stale_temps and now - stat.st_mtime > STALE_TEMP_SECONDS:
                        self._discard(Path(entry.path))
                    continue
                found.append((Path(entry.path), stat.st_size, stat.st_mtime))
        return found

    @staticmethod
    def _touch(path: Path) -> None:
        with contextlib.suppress(OSError):  # evicted meanwhile, or a read-only cache
            os.utime(path)

    @staticmethod
    def _discard(path: Path) -> None:
        # Gone already (another process), or a read-only cache (a compute node's copy):
        # either way the entry is not used, which is all that matters here.
        with contextlib.suppress(OSError):
            path.unlink()
