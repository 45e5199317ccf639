"""`galmorph fetch`: put the cutouts of a catalog of sky positions into the cutout cache.

Registration and option parsing only; the cutout options here are shared with `galmorph score`
(galmorph.scoring.cli). Nothing heavy is imported at module level, so `galmorph --help` stays
instant; the work is galmorph.scoring.sky_fetch and galmorph.core.sky.client.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from galmorph.core.defaults import library_default, with_library_defaults
from galmorph.core.sky import cache
from galmorph.core.sky.options import IMAGE_FORMATS, CutoutOptions, Politeness

if TYPE_CHECKING:
    from galmorph.core.sky.client import CutoutSpec
    from galmorph.scoring.catalog import CatalogOptions
    from galmorph.scoring.sky_fetch import SkyConfig

FETCH_EPILOG = f"""\
Every ra/dec row whose cutout the cache lacks is fetched from the Legacy Survey viewer's
cutout service, politely (bounded concurrency, a per-host rate limit, retries with backoff
and jitter, Retry-After honoured), and checked (the FITS parses, with the requested shape
and bands) before it is cached. Entries already cached are read back and checked too; a
damaged one is fetched again. A killed fetch simply continues when rerun.

The request defaults come from --model (its input size and pixel scale, so the service
returns exactly the field the model sees); without --model give --size and --pixscale.
`galmorph score` with the same model and options finds the cutouts in the cache.

Compute nodes without internet (Slurm): fetch on a login node, score on the array:
  galmorph fetch catalog.csv --model model.onnx --out /shared/cutouts
  sbatch --array=0-15 ... galmorph score catalog.csv --model model.onnx \\
      --cache /shared/cutouts --offline --shard-index $SLURM_ARRAY_TASK_ID ...

The cache is size-bounded (--cache-size; least recently used entries go first) and may be
shared by several processes. Default cache folder for `score`: ${cache.CACHE_ENV}, else
~/.cache/galmorph/cutouts.

Exit status: 0 when every row has its cutout; 1 when some could not be fetched (rerun to
retry them) or have no usable ra/dec; 2 when the catalog or the options are unusable.
"""

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.I)


def _byte_size(text: str) -> int:
    """'20G', '500M', '1.5T', '4096' -> bytes (binary multiples)."""
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size like 20G or 500M: {text!r}")
    number, unit = match.groups()
    value = int(float(number) * 1024 ** " kmgt".index(unit.lower() or " "))
    if value < 1:
        raise argparse.ArgumentTypeError(f"size must be at least 1 byte, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def catalog_options() -> type[CatalogOptions]:
    """The catalog columns' defaults (imported when needed: the catalog module reads pyarrow)."""
    from galmorph.scoring.catalog import CatalogOptions

    return CatalogOptions


def _cutout_options() -> type[CutoutOptions]:
    return CutoutOptions


def _politeness() -> type[Politeness]:
    return Politeness


def add_cutout_arguments(parser: argparse.ArgumentParser) -> None:
    """Position columns, what to request, the cache bound and politeness (fetch and score)."""
    group = parser.add_argument_group(
        "cutouts by sky position (catalogs with ra/dec and no path column)"
    )
    group.add_argument(
        "--ra-col",
        default=library_default(catalog_options, "ra_col"),
        help="RA column, decimal degrees (default %(default)s)",
    )
    group.add_argument(
        "--dec-col",
        default=library_default(catalog_options, "dec_col"),
        help="Dec column, decimal degrees (default %(default)s)",
    )
    group.add_argument(
        "--layer",
        default=library_default(_cutout_options, "layer"),
        help="survey layer (default %(default)s)",
    )
    group.add_argument("--bands", default=None, help="bands to request (default: the model's)")
    group.add_argument(
        "--pixscale",
        type=_positive_float,
        default=None,
        help="arcsec per pixel to request (default: the model's pixel scale)",
    )
    group.add_argument(
        "--size",
        type=_positive_int,
        default=None,
        help="cutout side in pixels (default: the model's input size)",
    )
    group.add_argument(
        "--cutout-format",
        choices=tuple(IMAGE_FORMATS),
        default=library_default(_cutout_options, "image_format"),
        help="fits: flux cubes rendered by galmorph; jpeg: the viewer's rendering "
        "(default %(default)s)",
    )
    group.add_argument(
        "--cutout-url",
        default=library_default(_cutout_options, "base_url"),
        help="cutout service base URL, for a mirror (default %(default)s)",
    )
    group.add_argument(
        "--offline",
        action="store_true",
        help="use the cache only: no request is made; a missing cutout is a `fetch` error",
    )
    group.add_argument(
        "--cache-size",
        type=_byte_size,
        default=library_default(lambda: cache, "DEFAULT_MAX_BYTES"),
        help=f"bound on the cache, e.g. 50G (default {cache.DEFAULT_MAX_BYTES // 2**30}G)",
    )
    group.add_argument(
        "--fetch-concurrency",
        type=_positive_int,
        default=library_default(_politeness, "concurrency"),
        help="requests in flight (default %(default)s)",
    )
    group.add_argument(
        "--fetch-rate",
        type=_positive_float,
        default=library_default(_politeness, "rate"),
        help="requests per second to one host (default %(default)s)",
    )
    group.add_argument(
        "--fetch-timeout",
        type=_positive_float,
        default=library_default(_politeness, "timeout"),
        help="seconds for one attempt (default %(default)s)",
    )
    group.add_argument(
        "--fetch-attempts",
        type=_positive_int,
        default=library_default(_politeness, "attempts"),
        help="tries per cutout, with backoff between them (default %(default)s)",
    )


