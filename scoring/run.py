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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from galmorph.core.cutouts.decode import CutoutError, resolve_stretch
from galmorph.core.sky.client import CutoutSpec
from galmorph.scoring.assembly import ShardAssembler, build_manifest
from galmorph.scoring.catalog import Catalog, CatalogOptions, DuplicateIds, open_catalog
from galmorph.scoring.decode_worker import DecodeSettings
from galmorph.scoring.local_engine import LocalEngine, default_decode_workers, default_ort_threads
from galmorph.scoring.ray_engine import RayEngine
from galmorph.scoring.rows import ResultBuilder
from galmorph.scoring.shards import (
    Manifest,
    MergeSummary,
    ShardPlan,
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
    # What runs the model (galmorph.core.modelfile.engine_choice): auto, onnxruntime,
    # openvino; None: $GALMORPH_ENGINE, else auto. With Ray the actors run onnxruntime.
    model_engine: str | None = None
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

    The stages, each a function below that can be called alone: plan (the catalog, the model,
    the output folder pinned to both, and the shards a previous run left) -> the rows to score
    (through the sky fetch for a catalog of positions) -> decode and infer (the engine: decode
    workers feeding one onnxruntime session, or Ray) -> assemble (each shard written the moment
    it is whole) -> finish (the merge and the summary).

    Decode workers are started with multiprocessing's "forkserver" method: a script calling
    this must guard its entry point with `if __name__ == "__main__":` (the `galmorph` CLI does).
    """
    check_config(config)
    catalog, duplicates = read_catalog(config)
    loading = time.perf_counter()
    model = open_model(config)
    builder = result_builder(config, catalog, model)
    run = plan_run(config, catalog, model)
    if config.engine == "local" and run.todo_rows:
        # The first batches would otherwise grow onnxruntime's memory arena (or, on CUDA, pick
        # kernels) inside the timed loop and skew the progress bar's rate and ETA.
        model.warm_up([config.batch_size])
    startup_seconds = time.perf_counter() - loading
    logger.info("model loaded and warmed up in %.2f s", startup_seconds)
    started = time.perf_counter()
    blocks, stage = rows_to_score(config, catalog, run)
    engine = make_engine(config, model, decode_settings(config, catalog, model, run.spec))
    assembler = ShardAssembler(config.out_dir, run.plan, run.todo)
    assemble(engine.run(blocks, builder), assembler, run.todo_rows, config.progress)
    return finish(
        config,
        run,
        assembler,
        duplicates=duplicates,
        fetch=stage,
        seconds=time.perf_counter() - started,
        startup_seconds=startup_seconds,
    )


def check_config(config: ScoreConfig) -> None:
    """Refuse (ValueError) what no catalog or model could make right, before opening either."""
    if config.engine not in ENGINES:
        raise ValueError(f"unknown engine {config.engine!r}; choose from {', '.join(ENGINES)}")
    if config.stretch is not None:
        try:
            resolve_stretch(config.stretch)
        except CutoutError as exc:
            raise ValueError(exc.message) from None
    if config.embeddings and config.output_format == "csv":
        raise ValueError("--embeddings needs --format parquet or fits: CSV has no list columns")


def read_catalog(config: ScoreConfig) -> tuple[Catalog, DuplicateIds]:
    """The catalog, and the ids it holds more than once (logged)."""
    catalog = open_catalog(config.catalog, config.catalog_options)
    # Kept, not refused: rows sharing an id may be different positions or files (a catalog
    # joined from two surveys); row_index tells them apart. But never without a word.
    duplicates = catalog.duplicate_ids()
    if duplicates.ids:
        logger.warning("%s", duplicates.message(Path(config.catalog).name))
    return catalog, duplicates


def open_model(config: ScoreConfig) -> OnnxModel:
    """The model, with the threads the decode workers leave; refused if it lacks what the
    config asks of it."""
    from galmorph.core.modelfile.engine_choice import open_model as open_on_engine

    ort_threads = config.ort_threads or default_ort_threads(config.workers)
    # With Ray the actors run inference; the driver only reads the card and hash.
    ray = config.engine == "ray"
    model = open_on_engine(
        config.model,
        engine="onnxruntime" if ray else config.model_engine,
        providers=["CPUExecutionProvider"] if ray else config.providers,
        intra_op_threads=ort_threads,
        inter_op_threads=1,
    )
    if config.embeddings and not model.has_embeddings:
        raise ValueError(
            f"--embeddings: {config.model} has no embeddings output (exported before galmorph "
            "wrote them): export the model again"
        )
    return model


def result_builder(config: ScoreConfig, catalog: Catalog, model: OnnxModel) -> ResultBuilder:
    """How model outputs become result rows (refuses passthrough columns that clash)."""
    return ResultBuilder(
        model.card,
        model.sha256,
        catalog.passthrough,
        ood=model.has_ood,
        embedding_size=model.embedding_size if config.embeddings else None,
    )


@dataclass(frozen=True)
class RunPlan:
    """What this task scores: the manifest its output folder is pinned to, its shards, those a
    previous run finished, and what a sky catalog's cutouts are fetched as."""

    manifest: Manifest
    assigned: range
    done: set[int]
    todo: list[int]
    todo_rows: int
    spec: CutoutSpec | None

    @property
    def plan(self) -> ShardPlan:
        return self.manifest.plan


def plan_run(config: ScoreConfig, catalog: Catalog, model: OnnxModel) -> RunPlan:
    """Pin the output folder to this catalog, model and settings (or check that it already
    is), clear a killed run's temp files, and find the shards still to score."""
    spec = None
    if catalog.source_kind == "sky":
        spec = CutoutSpec.for_input(model.card.input_spec, config.sky.cutouts)
    manifest = build_manifest(
        catalog,
        config.catalog_options,
        model.card,
        model.sha256,
        shard_size=config.shard_size,
        stretch=config.stretch,
        cutouts=spec,
        embeddings=config.embeddings,
        engine=model.engine_report(),
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
    return RunPlan(manifest, assigned, done, todo, todo_rows, spec)


def rows_to_score(
    config: ScoreConfig, catalog: Catalog, run: RunPlan
) -> tuple[Iterator[pa.Table], SkyStage | None]:
    """The catalog rows of the shards left, in order; a sky catalog's through the fetch stage
    (returned too, for its counts), which turns each position into a cached cutout."""
    blocks = catalog.iter_blocks([run.plan.rows(k) for k in run.todo])
    if run.spec is None:
        return blocks, None
    # Whole batches per chunk: the engines batch within each table they are handed.
    batches = -(-CHUNK_ROWS // config.batch_size)
    stage = SkyStage(
        config.sky,
        run.spec,
        progress=config.progress,
        total=run.todo_rows,
        progress_position=1,
        chunk_rows=batches * config.batch_size,
    )
    return stage.resolve(blocks), stage


def decode_settings(
    config: ScoreConfig, catalog: Catalog, model: OnnxModel, spec: CutoutSpec | None
) -> DecodeSettings:
    """What every decode worker needs to turn a row's source into the model's input."""
    return DecodeSettings(
        card=model.card,
        stretch=config.stretch,
        source_kind=catalog.source_kind,
        galaxy10_path=str(catalog.path) if catalog.source_kind == "galaxy10" else None,
        cutout_shape=None if spec is None else spec.expected_shape,
    )


def make_engine(
    config: ScoreConfig, model: OnnxModel, settings: DecodeSettings
) -> LocalEngine | RayEngine:
    """Decode and infer: catalog blocks in, result tables out, in catalog order."""
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


def assemble(
    results: Iterable[pa.Table], assembler: ShardAssembler, total: int, progress: bool
) -> None:
    """Feed the result tables to the assembler, which writes each shard as it fills; refuse
    (ShardError) an end that leaves a shard unfinished."""
    from tqdm import tqdm

    with tqdm(total=total, unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for table in results:
            assembler.add(table)
            bar.update(len(table))
    assembler.finish()


def finish(
    config: ScoreConfig,
    run: RunPlan,
    assembler: ShardAssembler,
    *,
    duplicates: DuplicateIds,
    fetch: SkyStage | None,
    seconds: float,
    startup_seconds: float,
) -> ScoreSummary:
    """Merge the parts when this run covers the whole catalog (or was told to), and sum up."""
    want_merge = config.merge if config.merge is not None else config.num_shards == 1
    merged = merge(config.out_dir, fmt=config.output_format) if want_merge else None
    return ScoreSummary(
        rows_total=run.plan.num_rows,
        rows_scored=run.todo_rows,
        shards_assigned=len(run.assigned),
        shards_skipped=len(run.done),
        errors=assembler.errors,
        seconds=seconds,
        startup_seconds=startup_seconds,
        merged=merged,
        cutouts=None if fetch is None else fetch.counts.to_dict(),
        duplicate_ids=duplicates,
    )
