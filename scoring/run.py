"""Batch scoring of a catalog: the run driver behind `galmorph score`.

score() opens the catalog and the model, pins the output folder to them (the manifest), skips
shards a previous run finished, and feeds the rest through an engine: local
(galmorph.scoring.local_engine: a decode process pool + one onnxruntime session) or ray
(galmorph.scoring.ray_engine). Both turn catalog blocks into result rows
(galmorph.scoring.rows) in catalog order; galmorph.scoring.assembly writes each shard
atomically as soon as it is complete. A full run then merges the parts.

A bad or missing cutout becomes a row whose `error` says why ("kind: message",
galmorph.scoring.decode_worker); it never stops the run.

Sky catalogs (ra/dec, no path column) go through the fetch stage first
(galmorph.scoring.sky_fetch): cutouts the cache lacks are fetched in this process, at the
model card's size and pixel scale unless `sky.cutouts` says otherwise; a cutout that cannot be
had becomes a `fetch` error row.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from galmorph.core.cutouts.decode import CutoutError, resolve_stretch
from galmorph.core.sky.client import CutoutSpec
from galmorph.scoring.assembly import ShardAssembler, build_manifest
from galmorph.scoring.catalog import CatalogOptions, DuplicateIds, open_catalog
from galmorph.scoring.decode_worker import DecodeSettings
from galmorph.scoring.local_engine import LocalEngine, default_decode_workers, default_ort_threads
from galmorph.scoring.ray_engine import RayEngine
from galmorph.scoring.rows import ResultBuilder
from galmorph.scoring.shards import (
    MergeSummary,
    claim_output,
    finished_shards,
    merge,
    remove_stale_temps,
)
from galmorph.scoring.sky_fetch import CHUNK_ROWS, SkyConfig, SkyStage

if TYPE_CHECKING:
    from galmorph.core.modelfile.engine import OnnxModel

logger = logging.getLogger(__name__)

ENGINES = ("local", "ray")
DEFAULT_SHARD_SIZE = 10_000


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
    workers: int = field(default_factory=default_decode_workers)
    batch_size: int = 32
    ort_threads: int | None = None  # onnxruntime intra-op threads; None: cores left by workers
    providers: tuple[str, ...] | None = None  # onnxruntime providers in order; None: CUDA, CPU
    prefetch: int = 0  # batches in flight; 0: 2 + workers
    stretch: str | None = None  # None: the stretch recorded in the model
    embeddings: bool = False  # write each row's embeddings (the model must have them)
    engine: str = "local"
    progress: bool = True
    merge: bool | None = None  # None: merge when this run covers the whole catalog
    sky: SkyConfig = field(default_factory=SkyConfig)  # catalogs of positions: fetch + cache


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
    cutouts: dict[str, Any] | None = None  # sky catalogs: rows cached / fetched / failed
    duplicate_ids: DuplicateIds = field(default_factory=DuplicateIds)  # in the whole catalog

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
        if self.duplicate_ids.ids:
            out["duplicate_ids"] = self.duplicate_ids.to_dict()
        if self.cutouts is not None:
            out["cutouts"] = self.cutouts
        if self.merged is not None:
            out["merged"] = {
                "path": str(self.merged.path),
                "rows": self.merged.rows,
                "errors": self.merged.errors,
            }
        return out


def score(config: ScoreConfig) -> ScoreSummary:
    """Score the shards assigned to this task; merge when the whole catalog is done.

    Decode workers are started with multiprocessing's "forkserver" method: a script calling
    this must guard its entry point with `if __name__ == "__main__":` (the `galmorph` CLI does).
    """
    from galmorph.core.modelfile.engine import OnnxModel

    if config.engine not in ENGINES:
        raise ValueError(f"unknown engine {config.engine!r}; choose from {', '.join(ENGINES)}")
    if config.stretch is not None:
        try:
            resolve_stretch(config.stretch)
        except CutoutError as exc:
            raise ValueError(exc.message) from None
    catalog = open_catalog(config.catalog, config.catalog_options)
    # Kept, not refused: rows sharing an id may be different positions or files (a catalog
    # joined from two surveys); row_index tells them apart. But never without a word.
    duplicates = catalog.duplicate_ids()
    if duplicates.ids:
        logger.warning("%s", duplicates.message(Path(config.catalog).name))
    ort_threads = config.ort_threads or default_ort_threads(config.workers)
    loading = time.perf_counter()
    # With Ray the actors run inference; the driver only reads the card and hash.
    providers = ["CPUExecutionProvider"] if config.engine == "ray" else config.providers
    model = OnnxModel(
        config.model, providers=providers, intra_op_threads=ort_threads, inter_op_threads=1
    )
    if config.embeddings and config.output_format == "csv":
        raise ValueError("--embeddings needs --format parquet or fits: CSV has no list columns")
    if config.embeddings and not model.has_embeddings:
        raise ValueError(
            f"--embeddings: {config.model} has no embeddings output (exported before galmorph "
            "wrote them): export the model again"
        )
    builder = ResultBuilder(
        model.card,
        model.sha256,
        catalog.passthrough,
        ood=model.has_ood,
        embedding_size=model.embedding_size if config.embeddings else None,
    )
    spec = None
    if catalog.source_kind == "sky":
        spec = CutoutSpec.for_card(model.card, config.sky.cutouts)
    manifest = build_manifest(
        catalog,
        config.catalog_options,
        model.card,
        model.sha256,
        shard_size=config.shard_size,
        stretch=config.stretch,
        cutouts=spec,
        embeddings=config.embeddings,
    )
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
        cutout_shape=None if spec is None else spec.expected_shape,
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
    stage = None
    if spec is not None:
        # Whole batches per chunk: the engines batch within each table they are handed.
        batches = -(-CHUNK_ROWS // config.batch_size)
        stage = SkyStage(
            config.sky,
            spec,
            progress=config.progress,
            total=todo_rows,
            progress_position=1,
            chunk_rows=batches * config.batch_size,
        )
        blocks = stage.resolve(blocks)
    results = _make_engine(config, model, settings).run(blocks, builder)
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
        cutouts=None if stage is None else stage.counts.to_dict(),
        duplicate_ids=duplicates,
    )


def _make_engine(
    config: ScoreConfig, model: OnnxModel, settings: DecodeSettings
) -> LocalEngine | RayEngine:
    if config.engine == "ray":
        return RayEngine(
            config.model,
            settings,
            batch_size=config.batch_size,
            workers=config.workers,
            providers=config.providers,
        )
    return LocalEngine(
        model,
        settings,
        workers=config.workers,
        batch_size=config.batch_size,
        prefetch=config.prefetch,
    )


def _drive(
    results: Iterable[pa.Table], assembler: ShardAssembler, total: int, progress: bool
) -> None:
    from tqdm import tqdm

    with tqdm(total=total, unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for table in results:
            assembler.add(table)
            bar.update(len(table))
