"""Shards of a scoring run: planning, the manifest, atomic part files, and the merge.

Rows are cut into fixed-size shards (shard k = rows [k*S, (k+1)*S)). Each shard's output is
one Parquet file `part-NNNNN.parquet`, written with galmorph.core.files.atomic_write (temporary
name, fsync, rename, folder fsync), so a part either exists whole or not at all. A rerun
verifies existing parts and skips them. `manifest.json` pins what the parts were made from
(catalog fingerprint, model sha256, shard size, settings): a rerun with another model or
catalog refuses to mix outputs.

Parts are always Parquet (typed, compressed, readable column by column for the checks);
CSV and FITS exist only as merge outputs, converted while streaming.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from galmorph.core.data.tables import MODEL_SHA_COLUMN
from galmorph.core.files import atomic_write, atomic_write_text, leftover_temps
from galmorph.scoring.table_writers import (
    SUFFIXES,
    StreamingTableWriter,
    format_from_path,
    string_widths,
)

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
ROW_INDEX = "row_index"
_PART_RE = re.compile(r"^part-(\d+)\.parquet$")


class ShardError(RuntimeError):
    """Parts are missing, damaged or from another run; the message says which and why."""


@dataclass(frozen=True)
class ShardPlan:
    num_rows: int
    shard_size: int

    def __post_init__(self) -> None:
        if self.shard_size < 1:
            raise ValueError(f"shard size must be >= 1, got {self.shard_size}")

    @property
    def num_shards(self) -> int:
        return -(-self.num_rows // self.shard_size)

    def rows(self, shard: int) -> range:
        start = shard * self.shard_size
        return range(start, min(start + self.shard_size, self.num_rows))

    def assigned(self, shard_index: int, num_shards: int) -> range:
        """Shards for task `shard_index` of `num_shards`: a contiguous, deterministic range.

        Contiguous ranges keep each task's reads sequential in the catalog; the ranges of all
        tasks partition the shard list exactly (sizes differ by at most one).
        """
        if num_shards < 1 or not 0 <= shard_index < num_shards:
            raise ValueError(
                f"--shard-index must be in [0, {num_shards}) and --num-shards >= 1, "
                f"got {shard_index} of {num_shards}"
            )
        total = self.num_shards
        return range(shard_index * total // num_shards, (shard_index + 1) * total // num_shards)


@dataclass(frozen=True)
class Manifest:
    """What the parts in an output folder were made from; all fields must match to resume."""

    catalog: dict[str, Any]  # fingerprint of the catalog content
    num_rows: int
    shard_size: int
    model_sha256: str
    model_name: str
    class_names: list[str]
    settings: dict[str, Any] = field(default_factory=dict)  # id/path columns, passthrough, ...
    version: int = MANIFEST_VERSION

    @property
    def plan(self) -> ShardPlan:
        return ShardPlan(self.num_rows, self.shard_size)

    def differences(self, other: Manifest) -> list[str]:
        mine, theirs = asdict(self), asdict(other)
        return [key for key in mine if mine[key] != theirs[key]]

    @classmethod
    def read(cls, out_dir: Path) -> Manifest:
        path = out_dir / MANIFEST_NAME
        if not path.is_file():
            raise ShardError(f"{out_dir} holds no {MANIFEST_NAME}: not a scoring output folder")
        try:
            return cls(**json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError) as exc:
            raise ShardError(f"{path} is damaged: {exc}") from exc


def claim_output(out_dir: Path, manifest: Manifest) -> None:
    """Record the manifest, or check that the one already there describes the same run."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / MANIFEST_NAME
    if path.exists():
        existing = Manifest.read(out_dir)
        different = existing.differences(manifest)
        if different:
            raise ShardError(
                f"{out_dir} already holds parts from a different run (differs in: "
                f"{', '.join(different)}); use a new --out folder or delete the old one"
            )
        return
    # Slurm tasks may race here; each writes identical content, and rename is atomic.
    atomic_write_text(path, json.dumps(asdict(manifest), indent=2, sort_keys=True))


def part_path(out_dir: Path, shard: int) -> Path:
    return out_dir / f"part-{shard:05d}.parquet"


def write_part(out_dir: Path, shard: int, table: pa.Table) -> Path:
    """Write a shard's rows atomically and durably."""
    path = part_path(out_dir, shard)
    with atomic_write(path) as temp:
        pq.write_table(table, temp)
    return path


def remove_stale_temps(out_dir: Path, shards: range) -> None:
    """Delete temp files a killed run left for these shards (only ours: Slurm tasks share)."""
    for shard in shards:
        for temp in leftover_temps(part_path(out_dir, shard)):
            temp.unlink(missing_ok=True)


