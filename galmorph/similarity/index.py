"""A similarity index over the embeddings of scored catalogs, in one folder:

- `vectors.usearch`: a usearch HNSW graph of the embeddings, cosine, stored as float16 (the
  library chosen by measurement, docs/similarity.md); key k is row k of the id table;
- `ids-NNNNN.parquet`: the id table, one file per build or add, in key order: `id_str`, the
  top class and its probability, the in-distribution flag, the OOD score, and `ra`/`dec` when
  the scored catalog had them;
- `manifest.json`: the model's SHA-256 (a query embedded by another model is refused), metric,
  width, count, the id files and the scored files already in (adding one twice is refused).

Scored files are read in record batches (pyarrow datasets), so building holds the graph and one
batch, never a whole catalog. Rows without embeddings (the scorer's error rows) are skipped.
Serving opens the graph memory-mapped (`usearch`'s view): pages come from the page cache as
queries touch them, and several server workers share them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from usearch.index import Index

from galmorph.core.data.tables import ID_COLUMN, IN_DISTRIBUTION_NAME, MODEL_SHA_COLUMN
from galmorph.core.files import atomic_write, atomic_write_text
from galmorph.core.modelfile.artifact import artifact_sha256
from galmorph.core.modelfile.contract import EMBEDDINGS_NAME, OOD_SCORE_NAME

logger = logging.getLogger(__name__)

FORMAT = "galmorph-similarity"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
VECTORS_NAME = "vectors.usearch"
METRIC = "cos"  # docs/similarity.md: cosine neighbours agreed with the class more than L2's
# float16 halves the memory of float32 for a recall@10 within 0.002 of it (docs/similarity.md).
DTYPE = "f16"
CONNECTIVITY = 16
EXPANSION_ADD = 128
# Recall@10 at 1 M synthetic 256-d vectors: 0.938 at 128, 0.974 at 256 (p50 1.5 ms on a loaded
# 2-core machine); at 100 k both are 0.999 (docs/similarity.md).
EXPANSION_SEARCH = 256
BATCH_ROWS = 8192
# The scored tables' columns the index keeps (written by galmorph.scoring, docs/scoring.md).
ID_SCHEMA = pa.schema(
    [
        ("key", pa.uint64()),
        (ID_COLUMN, pa.string()),
        ("pred_label", pa.string()),
        ("pred_prob", pa.float32()),
        (IN_DISTRIBUTION_NAME, pa.bool_()),
        (OOD_SCORE_NAME, pa.float32()),
        ("ra", pa.float64()),
        ("dec", pa.float64()),
    ]
)
NEIGHBOUR_COLUMNS = ("rank", ID_COLUMN, "distance", *ID_SCHEMA.names[2:])
OutlierOrder = Literal["isolation", "ood"]


class SimilarityError(ValueError):
    """A refusal a user can act on; its message is one line."""


@dataclass(frozen=True)
class Manifest:
    model_sha256: str
    dim: int
    count: int
    id_files: tuple[str, ...]
    sources: tuple[str, ...]  # resolved paths of the scored files in the index
    model_path: str | None = None
    metric: str = METRIC
    dtype: str = DTYPE
    library: str = ""
    format: str = FORMAT
    version: int = FORMAT_VERSION

    @classmethod
    def read(cls, folder: Path) -> Manifest:
        path = folder / MANIFEST_NAME
        if not path.is_file():
            raise SimilarityError(f"{folder} is not a similarity index (no {MANIFEST_NAME})")
        try:
            fields = json.loads(path.read_text())
            if fields.get("format") != FORMAT or fields.get("version") != FORMAT_VERSION:
                raise ValueError(f"format {fields.get('format')} {fields.get('version')}")
            fields["id_files"] = tuple(fields["id_files"])
            fields["sources"] = tuple(fields["sources"])
            return cls(**fields)
        except (ValueError, TypeError, KeyError) as exc:
            raise SimilarityError(f"{path} is not a galmorph similarity manifest: {exc}") from None

    def write(self, folder: Path) -> None:
        atomic_write_text(folder / MANIFEST_NAME, json.dumps(asdict(self), indent=2) + "\n")


def scored_files(sources: Sequence[Path]) -> list[Path]:
    """Parquet files of scores: a scoring output folder gives its parts in order, a file itself."""
    files: list[Path] = []
    for source in sources:
        if source.is_dir():
            parts = sorted(source.glob("part-*.parquet"))
            if not parts:
                raise SimilarityError(f"{source} holds no part-*.parquet (not a scoring output)")
            files.extend(parts)
        elif source.is_file() and source.suffix == ".parquet":
            files.append(source)
        else:
            raise SimilarityError(f"{source}: not a scored Parquet file or scoring output folder")
    return files


def _batches(files: Sequence[Path]) -> Iterator[pa.RecordBatch]:
    try:
        dataset = ds.dataset([str(f) for f in files], format="parquet")
    except (pa.ArrowInvalid, OSError) as exc:
        raise SimilarityError(f"cannot read the scores: {exc}") from None
    names = set(dataset.schema.names)
    missing = {EMBEDDINGS_NAME, ID_COLUMN, MODEL_SHA_COLUMN} - names
    if missing:
        hint = " (score with --embeddings)" if EMBEDDINGS_NAME in missing else ""
        raise SimilarityError(f"the scores lack column(s) {', '.join(sorted(missing))}{hint}")
    columns = [c for c in (*ID_SCHEMA.names[1:], EMBEDDINGS_NAME, MODEL_SHA_COLUMN) if c in names]
    # In file order: keys follow the scorer's row order, so a build is reproducible.
    yield from dataset.to_batches(columns=columns, batch_size=BATCH_ROWS, use_threads=False)


def _id_rows(batch: pa.RecordBatch, first_key: int) -> pa.RecordBatch:
    n = batch.num_rows
    columns = [pa.array(np.arange(first_key, first_key + n, dtype=np.uint64))]
    for field in list(ID_SCHEMA)[1:]:
        index = batch.schema.get_field_index(field.name)
        column = batch.column(index) if index >= 0 else pa.nulls(n, field.type)
        columns.append(column.cast(field.type))
    return pa.RecordBatch.from_arrays(columns, schema=ID_SCHEMA)


def _new_graph(dim: int) -> Index:
    return Index(
        ndim=dim,
        metric=METRIC,
        dtype=DTYPE,
        connectivity=CONNECTIVITY,
        expansion_add=EXPANSION_ADD,
        expansion_search=EXPANSION_SEARCH,
    )


def _library() -> str:
    import usearch

    return f"usearch {usearch.__version__}"


def _append(
    folder: Path,
    manifest: Manifest | None,
    sources: Sequence[Path],
    threads: int,
    model_sha256: str | None = None,
) -> Manifest:
    """Add the scored files to the index in `folder` (a new one when manifest is None; then
    `model_sha256`, when given, is the model the scores must come from); the vectors and the
    new id file are written before the manifest that names them."""
    files = scored_files(sources)
    resolved = tuple(str(f.resolve()) for f in files)
    if manifest is not None:
        again = sorted(set(resolved) & set(manifest.sources))
        if again:
            raise SimilarityError(f"already in the index: {', '.join(again[:3])}")
    graph = Index.restore(str(folder / VECTORS_NAME)) if manifest else None
    sha = manifest.model_sha256 if manifest else model_sha256
    dim = manifest.dim if manifest else None
    key = manifest.count if manifest else 0
    id_name = f"ids-{len(manifest.id_files) if manifest else 0:05d}.parquet"
    with atomic_write(folder / id_name) as temp, pq.ParquetWriter(temp, ID_SCHEMA) as writer:
        for batch in _batches(files):
            shas = set(pc.unique(batch.column(MODEL_SHA_COLUMN)).drop_null().to_pylist())
            sha = sha or (min(shas) if shas else None)
            if shas - {sha}:
                raise SimilarityError(
                    f"the scores were made by model(s) {', '.join(s[:12] for s in shas - {sha})}, "
                    f"not {str(sha)[:12]} (the index's model, or --model): an index holds one "
                    "model's embeddings"
                )
            embeddings = batch.column(batch.schema.get_field_index(EMBEDDINGS_NAME))
            batch = batch.filter(pc.is_valid(embeddings))
            if batch.num_rows == 0:
                continue
            column = batch.column(batch.schema.get_field_index(EMBEDDINGS_NAME))
            width = pa.types.is_fixed_size_list(column.type) and column.type.list_size
            if not width or (dim is not None and width != dim):
                raise SimilarityError(f"embeddings of type {column.type}, the index has {dim}")
            dim = width
            if graph is None:
                graph = _new_graph(dim)
            vectors = column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
            keys = np.arange(key, key + batch.num_rows, dtype=np.uint64)
            graph.add(keys, np.ascontiguousarray(vectors, np.float32), threads=threads)
            writer.write_batch(_id_rows(batch, key))
            key += batch.num_rows
    if graph is None or sha is None or dim is None or key == (manifest.count if manifest else 0):
        (folder / id_name).unlink(missing_ok=True)
        raise SimilarityError(f"no rows with embeddings in {', '.join(map(str, sources))}")
    with atomic_write(folder / VECTORS_NAME) as temp:
        graph.save(str(temp))
    if manifest is None:
        manifest = Manifest(sha, dim, 0, (), (), library=_library())
    updated = replace(
        manifest,
        count=key,
        id_files=(*manifest.id_files, id_name),
        sources=(*manifest.sources, *resolved),
        library=_library(),
    )
    updated.write(folder)
    return updated


def build_index(
    sources: Sequence[Path], out: Path, *, model_path: Path | None = None, threads: int = 0
) -> Manifest:
    """A new index in `out` (refused when it already holds one). threads: 0 = all cores."""
    if (out / MANIFEST_NAME).exists():
        raise SimilarityError(f"{out} already holds an index: add to it with `galmorph index add`")
    sha = None if model_path is None else artifact_sha256(model_path)
    out.mkdir(parents=True, exist_ok=True)
    manifest = _append(out, None, sources, threads, sha)
    if model_path is not None:
        manifest = replace(manifest, model_path=str(model_path.resolve()))
        manifest.write(out)
    return manifest


def add_to_index(folder: Path, sources: Sequence[Path], *, threads: int = 0) -> Manifest:
    """Add new scored parts (made by the index's model) to an existing index."""
    return _append(folder, Manifest.read(folder), sources, threads)


class SimilarityIndex:
    """An index opened for queries; read-only, safe to share between threads."""

    def __init__(self, folder: Path, *, view: bool = True) -> None:
        self.folder = folder
        self.manifest = Manifest.read(folder)
        graph = Index.restore(str(folder / VECTORS_NAME), view=view)
        if graph is None:
            raise SimilarityError(f"{folder / VECTORS_NAME} is missing or not a usearch index")
        # usearch has this setter; its annotations hide it from mypy.
        graph.expansion_search = EXPANSION_SEARCH  # type: ignore[misc]
        self.graph = graph
        tables = (pq.read_table(folder / name) for name in self.manifest.id_files)
        # One chunk per column: `take` on a chunked column concatenates it first, O(rows) per
        # query (measured 20 ms a query at 200 k rows against 0.4 ms for the graph search).
        self.ids = pa.concat_tables(tables).combine_chunks()
        if not len(graph) == self.ids.num_rows == self.manifest.count:
            raise SimilarityError(
                f"{folder} is damaged: {len(graph)} vectors, {self.ids.num_rows} ids, "
                f"manifest says {self.manifest.count}; build it again"
            )
        self.labels = sorted(set(pc.unique(self.ids.column("pred_label")).drop_null().to_pylist()))
        self._positions: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def model_sha256(self) -> str:
        return self.manifest.model_sha256

    def check_model(self, sha256: str, name: str = "the model") -> None:
        if sha256 != self.model_sha256:
            raise SimilarityError(
                f"{name} (sha256 {sha256[:12]}) is not the index's model "
                f"(sha256 {self.model_sha256[:12]}): its embeddings are not comparable"
            )

    def key_of_id(self, id_str: str) -> int:
        # A scan (about 5 ms a million ids) rather than a hash map of every id in RAM.
        key = pc.index(self.ids.column(ID_COLUMN), pa.scalar(id_str, pa.string())).as_py()
        if key < 0:
            raise SimilarityError(f"id {id_str!r} is not in the index")
        return int(key)

    def key_at(self, ra: float, dec: float, radius_arcsec: float) -> int:
        """The row nearest to (ra, dec) in degrees, within the radius."""
        if self._positions is None:
            columns = [
                self.ids.column(name).to_numpy(zero_copy_only=False).astype(np.float64)
                for name in ("ra", "dec")
            ]
            self._positions = (columns[0], columns[1])
        ras, decs = self._positions
        if not np.isfinite(ras).any():
            raise SimilarityError("the index has no positions (its catalog had no ra/dec)")
        r1, d1, r2, d2 = np.radians(ra), np.radians(dec), np.radians(ras), np.radians(decs)
        # Haversine: accurate at arcsecond separations where the cosine formula is not.
        h = np.sin((d2 - d1) / 2) ** 2 + np.cos(d1) * np.cos(d2) * np.sin((r2 - r1) / 2) ** 2
        separation = np.degrees(2 * np.arcsin(np.sqrt(np.clip(h, 0, 1)))) * 3600
        key = int(np.nanargmin(separation))
        if not separation[key] <= radius_arcsec:
            raise SimilarityError(
                f'no galaxy within {radius_arcsec}" of ra={ra} dec={dec} '
                f'(nearest: {self.ids.column(ID_COLUMN)[key]} at {separation[key]:.1f}")'
            )
        return key

    def vector(self, key: int) -> np.ndarray:
        return np.asarray(self.graph.get(np.uint64(key), dtype="f32"), np.float32)

    def search(
        self,
        vector: np.ndarray,
        k: int,
        *,
        label: str | None = None,
        in_distribution: bool = False,
        exclude: int | None = None,
    ) -> pa.Table:
        """The k nearest rows to `vector` that pass the filters (fewer when too few do).

        Filters are applied to the graph's candidates; the candidate list doubles until k pass
        or the whole index has been searched, so a rare class still gets its k neighbours."""
        vector = np.asarray(vector, np.float32).reshape(-1)
        if vector.shape[0] != self.manifest.dim or not np.isfinite(vector).all():
            raise SimilarityError(f"the query must be {self.manifest.dim} finite numbers")
        if label is not None and label not in self.labels:
            raise SimilarityError(f"class {label!r} is not in the index: {', '.join(self.labels)}")
        total = len(self.graph)
        wanted = k + (exclude is not None)
        filtered = label is not None or in_distribution
        count = min(total, wanted * 4 if filtered else wanted)
        while True:
            matches = self.graph.search(vector, count, threads=1)
            keys = matches.keys.astype(np.int64)
            distances = matches.distances.astype(np.float32)
            keep = keys != (-1 if exclude is None else exclude)
            rows = self.ids.take(pa.array(keys))
            if label is not None:
                keep &= pc.fill_null(pc.equal(rows.column("pred_label"), label), False).to_numpy()
            if in_distribution:
                flags = rows.column(IN_DISTRIBUTION_NAME)
                keep &= pc.fill_null(flags, False).to_numpy(zero_copy_only=False)
            if keep.sum() >= k or count >= total:
                break
            count = min(total, count * 2)
        chosen = np.flatnonzero(keep)[:k]
        table = rows.take(pa.array(chosen)).drop_columns(["key"])
        table = table.add_column(0, "rank", pa.array(np.arange(1, len(chosen) + 1), pa.int32()))
        return table.add_column(2, "distance", pa.array(distances[chosen]))

    def outliers(self, n: int, *, by: OutlierOrder = "isolation", k: int = 10) -> pa.Table:
        """The n most isolated rows (mean cosine distance to their k nearest neighbours), or
        the n with the highest OOD score; both figures are in the table."""
        isolation = self.isolation(k)
        if by == "ood":
            scores = self.ids.column(OOD_SCORE_NAME).to_numpy(zero_copy_only=False)
            if not np.isfinite(scores.astype(np.float64)).any():
                raise SimilarityError("the index has no OOD scores (its model had none)")
            order = np.argsort(-np.nan_to_num(scores.astype(np.float64), nan=-np.inf))
        else:
            order = np.argsort(-isolation)
        chosen = order[:n]
        table = self.ids.take(pa.array(chosen)).drop_columns(["key"])
        table = table.add_column(0, "rank", pa.array(np.arange(1, len(chosen) + 1), pa.int32()))
        return table.add_column(2, "isolation", pa.array(isolation[chosen]))

    def isolation(self, k: int, chunk: int = 4096) -> np.ndarray:
        """Mean cosine distance of every row to its k nearest other rows (all cores)."""
        total = len(self.graph)
        k = min(k, total - 1)
        result = np.zeros(total, np.float32)
        if k < 1:
            return result
        for start in range(0, total, chunk):
            keys = np.arange(start, min(total, start + chunk), dtype=np.uint64)
            vectors = np.asarray(self.graph.get(keys, dtype="f32"), np.float32)
            matches = self.graph.search(vectors, k + 1, threads=0)
            found = matches.keys.astype(np.int64)
            others = found != keys[:, None].astype(np.int64)
            # k + 1 found, one of them the row itself: the mean is over the k others.
            distances = np.where(others, matches.distances, np.nan)
            result[start : start + len(keys)] = np.nanmean(distances, axis=1)
        return result


def describe(manifest: Manifest) -> dict[str, Any]:
    """The manifest as a short summary (for `galmorph index build/add` and /similar's info)."""
    return {
        "count": manifest.count,
        "dim": manifest.dim,
        "metric": "cosine" if manifest.metric == "cos" else manifest.metric,
        "model_sha256": manifest.model_sha256,
        "library": manifest.library,
        "id_files": len(manifest.id_files),
        "sources": len(manifest.sources),
    }


__all__ = [
    "NEIGHBOUR_COLUMNS",
    "Manifest",
    "SimilarityError",
    "SimilarityIndex",
    "add_to_index",
    "build_index",
    "describe",
]
