"""`galmorph score` and `galmorph merge`: batch scoring of catalogs, sharded and resumable.

Registration only; the work lives in galmorph.scoring.run (score) and galmorph.scoring.shards
(merge), imported by the handlers so `galmorph --help` stays instant.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from galmorph.core.defaults import library_default, with_library_defaults
from galmorph.scoring.fetch_cli import add_cutout_arguments, catalog_options, sky_config

if TYPE_CHECKING:
    from galmorph.scoring.run import ScoreConfig

logger = logging.getLogger(__name__)

SCORE_EPILOG = """\
Catalog: CSV/ECSV/FITS table/VOTable/Parquet with id and cutout-path columns (relative paths
resolve against the catalog's folder), a Galaxy10-layout .h5 (every image; id = row number),
or a folder or quoted glob of FITS/PNG/JPEG cutouts.

A table without a path column but with ra/dec (decimal degrees) is scored from the Legacy
Survey cutout service: cutouts missing from the cache (--cache) are fetched first, at the
model's input size and pixel scale; a cutout that cannot be had becomes an error row
`fetch: ...` with the HTTP status. `galmorph fetch` fills the cache ahead (login nodes);
--offline then scores from the cache alone.

Output: OUT_DIR/part-NNNNN.parquet per shard (written atomically), manifest.json, and when
the whole catalog is done, OUT_DIR/scores.<format>. A rerun skips finished shards; a rerun
with another model or catalog is refused. Bad or missing cutouts, and ra/dec cells that are
not degrees, become rows with `error`; rows sharing an id are all kept, with a warning.

Slurm job array: --shard-index $SLURM_ARRAY_TASK_ID --num-shards $SLURM_ARRAY_TASK_COUNT,
then `galmorph merge OUT_DIR` once all tasks finished (scripts/slurm/score_array.sbatch).
"""


def _columns(text: str) -> tuple[str, ...]:
    return tuple(c.strip() for c in text.split(",") if c.strip())


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _score_config() -> type[ScoreConfig]:
    from galmorph.scoring.run import ScoreConfig

    return ScoreConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    score = subparsers.add_parser(
        "score",
        help="score a catalog of cutouts with an ONNX model (sharded, resumable)",
        description="Classify every row of a catalog; one output row per input row.",
        epilog=SCORE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_catalog_arguments(score)
    _add_shard_arguments(score)
    _add_engine_arguments(score)
    add_cutout_arguments(score)
    score.add_argument("--quiet", action="store_true", help="no progress bar")
    score.set_defaults(func=run_score)
    _register_merge(subparsers)


def _add_catalog_arguments(score: argparse.ArgumentParser) -> None:
    """What to score, with what, into where, and which catalog columns."""
    score.add_argument("catalog", help="catalog file, Galaxy10 .h5, folder or glob of cutouts")
    score.add_argument("--model", required=True, type=Path, help="galmorph ONNX model")
    score.add_argument("--out", required=True, type=Path, help="output folder (parts, manifest)")
    score.add_argument(
        "--format",
        choices=("parquet", "csv", "fits"),
        default=library_default(_score_config, "output_format"),
        help="format of the merged output (parts are always Parquet; default %(default)s)",
    )
    score.add_argument(
        "--id-col",
        default=library_default(catalog_options, "id_col"),
        help="catalog id column (default %(default)s)",
    )
    score.add_argument(
        "--path-col",
        default=library_default(catalog_options, "path_col"),
        help="catalog cutout-path column (default %(default)s)",
    )
    score.add_argument(
        "--passthrough",
        type=_columns,
        default=library_default(catalog_options, "passthrough"),
        metavar="COL,COL",
        help="extra catalog columns to copy to the output (ra, dec are copied when present)",
    )


def _add_shard_arguments(score: argparse.ArgumentParser) -> None:
    """How the catalog is cut into shards and batches, and how many processes work."""
    score.add_argument(
        "--shard-size",
        type=_positive,
        default=library_default(_score_config, "shard_size"),
        help="rows per part file (default %(default)s)",
    )
    score.add_argument(
        "--shard-index",
        type=_non_negative,
        default=library_default(_score_config, "shard_index"),
        help="this task's index (Slurm array; default %(default)s)",
    )
    score.add_argument(
        "--num-shards",
        type=_positive,
        default=library_default(_score_config, "num_shards"),
        help="number of tasks sharing the catalog; each scores a contiguous range of shards",
    )
    score.add_argument(
        "--workers",
        type=_non_negative,
        default=None,
        help="decode worker processes (0: decode in the main process between batches; "
        "default: CPU cores minus 2, so onnxruntime keeps 2)",
    )
    score.add_argument(
        "--batch-size",
        type=_positive,
        default=library_default(_score_config, "batch_size"),
        help="inference batch size (default %(default)s)",
    )
    score.add_argument(
        "--ort-threads",
        type=_positive,
        default=None,
        help="onnxruntime intra-op threads (default: CPU cores minus decode workers)",
    )


def _add_engine_arguments(score: argparse.ArgumentParser) -> None:
    """What runs the model, what the output holds, and where cutouts are cached."""
    score.add_argument(
        "--engine",
        choices=("local", "ray"),
        default=library_default(_score_config, "engine"),
        help="local: process pool + one session; ray: Ray Data actor pool (pip extra 'ray'); "
        "default %(default)s",
    )
    score.add_argument(
        "--model-engine",
        # engine_choice.ENGINES (test_engine_choice.py): registration imports no onnxruntime
        choices=("auto", "onnxruntime", "openvino"),
        help="what runs the model (the server's --engine; default $GALMORPH_ENGINE, else auto): "
        "auto picks openvino bf16 on a CPU-only host with bf16 units and the openvino package "
        "(galmorph[cpu]), else onnxruntime; with --engine ray, onnxruntime",
    )
    score.add_argument(
        "--providers",
        type=_columns,
        default=None,
        metavar="NAME,NAME",
        help="onnxruntime providers in order, e.g. CPUExecutionProvider "
        "(default: CUDA if this onnxruntime build has it, then CPU)",
    )
    score.add_argument(
        "--allow-cpu-fallback",
        action="store_true",
        help="score on the CPU when CUDA fails to start on a host with an NVIDIA driver "
        "(default: refuse, exit 2; --providers CPUExecutionProvider chooses the CPU outright)",
    )
    score.add_argument("--stretch", default=None, help="colour stretch (default: the model's)")
    score.add_argument(
        "--embeddings",
        action="store_true",
        help="also write each row's embeddings (the model's pre-logit representation) as the "
        "column `embeddings`, a fixed-size list of float32 (docs/scoring.md)",
    )
    score.add_argument(
        "--no-merge",
        action="store_true",
        help="do not merge at the end even when this run covers the whole catalog",
    )
    score.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="cutout cache folder for ra/dec catalogs (default: $GALMORPH_CUTOUT_CACHE, "
        "else ~/.cache/galmorph/cutouts)",
    )


def _register_merge(subparsers: argparse._SubParsersAction) -> None:
    merge = subparsers.add_parser(
        "merge",
        help="combine a scoring run's parts into one file, checking every row appears once",
        description="Combine OUT_DIR/part-*.parquet in input order; fails naming any missing, "
        "damaged or foreign part.",
    )
    merge.add_argument("out_dir", type=Path, help="the folder given to `galmorph score --out`")
    merge.add_argument(
        "--out",
        type=Path,
        default=None,
        help="merged file (.parquet, .csv or .fits; default OUT_DIR/scores.parquet)",
    )
    merge.set_defaults(func=run_merge)


@with_library_defaults
def run_score(args: argparse.Namespace) -> int:
    from galmorph.core.modelfile.engine import (
        CpuFallbackError,
        GpuPolicy,
        ModelLoadError,
        probe_placement,
    )
    from galmorph.scoring.catalog import CatalogError, CatalogOptions
    from galmorph.scoring.run import ScoreConfig, score
    from galmorph.scoring.shards import ShardError

    # Before the catalog is read: a GPU host whose CUDA does not start must not spend hours
    # scoring on the CPU unasked.
    try:
        GpuPolicy(allow_cpu_fallback=args.allow_cpu_fallback).check(probe_placement(args.providers))
    except (CpuFallbackError, ModelLoadError) as exc:
        print(f"galmorph score: {exc}", file=sys.stderr)
        return 2
    config = ScoreConfig(
        catalog=args.catalog,
        model=args.model,
        out_dir=args.out,
        output_format=args.format,
        catalog_options=CatalogOptions(
            id_col=args.id_col,
            path_col=args.path_col,
            ra_col=args.ra_col,
            dec_col=args.dec_col,
            passthrough=args.passthrough,
        ),
        shard_size=args.shard_size,
        shard_index=args.shard_index,
        num_shards=args.num_shards,
        **({} if args.workers is None else {"workers": args.workers}),
        batch_size=args.batch_size,
        ort_threads=args.ort_threads,
        providers=args.providers,
        stretch=args.stretch,
        embeddings=args.embeddings,
        engine=args.engine,
        model_engine=args.model_engine,
        progress=not args.quiet,
        merge=False if args.no_merge else None,
        sky=sky_config(args, args.cache),
    )
    try:
        summary = score(config)
    except (CatalogError, ShardError, ModelLoadError, ValueError) as exc:
        print(f"galmorph score: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary.to_dict(), indent=2))
    if summary.errors:
        logger.warning("%d rows have errors: %s", sum(summary.errors.values()), summary.errors)
    return 0


def run_merge(args: argparse.Namespace) -> int:
    from galmorph.scoring.shards import ShardError, merge

    try:
        result = merge(args.out_dir, args.out)
    except (ShardError, ValueError) as exc:
        print(f"galmorph merge: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"path": str(result.path), "rows": result.rows, "errors": result.errors}))
    return 0
