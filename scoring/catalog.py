"""Catalog readers for batch scoring: every input kind becomes a stream of row blocks.

A block is a `pyarrow.Table` with `row_index` (int64, position in the catalog), `id_str`
(string), `source` (an absolute cutout path, a Galaxy10 row number, or for a sky catalog a
struct<ra, dec, error>: degrees, and why a cell is not one; galmorph.scoring.sky_fetch fetches
the cutouts) and the passthrough columns. Blocks are produced only for the requested row
ranges, in catalog order.

A table catalog locates cutouts by its path column (`file_loc`) when it has one, else by its
ra/dec columns (decimal degrees; a column whose first value is sexagesimal is refused when the
catalog is opened, and any other cell that is not a number is that row's `invalid` error). A
path column named on purpose (--path-col) must exist.

Memory: CSV and Parquet are streamed (pyarrow's incremental CSV reader, Parquet row groups),
so a catalog of any length is never held whole. ECSV and VOTable are not streamable formats:
astropy reads them whole (they hold paths and coordinates, not pixels, so a million rows is
~100 MB). FITS binary tables are memory-mapped by astropy, so only the rows read are touched.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from galmorph.core.cutouts.formats import cutout_suffixes
from galmorph.core.files import sha256_file

if TYPE_CHECKING:
    from galmorph.core.data.galaxy10 import Galaxy10File

DEFAULT_PASSTHROUGH = ("ra", "dec")
DEFAULT_PATH_COL = "file_loc"  # Zoobot's name; a catalog without it may locate cutouts by ra/dec
# Galaxy10 columns a user may pass through; `label` is the Galaxy10 class id (`ans`).
GALAXY10_COLUMNS = ("ra", "dec", "redshift", "pxscale", "label")
BLOCK_ROWS = 4096


class CatalogError(ValueError):
    """The catalog cannot be read as asked (unknown format, missing column, ...)."""


@dataclass(frozen=True)
class DuplicateIds:
    """Ids that more than one row of a catalog carries: how many, over how many rows, and the
    first few (id, rows) for a message."""

    ids: int = 0
    rows: int = 0
    examples: tuple[tuple[str, int], ...] = ()

    def message(self, where: str) -> str:
        shown = ", ".join(f"{name!r} ({count} rows)" for name, count in self.examples)
        more = ", ..." if self.ids > len(self.examples) else ""
        return (
            f"{where}: {self.ids} ids are shared by {self.rows} rows, e.g. {shown}{more}; every "
            "row is scored and kept (tell them apart by row_index)"
        )

    def to_dict(self) -> dict[str, Any]:
        return {"ids": self.ids, "rows": self.rows, "examples": dict(self.examples)}


def _duplicates(ids: pa.Array | pa.ChunkedArray, shown: int = 5) -> DuplicateIds:
    counts = pc.value_counts(pc.drop_null(ids))
    repeated = counts.filter(pc.greater(counts.field("counts"), 1))
    if not len(repeated):
        return DuplicateIds()
    names = repeated.field("values").to_pylist()
    numbers = repeated.field("counts").to_pylist()
    return DuplicateIds(
        ids=len(repeated),
        rows=sum(numbers),
        examples=tuple((str(n), c) for n, c in zip(names[:shown], numbers[:shown], strict=True)),
    )


@dataclass(frozen=True)
class CatalogOptions:
    id_col: str = "id_str"
    path_col: str = DEFAULT_PATH_COL
    ra_col: str = "ra"  # used when the catalog has no path column: cutouts fetched by position
    dec_col: str = "dec"
    passthrough: tuple[str, ...] = ()  # asked for explicitly; ra/dec are added when present


class Catalog:
    """Common interface; subclasses implement `_blocks` for one contiguous row range."""

    kind: str = ""
    # "path": `source` is a cutout file path; "galaxy10": `source` is an HDF5 row number;
    # "sky": `source` is struct<ra, dec, error>, to be fetched (galmorph.scoring.sky_fetch).
    source_kind: str = "path"

    def __init__(self, path: Path, num_rows: int, passthrough: tuple[str, ...]) -> None:
        self.path = path
        self.num_rows = num_rows
        self.passthrough = passthrough

    def fingerprint(self) -> dict[str, Any]:
        """Identity of the catalog content, recorded in the scoring manifest."""
        return {"kind": self.kind, "name": self.path.name, "sha256": sha256_file(self.path)}

    def duplicate_ids(self) -> DuplicateIds:
        """Ids carried by more than one row (one pass over the id column). Row numbers and
        paths, the ids of Galaxy10 files and folders, are unique."""
        return DuplicateIds()

    def iter_blocks(
        self, ranges: Sequence[range], block_rows: int = BLOCK_ROWS
    ) -> Iterator[pa.Table]:
        """Yield blocks covering exactly the rows in `ranges` (disjoint), in catalog order."""
        merged = _merge_adjacent(ranges)
        if merged:
            yield from self._blocks(merged, block_rows)

    def _blocks(self, ranges: list[range], block_rows: int) -> Iterator[pa.Table]:
        """Default for formats with random access: slice each range directly."""
        for rows in ranges:
            for lo in range(rows.start, rows.stop, block_rows):
                yield self._rows(lo, min(lo + block_rows, rows.stop))

    def _rows(self, start: int, stop: int) -> pa.Table:
        raise NotImplementedError


def open_catalog(path: str | Path, options: CatalogOptions = CatalogOptions()) -> Catalog:
    """Open a catalog by its file type: table formats, Galaxy10 HDF5, a folder or a glob."""
    text = str(path)
    p = Path(text)
    if p.is_dir():
        return FileListCatalog.from_folder(p, options)
    if not p.exists():
        if glob.has_magic(text):
            return FileListCatalog.from_glob(text, options)
        raise CatalogError(f"catalog not found: {text}")
    name = p.name.lower()
    if name.endswith((".csv", ".csv.gz", ".tsv")):
        return CsvCatalog(p, options)
    if name.endswith((".parquet", ".pq")):
        return ParquetCatalog(p, options)
    if name.endswith((".h5", ".hdf5")):
        return Galaxy10Catalog(p, options)
    for suffixes, fmt in _ASTROPY_FORMATS:
        if name.endswith(suffixes):
            return AstropyCatalog(p, options, fmt)
    raise CatalogError(
        f"unknown catalog type {p.name!r}: expected .csv, .ecsv, .fits, .vot/.xml, .parquet, "
        ".h5 (Galaxy10 layout), a folder or a glob of cutouts"
    )


_ASTROPY_FORMATS = (
    ((".ecsv",), "ascii.ecsv"),
    ((".fits", ".fit", ".fits.gz", ".fit.gz"), "fits"),
    ((".vot", ".votable", ".xml"), "votable"),
)


def _source_kind(available: Sequence[str], options: CatalogOptions, where: str) -> str:
    """`path` when the path column exists, else `sky` when the ra and dec columns do.

    A path column named on purpose (not the default) must exist: such a catalog is never
    quietly scored by position instead.
    """
    if options.path_col in available:
        return "path"
    if options.path_col != DEFAULT_PATH_COL:
        raise CatalogError(
            f"{where}: no path column {options.path_col!r} (columns: {', '.join(available)}); "
            "name it with --path-col"
        )
    if options.ra_col in available and options.dec_col in available:
        return "sky"
    raise CatalogError(
        f"{where}: no path column {options.path_col!r} and no position columns "
        f"{options.ra_col!r}, {options.dec_col!r} (columns: {', '.join(available)}); name them "
        "with --path-col, or --ra-col and --dec-col"
    )


def _source_columns(kind: str, options: CatalogOptions) -> tuple[str, ...]:
    return (options.ra_col, options.dec_col) if kind == "sky" else (options.path_col,)


def _is_text(dtype: pa.DataType) -> bool:
    return pa.types.is_string(dtype) or pa.types.is_large_string(dtype)


def _first_text(values: Any) -> str | None:
    """The first non-blank cell of a column sample, as text (None: no such cell)."""
    for value in values:
        text = value.as_py() if isinstance(value, pa.Scalar) else value
        if text is not None and str(text).strip():
            return str(text)
    return None


def _check_degrees(name: str, dtype: pa.DataType, sample: Any, unit: Any, where: str) -> None:
    """Refuse a position column that is not decimal degrees, naming what it holds instead.

    A text column is read cell by cell (a stray 'n/a' is that row's error, not the catalog's),
    unless its first cell is sexagesimal: then the whole column is, and the message says how
    to convert it.
    """
    from galmorph.core.sky.client import looks_sexagesimal, parse_degrees

    if unit is not None and str(unit) not in ("deg", "degree", "degrees"):
        raise CatalogError(f"{where}: column {name!r} is in {unit}; galmorph takes degrees")
    if pa.types.is_floating(dtype) or pa.types.is_integer(dtype) or pa.types.is_null(dtype):
        return
    if not _is_text(dtype):
        raise CatalogError(f"{where}: column {name!r} holds {dtype}, not decimal degrees")
    if sample is not None and looks_sexagesimal(sample):
        try:
            parse_degrees(sample, f"{where}: column {name!r} holds")
        except ValueError as exc:
            raise CatalogError(str(exc)) from None


def _degrees(values: pa.Array | pa.ChunkedArray, name: str) -> tuple[pa.Array, list[str | None]]:
    """A position column as float64 degrees, and per cell why it is not one (None: it is).

    Blank cells are null with no reason (a `missing` row); text that is not a number is null
    with the reason (an `invalid` row).
    """
    from galmorph.core.sky.client import parse_degrees

    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    reasons: list[str | None] = [None] * len(values)
    try:
        return pc.cast(values, pa.float64()), reasons  # numbers, or text that all reads as them
    except pa.ArrowInvalid:
        if not _is_text(values.type):
            raise
    numbers: list[float | None] = []
    for i, cell in enumerate(values.to_pylist()):
        if cell is None or not cell.strip():
            numbers.append(None)
            continue
        try:
            numbers.append(parse_degrees(cell, name))
        except ValueError as exc:
            numbers.append(None)
            reasons[i] = str(exc)
    return pa.array(numbers, pa.float64()), reasons


def _choose_columns(
    available: Sequence[str], options: CatalogOptions, where: str
) -> tuple[str, ...]:
    """Check the id/source columns exist; passthrough = ra/dec when present + those asked."""
    if options.id_col not in available:
        raise CatalogError(
            f"{where}: no id column {options.id_col!r} (columns: {', '.join(available)}); "
            "name it with --id-col"
        )
    _source_kind(available, options, where)
    missing = [c for c in options.passthrough if c not in available]
    if missing:
        raise CatalogError(
            f"{where}: passthrough column(s) {', '.join(missing)} not in the catalog "
            f"(columns: {', '.join(available)})"
        )
    chosen = [c for c in DEFAULT_PASSTHROUGH if c in available]
    chosen += [c for c in options.passthrough if c not in chosen]
    return tuple(c for c in chosen if c not in (options.id_col, options.path_col))


def _resolve_paths(values: pa.ChunkedArray | pa.Array, base: Path) -> pa.Array:
    """file_loc values as absolute paths; relative ones resolve against the catalog folder."""
    out: list[str | None] = []
    for value in values.to_pylist():
        if value is None or str(value).strip() == "":
            out.append(None)
            continue
        p = Path(str(value).strip()).expanduser()
        out.append(str(p if p.is_absolute() else base / p))
    return pa.array(out, pa.string())


def _source_array(
    kind: str,
    column: Callable[[str], pa.Array | pa.ChunkedArray],
    options: CatalogOptions,
    base: Path,
) -> pa.Array:
    """The `source` column: absolute cutout paths, or for sky catalogs struct<ra, dec, error>
    (error: why a cell is not degrees, for that row's error)."""
    if kind != "sky":
        return _resolve_paths(column(options.path_col), base)
    ra, ra_reasons = _degrees(column(options.ra_col), options.ra_col)
    dec, dec_reasons = _degrees(column(options.dec_col), options.dec_col)
    errors = [
        "; ".join(r for r in pair if r) or None
        for pair in zip(ra_reasons, dec_reasons, strict=True)
    ]
    return pa.StructArray.from_arrays(
        [ra, dec, pa.array(errors, pa.string())], names=["ra", "dec", "error"]
    )


def _passthrough(
    kind: str,
    names: Sequence[str],
    column: Callable[[str], pa.Array | pa.ChunkedArray],
    sources: pa.Array,
    options: CatalogOptions,
) -> dict[str, pa.Array | pa.ChunkedArray]:
    """The passthrough columns; a sky catalog's text ra/dec pass through as the degrees read
    from them (float64 in every block, null where a cell is not a number)."""
    out = {c: column(c) for c in names}
    if kind == "sky":
        for name, field in ((options.ra_col, "ra"), (options.dec_col, "dec")):
            if name in out and _is_text(out[name].type):
                out[name] = sources.field(field)
    return out


def _read_columns(options: CatalogOptions, kind: str, passthrough: Sequence[str]) -> list[str]:
    """Columns a block needs, each once (a sky catalog's ra/dec are usually passed through)."""
    return list(dict.fromkeys([options.id_col, *_source_columns(kind, options), *passthrough]))


def _block(
    start: int,
    ids: pa.Array | pa.ChunkedArray,
    sources: pa.Array,
    passthrough: dict[str, pa.Array | pa.ChunkedArray],
) -> pa.Table:
    n = len(sources)
    columns: dict[str, Any] = {
        "row_index": pa.array(np.arange(start, start + n, dtype=np.int64)),
        "id_str": pc.cast(ids, pa.string()),
        "source": sources,
    }
    columns.update(passthrough)
    return pa.table(columns)


class ArrowCatalog(Catalog):
    """A catalog read as Arrow tables with the id, path and passthrough columns."""

    _options: CatalogOptions

    def _to_block(self, start: int, table: pa.Table) -> pa.Table:
        opts = self._options
        sources = _source_array(self.source_kind, table.column, opts, self.path.resolve().parent)
        return _block(
            start,
            table.column(opts.id_col),
            sources,
            _passthrough(self.source_kind, self.passthrough, table.column, sources, opts),
        )


class CsvCatalog(ArrowCatalog):
    """CSV streamed with pyarrow's incremental reader; only the needed columns are parsed."""

    kind = "csv"

    def __init__(self, path: Path, options: CatalogOptions) -> None:
        import pyarrow.csv as pacsv

        self.path = path
        self._options = options
        self._parse = pacsv.ParseOptions(delimiter="\t" if path.name.endswith(".tsv") else ",")
        schema = pacsv.open_csv(path, parse_options=self._parse).schema
        passthrough = _choose_columns(schema.names, options, path.name)
        self.source_kind = _source_kind(schema.names, options, path.name)
        text = {options.id_col: pa.string()}
        if self.source_kind == "sky":
            first = next(iter(pacsv.open_csv(path, parse_options=self._parse)), None)
            for name in (options.ra_col, options.dec_col):
                sample = None if first is None else _first_text(first.column(name))
                _check_degrees(name, schema.field(name).type, sample, None, path.name)
                # Read as text and parsed per block: a stray word further down is that row's
                # error, where a typed column would stop the reader mid-file.
                text[name] = pa.string()
        else:
            text[options.path_col] = pa.string()
        self._convert = pacsv.ConvertOptions(
            include_columns=_read_columns(options, self.source_kind, passthrough),
            column_types=text,
        )
        num_rows = sum(len(b) for b in self._reader(id_only=True))
        super().__init__(path, num_rows, passthrough)

    def _reader(self, id_only: bool = False) -> Iterator[pa.RecordBatch]:
        import pyarrow.csv as pacsv

        convert = self._convert
        if id_only:
            convert = pacsv.ConvertOptions(
                include_columns=[self._options.id_col],
                column_types={self._options.id_col: pa.string()},
            )
        yield from pacsv.open_csv(
            self.path,
            read_options=pacsv.ReadOptions(block_size=1 << 22),
            parse_options=self._parse,
            convert_options=convert,
        )

    def duplicate_ids(self) -> DuplicateIds:
        return _duplicates(pa.chunked_array([b.column(0) for b in self._reader(id_only=True)]))

    def _blocks(self, ranges: list[range], block_rows: int) -> Iterator[pa.Table]:
        # One pass over the file for all ranges: a CSV cannot be entered in the middle.
        yield from _slice_stream(self._reader(), ranges, block_rows, self._to_block)


class ParquetCatalog(ArrowCatalog):
    """Parquet streamed by row group; row groups outside the wanted ranges are not read."""

    kind = "parquet"

    def __init__(self, path: Path, options: CatalogOptions) -> None:
        import pyarrow.parquet as pq

        self._options = options
        self._file = pq.ParquetFile(path)
        schema = self._file.schema_arrow
        passthrough = _choose_columns(schema.names, options, path.name)
        self.source_kind = _source_kind(schema.names, options, path.name)
        if self.source_kind == "sky":
            for name in (options.ra_col, options.dec_col):
                first = next(self._file.iter_batches(batch_size=64, columns=[name]), None)
                sample = None if first is None else _first_text(first.column(0))
                _check_degrees(name, schema.field(name).type, sample, None, path.name)
        super().__init__(path, self._file.metadata.num_rows, passthrough)

    def duplicate_ids(self) -> DuplicateIds:
        ids = self._file.read(columns=[self._options.id_col]).column(0)
        return _duplicates(pc.cast(ids, pa.string()))

    def _blocks(self, ranges: list[range], block_rows: int) -> Iterator[pa.Table]:
        meta = self._file.metadata
        sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        bounds = itertools.pairwise(itertools.accumulate(sizes, initial=0))
        columns = _read_columns(self._options, self.source_kind, self.passthrough)
        for group, (lo, hi) in enumerate(bounds):
            inside = [r for r in ranges if r.start < hi and r.stop > lo]
            if not inside:
                continue  # this row group is never decoded
            batches = self._file.iter_batches(
                batch_size=block_rows, row_groups=[group], columns=columns
            )
            yield from _slice_stream(batches, inside, block_rows, self._to_block, first_row=lo)


class AstropyCatalog(Catalog):
    """ECSV, FITS binary table or VOTable through astropy.table (read whole; FITS memory-mapped)."""

    def __init__(self, path: Path, options: CatalogOptions, fmt: str) -> None:
        from astropy.table import Table

        self.kind = fmt
        self._options = options
        kwargs: dict[str, Any] = {"memmap": True} if fmt == "fits" else {}
        try:
            self._table = Table.read(path, format=fmt, **kwargs)
        except Exception as exc:  # astropy raises many types for unreadable tables
            raise CatalogError(f"cannot read {path.name} as {fmt} table: {exc}") from exc
        passthrough = _choose_columns(self._table.colnames, options, path.name)
        self.source_kind = _source_kind(self._table.colnames, options, path.name)
        if self.source_kind == "sky":
            for name in (options.ra_col, options.dec_col):
                head = self._column(name, 0, 64)
                sample = _first_text(head)
                _check_degrees(name, head.type, sample, self._table[name].unit, path.name)
        super().__init__(path, len(self._table), passthrough)

    def duplicate_ids(self) -> DuplicateIds:
        return _duplicates(
            pc.cast(self._column(self._options.id_col, 0, len(self._table)), pa.string())
        )

    def _column(self, name: str, start: int, stop: int) -> pa.Array:
        column = self._table[name][start:stop]
        values = np.asarray(column)
        if values.dtype.kind == "S":  # FITS strings arrive as bytes
            values = np.char.decode(values, "utf-8")
        if values.dtype.byteorder == ">":
            values = values.astype(values.dtype.newbyteorder("="))
        mask = np.ma.getmaskarray(column) if hasattr(column, "mask") else None
        if values.dtype.kind == "U":
            values = np.char.strip(values)  # FITS pads strings with blanks
        return pa.array(values, mask=mask)

    def _rows(self, start: int, stop: int) -> pa.Table:
        opts = self._options

        def column(name: str) -> pa.Array:
            return self._column(name, start, stop)

        sources = _source_array(self.source_kind, column, opts, self.path.resolve().parent)
        return _block(
            start,
            column(opts.id_col),
            sources,
            _passthrough(self.source_kind, self.passthrough, column, sources, opts),
        )


class Galaxy10Catalog(Catalog):
    """A Galaxy10-layout HDF5: every image is scored; id_str is the row number."""

    kind = "galaxy10"
    source_kind = "galaxy10"

    def __init__(self, path: Path, options: CatalogOptions) -> None:
        from galmorph.core.data.galaxy10 import Galaxy10File

        self._file: Galaxy10File = Galaxy10File(path)
        # Per-image columns are small (8 bytes a row) and read once, not per block.
        columns = {name: self._file.column(name) for name in GALAXY10_COLUMNS[:-1]}
        columns["label"] = self._file.labels
        self._columns = {k: v for k, v in columns.items() if v is not None}
        missing = [c for c in options.passthrough if c not in self._columns]
        if missing:
            raise CatalogError(
                f"{path.name}: passthrough column(s) {', '.join(missing)} not available "
                f"(Galaxy10 columns present: {', '.join(self._columns)})"
            )
        passthrough = [c for c in DEFAULT_PASSTHROUGH if c in self._columns]
        passthrough += [c for c in options.passthrough if c not in passthrough]
        super().__init__(path, self._file.num_images, tuple(passthrough))

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self._file.image_shape)

    def fingerprint(self) -> dict[str, Any]:
        # Hashing a 2.5 GB file on every run would dominate; the data layer's fingerprint is
        # the agreed identity of a Galaxy10 file.
        return {"kind": self.kind, "digest": self._file.fingerprint()["digest"]}

    def _rows(self, start: int, stop: int) -> pa.Table:
        rows = np.arange(start, stop, dtype=np.int64)
        passthrough = {name: pa.array(self._columns[name][start:stop]) for name in self.passthrough}
        return _block(start, pa.array(rows.astype(str)), pa.array(rows), passthrough)