def check_part(path: Path, rows: range, model_sha256: str) -> str | None:
    """None when the part holds exactly `rows` from this model, else what is wrong."""
    try:
        table = pq.read_table(path, columns=[ROW_INDEX, MODEL_SHA_COLUMN])
    except (OSError, pa.ArrowException) as exc:
        return f"unreadable ({exc})"
    indices = table.column(ROW_INDEX).to_numpy()
    if len(indices) != len(rows) or not np.array_equal(indices, np.arange(rows.start, rows.stop)):
        return f"rows differ from {rows.start}..{rows.stop - 1}"
    shas = table.column(MODEL_SHA_COLUMN).unique().to_pylist()
    if shas != [model_sha256]:
        return f"made by another model ({shas})"
    return None


def finished_shards(out_dir: Path, manifest: Manifest, shards: range) -> set[int]:
    """Shards in `shards` whose part exists and passes `check_part`; damaged ones are logged."""
    done = set()
    plan = manifest.plan
    for shard in shards:
        path = part_path(out_dir, shard)
        if not path.exists():
            continue
        problem = check_part(path, plan.rows(shard), manifest.model_sha256)
        if problem is None:
            done.add(shard)
        else:
            logger.warning("%s is %s; scoring shard %d again", path.name, problem, shard)
    return done


def iter_parts(out_dir: Path) -> Iterator[tuple[int, pa.Table]]:
    """Every part of a complete run in input order, each checked; ShardError otherwise.

    Together the checks prove exactly-once: part k holds precisely rows [kS, (k+1)S) and the
    parts are visited for k = 0..K-1, so every input row appears once and in order.
    """
    manifest = Manifest.read(out_dir)
    plan = manifest.plan
    present = {int(m.group(1)) for p in out_dir.iterdir() if (m := _PART_RE.match(p.name))}
    extra = sorted(present - set(range(plan.num_shards)))
    if extra:
        raise ShardError(f"{out_dir}: parts beyond the plan of {plan.num_shards}: {extra[:10]}")
    missing = [k for k in range(plan.num_shards) if k not in present]
    if missing:
        raise ShardError(
            f"{out_dir}: {len(missing)} of {plan.num_shards} parts missing "
            f"(first: {_ranges_text(missing)}); run `galmorph score` again to finish them"
        )
    for shard in range(plan.num_shards):
        path = part_path(out_dir, shard)
        problem = check_part(path, plan.rows(shard), manifest.model_sha256)
        if problem is not None:
            raise ShardError(f"{path} is {problem}; delete it and run `galmorph score` again")
        yield shard, pq.read_table(path)


def _ranges_text(numbers: list[int], limit: int = 5) -> str:
    spans: list[str] = []
    start = prev = numbers[0]
    for n in [*numbers[1:], None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        spans.append(str(start) if start == prev else f"{start}-{prev}")
        if n is not None:
            start = prev = n
    return ", ".join(spans[:limit]) + (" ..." if len(spans) > limit else "")


@dataclass
class MergeSummary:
    path: Path
    rows: int
    errors: dict[str, int]  # error kind -> rows


def error_kinds(errors: pa.ChunkedArray | pa.Array) -> dict[str, int]:
    """Count error rows by kind (the text before the first colon of `error`)."""
    counts: dict[str, int] = {}
    for value in errors.drop_null().to_pylist():
        kind = value.split(":", 1)[0]
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def default_merged_path(out_dir: Path, fmt: str) -> Path:
    return out_dir / f"scores{SUFFIXES[fmt]}"


def merge(out_dir: Path, out_path: Path | None = None, fmt: str | None = None) -> MergeSummary:
    """Combine all parts in input order into one file, proving every row appears once."""
    if fmt is None:
        fmt = format_from_path(out_path) if out_path else "parquet"
    out_path = out_path or default_merged_path(out_dir, fmt)
    manifest = Manifest.read(out_dir)
    widths: dict[str, int] = {}
    if fmt == "fits":  # FITS wants string widths in the header, before the first row
        for _, table in iter_parts(out_dir):
            for name, width in string_widths(table).items():
                widths[name] = max(width, widths.get(name, 0))
    parts = iter_parts(out_dir)
    first = next(parts, None)
    if first is None:
        raise ShardError(f"{out_dir}: the catalog has no rows, nothing to merge")
    errors: dict[str, int] = {}
    schema = first[1].schema
    with StreamingTableWriter(
        out_path, fmt, schema, num_rows=manifest.num_rows, string_widths=widths
    ) as writer:
        for _, table in itertools.chain([first], parts):
            writer.write(table)
            for kind, count in error_kinds(table.column("error")).items():
                errors[kind] = errors.get(kind, 0) + count
    return MergeSummary(out_path, manifest.num_rows, errors)