def sky_config(args: argparse.Namespace, cache_dir: Path | None) -> SkyConfig:
    """The SkyConfig the cutout arguments describe; `cache_dir` None: the default folder."""
    from dataclasses import replace

    from galmorph.scoring.sky_fetch import SkyConfig

    return SkyConfig(
        cutouts=CutoutOptions(
            base_url=args.cutout_url,
            layer=args.layer,
            bands=args.bands,
            pixscale=args.pixscale,
            size=args.size,
            image_format=args.cutout_format,
        ),
        cache_dir=cache_dir,
        cache_max_bytes=args.cache_size,
        offline=args.offline,
        politeness=replace(
            Politeness(),
            concurrency=args.fetch_concurrency,
            rate=args.fetch_rate,
            timeout=args.fetch_timeout,
            attempts=args.fetch_attempts,
        ),
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    fetch = subparsers.add_parser(
        "fetch",
        help="fetch the cutouts of a catalog of sky positions into the cutout cache",
        description="Prefetch a cutout for every ra/dec row of a catalog into a cache folder.",
        epilog=FETCH_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    fetch.add_argument("catalog", help="CSV/ECSV/FITS table/VOTable/Parquet with ra, dec columns")
    fetch.add_argument("--out", required=True, type=Path, help="the cutout cache folder")
    fetch.add_argument(
        "--model",
        type=Path,
        default=None,
        help="galmorph ONNX model whose input size, pixel scale and bands the requests match",
    )
    fetch.add_argument(
        "--id-col",
        default=library_default(catalog_options, "id_col"),
        help="catalog id column (default %(default)s)",
    )
    add_cutout_arguments(fetch)
    fetch.add_argument("--quiet", action="store_true", help="no progress bar")
    fetch.set_defaults(func=run_fetch)


def _spec(args: argparse.Namespace, config: SkyConfig) -> CutoutSpec:
    from galmorph.core.modelfile.engine import OnnxModel
    from galmorph.core.sky.client import CutoutSpec

    if args.model is not None:
        card = OnnxModel(args.model, providers=["CPUExecutionProvider"], intra_op_threads=1).card
        return CutoutSpec.for_input(card.input_spec, config.cutouts)
    if args.size is None or args.pixscale is None:
        raise ValueError("give --model, or --size and --pixscale, to say what to request")
    options = config.cutouts
    return CutoutSpec(
        base_url=options.base_url,
        layer=options.layer,
        pixscale=args.pixscale,
        width=args.size,
        height=args.size,
        image_format=options.image_format,
        **({} if options.bands is None else {"bands": options.bands}),
    )


@with_library_defaults
def run_fetch(args: argparse.Namespace) -> int:
    from galmorph.core.modelfile.engine import ModelLoadError
    from galmorph.scoring.catalog import CatalogError, CatalogOptions, open_catalog
    from galmorph.scoring.sky_fetch import SkyStage

    config = sky_config(args, args.out)
    options = CatalogOptions(id_col=args.id_col, ra_col=args.ra_col, dec_col=args.dec_col)
    try:
        catalog = open_catalog(args.catalog, options)
        if catalog.source_kind != "sky":
            raise CatalogError(
                f"{args.catalog}: its rows name cutout files ({options.path_col}); "
                "there is nothing to fetch"
            )
        spec = _spec(args, config)
    except (CatalogError, ModelLoadError, ValueError) as exc:
        print(f"galmorph fetch: {exc}", file=sys.stderr)
        return 2
    stage = SkyStage(
        config, spec, progress=not args.quiet, total=catalog.num_rows, verify_cached=True
    )
    started = time.perf_counter()
    for _ in stage.resolve(catalog.iter_blocks([range(catalog.num_rows)])):
        pass
    seconds = time.perf_counter() - started
    summary = {
        "rows": catalog.num_rows,
        **stage.counts.to_dict(),
        "seconds": round(seconds, 3),
        "cache": str(config.cache().root),
        "request": spec.to_dict(),
    }
    print(json.dumps(summary, indent=2))
    return 1 if stage.counts.failed or stage.counts.bad_positions else 0
