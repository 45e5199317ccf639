"""Batch scoring of a catalog: decode in worker processes, infer in batches, write shards.

Pipeline (local engine): the catalog is streamed in blocks; rows are grouped into batches of
`batch_size`; each batch is split across `workers` decode processes (galmorph.core.decode, the
same code the server runs); the main process runs OnnxModel.predict on the batch whose cutouts
are ready while the workers decode the next ones. At most `prefetch` batches are in flight, so
memory stays flat however long the catalog. Output rows are gathered per shard and each shard is
written atomically (galmorph.scoring.shards); finished shards are skipped on a rerun.

A bad or missing cutout becomes a row whose `error` says why ("kind: message"); it never stops
the run.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import re
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
from galmorph.scoring.catalog import Catalog, CatalogOptions, open_catalog
from galmorph.scoring.shards import (
    MODEL_SHA_COLUMN,
    ROW_INDEX,
    Manifest,
    MergeSummary,
    ShardError,
    ShardPlan,
    claim_output,
    finished_shards,
    merge,
    remove_stale_temps,
    write_part,
)

from galmorph.core.contract import ModelCard
from galmorph.core.decode import (
    CutoutError,
    DecodeLimits,
    PreprocessInfo,
    decode_path,
    fit_rgb,
    resolve_stretch,
)

if TYPE_CHECKING:
    from galmorph.core.engine import OnnxModel

logger = logging.getLogger(__name__)

ENGINES = ("local", "ray")
DEFAULT_SHARD_SIZE = 10_000
# The column names of a result row besides passthrough and per-class probabilities.
FIXED_COLUMNS = (ROW_INDEX, "id_str", "pred_label", "pred_index", "pred_prob")


@dataclass(frozen=True)
class ScoreConfig:
    catalog: str | Path
    model: Path
    out_dir: Path
    output_format: str = "parquet"
    catalog_options: CatalogOptions = field(default_factory=CatalogOptions)
    shard_size: int = DEFAULT_SHARD_SIZE
    shard_index: int = 0
    num_shards: int = 1
    # decode processes; 0 decodes in the main process between batches (no overlap)
    workers: int = field(default_factory=lambda: default_decode_workers())
    batch_size: int = 32
    ort_threads: int | None = None  # onnxruntime intra-op threads; None: cores left by workers
    providers: tuple[str, ...] | None = None  # onnxruntime providers in order; None: CUDA, CPU
    prefetch: int = 0  # batches in flight; 0: 2 + workers
    stretch: str | None = None  # None: the stretch recorded in the model
    engine: str = "local"
    progress: bool = True
    merge: bool | None = None  # None: merge when this run covers the whole catalog


@dataclass
class ScoreSummary:
    rows_total: int
    rows_scored: int
    shards_assigned: int
    shards_skipped: int
    errors: dict[str, int]  # kind -> rows, among the rows scored by this run
    seconds: float  # scoring, from the first batch to the last part written
    startup_seconds: float = 0.0  # opening the model and warming it up, before `seconds`
    merged: MergeSummary | None = None

    @property
    def images_per_second(self) -> float:
        return self.rows_scored / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "rows_total": self.rows_total,
            "rows_scored": self.rows_scored,
            "shards_assigned": self.shards_assigned,
            "shards_skipped": self.shards_skipped,
            "errors": self.errors,
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.images_per_second, 2),
            "startup_seconds": round(self.startup_seconds, 3),
        }
        if self.merged is not None:
            out["merged"] = {
                "path": str(self.merged.path),
                "rows": self.merged.rows,
                "errors": self.merged.errors,
            }
        return out


# ---------------------------------------------------------------- decoding (worker side)


@dataclass(frozen=True)
class DecodeSettings:
    """Everything a decode worker needs; picklable, sent once per worker."""

    card: ModelCard
    stretch: str | None
    source_kind: str  # "path" | "galaxy10"
    galaxy10_path: str | None = None
    limits: DecodeLimits = field(default_factory=DecodeLimits)


_galaxy10_files: dict[str, Any] = {}


def decode_sources(
    settings: DecodeSettings, sources: list[Any]
) -> tuple[np.ndarray, list[str | None]]:
    """Decode cutouts to a uint8 (n, H, W, 3) batch; failed rows are zeros plus an error."""
    height, width = settings.card.input_size
    images = np.zeros((len(sources), height, width, 3), np.uint8)
    errors: list[str | None] = [None] * len(sources)
    for i, source in enumerate(sources):
        try:
            images[i] = _decode_one(settings, source)
        except Exception as exc:  # one bad cutout must never stop a catalog
            errors[i] = describe_error(exc)
    return images, errors


def _decode_one(settings: DecodeSettings, source: Any) -> np.ndarray:
    if source is None:
        raise FileNotFoundError("no cutout path in the catalog row")
    if settings.source_kind == "galaxy10":
        return _galaxy10_image(settings, int(source))
    try:
        return decode_path(
            source, card=settings.card, stretch=settings.stretch, limits=settings.limits
        ).image
    except CutoutError:
        if not os.path.exists(source):  # checked only on failure: no extra stat per cutout
            raise FileNotFoundError(2, "cutout not found", source) from None
        raise


def _galaxy10_image(settings: DecodeSettings, index: int) -> np.ndarray:
    from galmorph.core.galaxy10 import Galaxy10File

    assert settings.galaxy10_path is not None
    handle = _galaxy10_files.get(settings.galaxy10_path)
    if handle is None:  # one lazily opened HDF5 handle per worker process
        handle = _galaxy10_files[settings.galaxy10_path] = Galaxy10File(settings.galaxy10_path)
    image = handle.image(index)
    # Same fitting as an uploaded PNG of that size: the scorer and the server agree on pixels.
    info = PreprocessInfo(format="galaxy10", bands_used=["R", "G", "B"], original_shape=image.shape)
    return fit_rgb(image, settings.card.input_size, "resize", info)


def describe_error(exc: BaseException) -> str:
    """`kind: message` for the error column; the kind is what the summary counts."""
    if isinstance(exc, CutoutError):
        return f"{exc.kind.value}: {exc.message}"
    if isinstance(exc, FileNotFoundError):
        return f"missing: {exc.filename}" if exc.filename else f"missing: {exc}"
    if isinstance(exc, OSError):
        return f"io: {exc}"
    return f"decode: {type(exc).__name__}: {exc}"


_worker_settings: DecodeSettings | None = None


def _init_worker(settings: DecodeSettings) -> None:
    global _worker_settings
    _worker_settings = settings


def _decode_in_worker(sources: list[Any]) -> tuple[np.ndarray, list[str | None]]:
    assert _worker_settings is not None, "decode worker was not initialised"
    return decode_sources(_worker_settings, sources)


# ---------------------------------------------------------------- result rows


def class_columns(class_names: Iterable[str]) -> list[str]:
    """`p_<class>` column names: lower case, non-alphanumerics to `_`; must stay unique."""
    names = []
    for name in class_names:
        ident = re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_")
        names.append(f"p_{ident or 'class'}")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"class names collide as column names: {', '.join(duplicates)}")
    return names


class ResultBuilder:
    """Turns a block of catalog rows + probabilities + errors into output rows."""

    def __init__(self, card: ModelCard, model_sha256: str, passthrough: tuple[str, ...]) -> None:
        self.class_names = list(card.class_names)
        self.prob_columns = class_columns(card.class_names)
        self.model_sha256 = model_sha256
        self.passthrough = passthrough
        reserved = {*FIXED_COLUMNS, *self.prob_columns, MODEL_SHA_COLUMN, "error", "source"}
        clash = [c for c in passthrough if c in reserved]
        if clash:
            raise ValueError(f"passthrough column(s) {', '.join(clash)} clash with output columns")

    def build(self, block: pa.Table, probs: np.ndarray, errors: list[str | None]) -> pa.Table:
        n = len(block)
        ok = np.array([e is None for e in errors], bool)
        index = np.argmax(probs, axis=1) if probs.size else np.zeros(n, np.int64)
        mask = ~ok
        columns: dict[str, Any] = {
            ROW_INDEX: block.column(ROW_INDEX),
            "id_str": block.column("id_str"),
        }
        for name in self.passthrough:
            columns[name] = block.column(name)
        columns["pred_label"] = pa.array(
            [self.class_names[i] if good else None for i, good in zip(index, ok, strict=True)],
            pa.string(),
        )
        columns["pred_index"] = pa.array(index.astype(np.int64), mask=mask)
        columns["pred_prob"] = pa.array(
            probs[np.arange(n), index] if n else np.zeros(0, np.float32), mask=mask
        )
        for k, name in enumerate(self.prob_columns):
            columns[name] = pa.array(probs[:, k], mask=mask)
        columns[MODEL_SHA_COLUMN] = pa.array([self.model_sha256] * n, pa.string())
        columns["error"] = pa.array(errors, pa.string())
        return pa.table(columns)


# ---------------------------------------------------------------- local engine


def _row_batches(blocks: Iterable[pa.Table], batch_size: int) -> Iterator[pa.Table]:
    for block in blocks:
        for start in range(0, len(block), batch_size):
            yield block.slice(start, batch_size)


class LocalEngine:
    """Decode in a process pool, overlapped with batched inference in this process."""

    def __init__(
        self,
        model: OnnxModel,
        settings: DecodeSettings,
        *,
        workers: int,
        batch_size: int,
        prefetch: int,
    ) -> None:
        self.model = model
        self.settings = settings
        self.workers = workers
        self.batch_size = batch_size
        self.prefetch = prefetch or 2 + workers

    def run(self, blocks: Iterable[pa.Table], builder: ResultBuilder) -> Iterator[pa.Table]:
        if self.workers == 0:
            for batch in _row_batches(blocks, self.batch_size):
                images, errors = decode_sources(self.settings, batch.column("source").to_pylist())
                yield builder.build(batch, self._predict(images, errors), errors)
            return
        # forkserver: workers start from a clean process, not a fork of one that already
        # runs onnxruntime and pyarrow thread pools.
        context = multiprocessing.get_context("forkserver")
        with ProcessPoolExecutor(
            self.workers, mp_context=context, initializer=_init_worker, initargs=(self.settings,)
        ) as pool:
            in_flight: deque[tuple[pa.Table, list[Future[Any]]]] = deque()
            batches = _row_batches(blocks, self.batch_size)
            exhausted = False
            while True:
                while not exhausted and len(in_flight) < self.prefetch:
                    batch = next(batches, None)
                    if batch is None:
                        exhausted = True
                        break
                    in_flight.append((batch, self._submit(pool, batch)))
                if not in_flight:
                    return
                batch, futures = in_flight.popleft()
                parts = [f.result() for f in futures]
                images = np.concatenate([p[0] for p in parts])
                errors = [e for p in parts for e in p[1]]
                yield builder.build(batch, self._predict(images, errors), errors)

    def _submit(self, pool: ProcessPoolExecutor, batch: pa.Table) -> list[Future[Any]]:
        sources = batch.column("source").to_pylist()
        step = -(-len(sources) // self.workers)
        return [
            pool.submit(_decode_in_worker, sources[i : i + step])
            for i in range(0, len(sources), step)
        ]

    def _predict(self, images: np.ndarray, errors: list[str | None]) -> np.ndarray:
        probs = np.full((len(images), self.model.card.num_classes), np.nan, np.float32)
        good = np.array([e is None for e in errors], bool)
        if good.all():  # the usual case: no copy of the batch
            probs[:] = self.model.predict(images)
        elif good.any():
            probs[good] = self.model.predict(images[good])
        return probs


# ---------------------------------------------------------------- shard assembly


class ShardAssembler:
    """Collects result rows in order and writes each shard the moment it is complete."""

    def __init__(self, out_dir: Path, plan: ShardPlan, shards: list[int]) -> None:
        self.out_dir = out_dir
        self.plan = plan
        self._pending = deque(shards)
        self._pieces: list[pa.Table] = []
        self._have = 0
        self.errors: dict[str, int] = {}

    def add(self, table: pa.Table) -> None:
        while len(table):
            shard = self._pending[0]
            rows = self.plan.rows(shard)
            take = min(len(rows) - self._have, len(table))
            self._pieces.append(table.slice(0, take))
            self._have += take
            table = table.slice(take)
            if self._have == len(rows):
                self._flush(shard)

    def _flush(self, shard: int) -> None:
        part = pa.concat_tables(self._pieces).combine_chunks()
        first = part.column(ROW_INDEX)[0].as_py()
        if first != self.plan.rows(shard).start:  # a bug here would silently shift rows
            raise ShardError(f"shard {shard} would start at row {first}")
        for value in part.column("error").drop_null().to_pylist():
            kind = value.split(":", 1)[0]
            self.errors[kind] = self.errors.get(kind, 0) + 1
        write_part(self.out_dir, shard, part)
        self._pending.popleft()
        self._pieces, self._have = [], 0

    def finish(self) -> None:
        if self._pending:
            raise ShardError(f"scoring ended before shards {list(self._pending)[:5]} were full")


# ---------------------------------------------------------------- the run


def default_decode_workers() -> int:
    """Cores beyond two go to decoding; onnxruntime keeps two.

    Measured on 2 cores (benchmarks/results/score.json): decoding between batches in the main
    process beat one overlapped decode worker (0.84 vs 0.79 of raw for FITS), because the worker
    takes CPU from onnxruntime's two threads.
    """
    return max(0, (os.cpu_count() or 1) - 2)


def default_ort_threads(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) - workers)


def build_manifest(
    catalog: Catalog, config: ScoreConfig, card: ModelCard, model_sha256: str
) -> Manifest:
    options = config.catalog_options
    return Manifest(
        catalog=catalog.fingerprint(),
        num_rows=catalog.num_rows,
        shard_size=config.shard_size,
        model_sha256=model_sha256,
        model_name=card.model_name,
        class_names=list(card.class_names),
        settings={
            "id_col": options.id_col,
            "path_col": options.path_col,
            "passthrough": list(catalog.passthrough),
            "stretch": config.stretch or card.stretch,
        },
    )


def score(config: ScoreConfig) -> ScoreSummary:
    """Score the shards assigned to this task; merge when the whole catalog is done.

    Decode workers are started with multiprocessing's "forkserver" method: a script calling
    this must guard its entry point with `if __name__ == "__main__":` (the `galmorph` CLI does).
    """
    from galmorph.core.engine import OnnxModel

    if config.engine not in ENGINES:
        raise ValueError(f"unknown engine {config.engine!r}; choose from {', '.join(ENGINES)}")
    if config.stretch is not None:
        try:
            resolve_stretch(config.stretch)
        except CutoutError as exc:
            raise ValueError(exc.message) from None
    catalog = open_catalog(config.catalog, config.catalog_options)
    ort_threads = config.ort_threads or default_ort_threads(config.workers)
    loading = time.perf_counter()
    # With Ray the actors run inference; the driver only reads the card and hash.
    providers = ["CPUExecutionProvider"] if config.engine == "ray" else config.providers
    model = OnnxModel(
        config.model, providers=providers, intra_op_threads=ort_threads, inter_op_threads=1
    )
    builder = ResultBuilder(model.card, model.sha256, catalog.passthrough)
    manifest = build_manifest(catalog, config, model.card, model.sha256)
    claim_output(config.out_dir, manifest)
    plan = manifest.plan
    assigned = plan.assigned(config.shard_index, config.num_shards)
    remove_stale_temps(config.out_dir, assigned)
    done = finished_shards(config.out_dir, manifest, assigned)
    todo = [k for k in assigned if k not in done]
    todo_rows = sum(len(plan.rows(k)) for k in todo)
    logger.info(
        "%d rows in %d shards; this task: %d shards, %d already done, %d rows to score",
        plan.num_rows,
        plan.num_shards,
        len(assigned),
        len(done),
        todo_rows,
    )
    settings = DecodeSettings(
        card=model.card,
        stretch=config.stretch,
        source_kind=catalog.source_kind,
        galaxy10_path=str(catalog.path) if catalog.source_kind == "galaxy10" else None,
    )
    assembler = ShardAssembler(config.out_dir, plan, todo)
    if config.engine == "local" and todo_rows:
        # The first batches would otherwise grow onnxruntime's memory arena (or, on CUDA, pick
        # kernels) inside the timed loop and skew the progress bar's rate and ETA.
        model.warm_up([config.batch_size])
    startup_seconds = time.perf_counter() - loading
    logger.info("model loaded and warmed up in %.2f s", startup_seconds)
    started = time.perf_counter()
    blocks = catalog.iter_blocks([plan.rows(k) for k in todo])
    results = _engine_results(config, model, settings, blocks, builder)
    _drive(results, assembler, todo_rows, config.progress)
    assembler.finish()
    seconds = time.perf_counter() - started
    want_merge = config.merge if config.merge is not None else config.num_shards == 1
    merged = merge(config.out_dir, fmt=config.output_format) if want_merge else None
    return ScoreSummary(
        rows_total=plan.num_rows,
        rows_scored=todo_rows,
        shards_assigned=len(assigned),
        shards_skipped=len(done),
        errors=assembler.errors,
        seconds=seconds,
        startup_seconds=startup_seconds,
        merged=merged,
    )


def _engine_results(
    config: ScoreConfig,
    model: OnnxModel,
    settings: DecodeSettings,
    blocks: Iterable[pa.Table],
    builder: ResultBuilder,
) -> Iterator[pa.Table]:
    if config.engine == "ray":
        from galmorph.scoring.ray_engine import RayEngine

        return RayEngine(
            config.model,
            settings,
            batch_size=config.batch_size,
            workers=config.workers,
            providers=config.providers,
        ).run(blocks, builder)
    engine = LocalEngine(
        model,
        settings,
        workers=config.workers,
        batch_size=config.batch_size,
        prefetch=config.prefetch,
    )
    return engine.run(blocks, builder)


def _drive(
    results: Iterable[pa.Table], assembler: ShardAssembler, total: int, progress: bool
) -> None:
    from tqdm import tqdm

    with tqdm(total=total, unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for table in results:
            assembler.add(table)
            bar.update(len(table))