class FileListCatalog(Catalog):
    """A folder or glob of cutouts, sorted by path; id_str is the path relative to the root."""

    kind = "files"

    def __init__(self, root: Path, files: list[Path], options: CatalogOptions, where: str) -> None:
        if options.passthrough:
            raise CatalogError("a folder or glob of cutouts has no columns to pass through")
        if not files:
            raise CatalogError(f"no cutouts ({', '.join(cutout_suffixes())}) match {where}")
        self._root = root
        self._files = files
        super().__init__(root, len(files), ())

    @classmethod
    def from_folder(cls, folder: Path, options: CatalogOptions) -> FileListCatalog:
        files = sorted(
            p
            for p in folder.rglob("*")
            if p.is_file() and p.name.lower().endswith(cutout_suffixes())
        )
        return cls(folder.resolve(), [p.resolve() for p in files], options, str(folder))

    @classmethod
    def from_glob(cls, pattern: str, options: CatalogOptions) -> FileListCatalog:
        files = sorted(Path(p).resolve() for p in glob.glob(pattern, recursive=True))
        files = [p for p in files if p.is_file()]
        root = Path(os.path.commonpath([str(p.parent) for p in files])) if files else Path(".")
        return cls(root, files, options, pattern)

    def _relative(self, p: Path) -> str:
        return p.relative_to(self._root).as_posix()

    def fingerprint(self) -> dict[str, Any]:
        digest = hashlib.sha256()
        for p in self._files:
            digest.update(f"{self._relative(p)}\t{p.stat().st_size}\n".encode())
        return {"kind": self.kind, "name": self.path.name, "listing_sha256": digest.hexdigest()}

    def _rows(self, start: int, stop: int) -> pa.Table:
        files = self._files[start:stop]
        ids = pa.array([self._relative(p) for p in files], pa.string())
        return _block(start, ids, pa.array([str(p) for p in files], pa.string()), {})


def _slice_stream(
    batches: Iterator[pa.RecordBatch],
    ranges: list[range],
    block_rows: int,
    to_block: Callable[[int, pa.Table], pa.Table],
    first_row: int = 0,
) -> Iterator[pa.Table]:
    """Cut a stream of record batches (starting at catalog row `first_row`) to `ranges`."""
    position = first_row
    last = max(r.stop for r in ranges)
    for batch in batches:
        for rows in ranges:
            lo, hi = max(rows.start - position, 0), min(rows.stop - position, len(batch))
            if hi <= lo:
                continue
            piece = pa.Table.from_batches([batch.slice(lo, hi - lo)])
            for off in range(0, len(piece), block_rows):
                yield to_block(position + lo + off, piece.slice(off, block_rows))
        position += len(batch)
        if position >= last:
            return


def _merge_adjacent(ranges: Sequence[range]) -> list[range]:
    merged: list[range] = []
    for r in sorted((r for r in ranges if len(r)), key=lambda r: r.start):
        if merged and merged[-1].stop == r.start:
            merged[-1] = range(merged[-1].start, r.stop)
        else:
            merged.append(r)
    return merged
