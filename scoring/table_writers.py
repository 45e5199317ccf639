"""Streaming table writers for merged scoring output: Parquet, CSV and FITS binary table.

Each writer takes Arrow tables one at a time and never holds more than the current one, so a
merge of millions of rows runs in flat memory. FITS needs the row count and string widths in
its header before any data: the caller passes them (the merge knows both from the parts).
The file appears under its final name only when complete, with the expected row count
(galmorph.core.files.atomic_write: temporary name, fsync, rename, folder fsync).
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from galmorph.core.files import atomic_write

FORMATS = ("parquet", "csv", "fits")
SUFFIXES = {"parquet": ".parquet", "csv": ".csv", "fits": ".fits"}
# FITS has no null for integers except a declared TNULL value; floats use NaN.
FITS_INT_NULL = np.iinfo(np.int64).min


def format_from_path(path: Path) -> str:
    name = path.name.lower()
    for fmt, suffix in SUFFIXES.items():
        if name.endswith(suffix) or (fmt == "fits" and name.endswith(".fit")):
            return fmt
    raise ValueError(f"cannot tell the output format of {path.name}: use .parquet, .csv or .fits")


class StreamingTableWriter:
    """Write Arrow tables of one schema to `path` in `fmt`; use as a context manager.

    The file is opened on entering and committed on a clean exit; an exception or a row count
    other than `num_rows` leaves `path` untouched.
    """

    def __init__(
        self,
        path: Path,
        fmt: str,
        schema: pa.Schema,
        *,
        num_rows: int,
        string_widths: dict[str, int] | None = None,
    ) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown output format {fmt!r}; choose from {', '.join(FORMATS)}")
        self.path = path
        self._fmt = fmt
        self._schema = schema
        self._rows_written = 0
        self._num_rows = num_rows
        self._string_widths = string_widths or {}
        self._writer: Any = None
        self._stack = ExitStack()

    def write(self, table: pa.Table) -> None:
        if self._writer is None:
            raise RuntimeError("StreamingTableWriter.write outside its `with` block")
        self._writer.write_table(table.select(self._schema.names).cast(self._schema))
        self._rows_written += len(table)

    def __enter__(self) -> StreamingTableWriter:
        with ExitStack() as stack:
            temp = stack.enter_context(atomic_write(self.path))
            self._writer = self._open(temp)
            # Runs before atomic_write's exit: an exception raised here cancels the commit.
            stack.push(self._close)
            self._stack = stack.pop_all()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stack.__exit__(exc_type, exc, tb)

    def _open(self, temp: Path) -> Any:
        if self._fmt == "parquet":
            import pyarrow.parquet as pq

            return pq.ParquetWriter(temp, self._schema)
        if self._fmt == "csv":
            import pyarrow.csv as pacsv

            return pacsv.CSVWriter(temp, self._schema)
        return _FitsTableWriter(temp, self._schema, self._num_rows, self._string_widths)

    def _close(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._writer.close()
        self._writer = None
        if exc_type is None and self._rows_written != self._num_rows:
            raise RuntimeError(f"wrote {self._rows_written} rows, expected {self._num_rows}")


def string_widths(table: pa.Table) -> dict[str, int]:
    """Longest UTF-8 length per string column (FITS fixed-width strings need it up front)."""
    widths = {}
    for name, column in zip(table.column_names, table.columns, strict=True):
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            longest = pc.max(pc.binary_length(column)).as_py()
            widths[name] = int(longest or 0)
    return widths


class _FitsTableWriter:
    """A FITS binary table streamed with astropy's StreamingHDU (header first, then rows)."""

    def __init__(
        self, path: Path, schema: pa.Schema, num_rows: int, widths: dict[str, int]
    ) -> None:
        from astropy.io import fits

        columns = []
        dtype = []
        for f in schema:
            form, np_type, null = _fits_column(f, widths.get(f.name, 0))
            columns.append(fits.Column(name=f.name, format=form, null=null))
            dtype.append((f.name, np_type))
        header = fits.BinTableHDU.from_columns(fits.ColDefs(columns), nrows=0).header
        header["NAXIS2"] = num_rows
        self._dtype = np.dtype(dtype)
        self._stream = fits.StreamingHDU(str(path), header)

    def write_table(self, table: pa.Table) -> None:
        records = np.zeros(len(table), self._dtype)
        for name in table.column_names:
            records[name] = _fits_values(table.column(name), self._dtype[name])
        # StreamingHDU expects the raw bytes of the big-endian record array.
        self._stream.write(records.view(np.uint8))

    def close(self) -> None:
        self._stream.close()


def _fits_column(f: pa.Field, width: int) -> tuple[str, Any, int | None]:
    t = f.type
    if pa.types.is_fixed_size_list(t) and pa.types.is_float32(t.value_type):
        # A vector column (the embeddings): D floats per row, NaN for null rows.
        return f"{t.list_size}E", (">f4", (t.list_size,)), None
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        width = max(width, 1)
        return f"{width}A", f"S{width}", None
    if pa.types.is_boolean(t):
        return "L", "S1", None
    if pa.types.is_integer(t):
        return "K", ">i8", int(FITS_INT_NULL)
    if pa.types.is_float32(t):
        return "E", ">f4", None
    if pa.types.is_floating(t):
        return "D", ">f8", None
    raise ValueError(f"column {f.name!r} of type {t} cannot be written to a FITS table")


def _fits_values(column: pa.ChunkedArray, dtype: np.dtype) -> np.ndarray:
    t = column.type
    if pa.types.is_fixed_size_list(t):
        rows = column.combine_chunks()
        values = np.asarray(rows.flatten().to_numpy(), np.float32).reshape(-1, t.list_size)
        full = np.full((len(rows), t.list_size), np.nan, np.float32)
        full[rows.is_valid().to_numpy(zero_copy_only=False)] = values
        return full
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return np.array([(v or "").encode() for v in column.to_pylist()], dtype=dtype)
    if pa.types.is_boolean(t):
        return np.array([{True: b"T", False: b"F"}.get(v, b"\0") for v in column.to_pylist()])
    if pa.types.is_integer(t):
        return column.fill_null(FITS_INT_NULL).to_numpy().astype(np.int64)
    return column.fill_null(float("nan")).to_numpy()
