"""`galmorph index build|add` and `galmorph similar`: similarity search over scored catalogs.

Registration only; the work lives in galmorph.similarity.index, imported by the handlers so
`galmorph --help` stays instant.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

SIMILAR_EPILOG = """\
The query is one of: --id ID (a galaxy of the index), CUTOUT_FILE (a FITS/PNG/JPEG cutout,
embedded by the index's model: the path in its manifest, or --model, whose SHA-256 must be the
index's), --ra/--dec (the indexed galaxy nearest that position, within --radius), or
--outliers (the most isolated galaxies, or the highest OOD scores with --by ood).

Output columns: rank, id_str, distance (cosine distance, 0 = same direction; `isolation` for
--outliers), pred_label, pred_prob, in_distribution, ood_score, ra, dec. CSV on stdout unless
--out; Parquet needs --out.
"""


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    index = subparsers.add_parser(
        "index",
        help="build or extend a similarity index over scored catalogs' embeddings",
        description="A similarity index (usearch HNSW, cosine) over the `embeddings` column of "
        "`galmorph score --embeddings` output (docs/similarity.md).",
    )
    actions = index.add_subparsers(dest="index_command", metavar="ACTION", required=True)
    build = actions.add_parser("build", help="a new index from scored parts or files")
    build.add_argument("scores", nargs="+", type=Path, help="scoring output folder or .parquet")
    build.add_argument("--out", required=True, type=Path, help="index folder to create")
    build.add_argument(
        "--model",
        type=Path,
        help="the ONNX model that scored them, kept so cutout queries need no --model "
        "(its SHA-256 must be the scores')",
    )
    build.add_argument("--threads", type=int, default=0, help="build threads (0: all cores)")
    build.set_defaults(func=_build)
    add = actions.add_parser("add", help="add new scored parts (same model) to an index")
    add.add_argument("index", type=Path, help="index folder")
    add.add_argument("scores", nargs="+", type=Path, help="scoring output folder or .parquet")
    add.add_argument("--threads", type=int, default=0, help="build threads (0: all cores)")
    add.set_defaults(func=_add)

    similar = subparsers.add_parser(
        "similar",
        help="the galaxies of an index most like a given one, or its outliers",
        description="Nearest neighbours in a similarity index (`galmorph index build`).",
        epilog=SIMILAR_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    similar.add_argument("index", type=Path, help="index folder")
    similar.add_argument("cutout", nargs="?", type=Path, help="a cutout file to query with")
    similar.add_argument("--id", help="query with this galaxy of the index (its id_str)")
    similar.add_argument("--ra", type=float, help="query with the galaxy at this position (deg)")
    similar.add_argument("--dec", type=float, help="with --ra (deg)")
    similar.add_argument(
        "--radius", type=float, default=1.0, help="arcsec for --ra/--dec (default 1)"
    )
    similar.add_argument("-k", type=_positive, default=20, help="neighbours (default 20)")
    similar.add_argument("--class", dest="label", help="only neighbours of this top class")
    similar.add_argument(
        "--in-dist", action="store_true", help="only neighbours flagged in distribution"
    )
    similar.add_argument("--outliers", action="store_true", help="list the most isolated galaxies")
    similar.add_argument("-n", type=_positive, default=100, help="outliers to list (default 100)")
    similar.add_argument(
        "--by",
        choices=("isolation", "ood"),
        default="isolation",
        help="outliers by isolation (mean distance to the k=10 nearest) or OOD score",
    )
    similar.add_argument("--model", type=Path, help="model for CUTOUT (default: the manifest's)")
    similar.add_argument("--format", choices=("csv", "parquet", "json"), default="csv")
    similar.add_argument("--out", type=Path, help="output file (default: stdout)")
    similar.set_defaults(func=_similar)


def _fail(command: str, message: object) -> int:
    print(f"galmorph {command}: {message}", file=sys.stderr)
    return 2


def _build(args: argparse.Namespace) -> int:
    from galmorph.similarity.index import SimilarityError, build_index, describe

    try:
        if args.model is not None and not args.model.exists():
            raise SimilarityError(f"--model {args.model} does not exist")
        manifest = build_index(args.scores, args.out, model_path=args.model, threads=args.threads)
    except (SimilarityError, OSError) as exc:
        return _fail("index build", exc)
    print(json.dumps(describe(manifest)))
    return 0


def _add(args: argparse.Namespace) -> int:
    from galmorph.similarity.index import SimilarityError, add_to_index, describe

    try:
        manifest = add_to_index(args.index, args.scores, threads=args.threads)
    except (SimilarityError, OSError) as exc:
        return _fail("index add", exc)
    print(json.dumps(describe(manifest)))
    return 0


def _query_count(args: argparse.Namespace) -> int:
    given = [args.id is not None, args.cutout is not None, args.ra is not None, args.outliers]
    if (args.ra is None) != (args.dec is None):
        raise ValueError("--ra and --dec go together")
    return sum(given)


def _embed(path: Path, model_path: Path, index_sha: str) -> np.ndarray:
    """The cutout's embeddings by the index's model, decoded as the server decodes uploads."""
    from galmorph.core.cutouts.decode import decode_path
    from galmorph.core.modelfile.engine import OnnxModel
    from galmorph.similarity.index import SimilarityError

    model = OnnxModel(model_path, providers=["CPUExecutionProvider"])
    if model.sha256 != index_sha:
        raise SimilarityError(
            f"model {model_path} (sha256 {model.sha256[:12]}) is not the index's model "
            f"(sha256 {index_sha[:12]}): its embeddings are not comparable"
        )
    if not model.has_embeddings:
        raise SimilarityError(f"model {model_path} has no embeddings output")
    decoded = decode_path(path, spec=model.card.input_spec)
    outputs = model.run(decoded.image[None])
    assert outputs.embeddings is not None  # has_embeddings
    return outputs.embeddings[0]


def _similar(args: argparse.Namespace) -> int:
    from galmorph.core.cutouts.limits import CutoutError
    from galmorph.core.modelfile.engine import ModelLoadError
    from galmorph.similarity.index import SimilarityError, SimilarityIndex

    try:
        if _query_count(args) != 1:
            raise ValueError("give exactly one query: --id, CUTOUT_FILE, --ra/--dec or --outliers")
        if args.format == "parquet" and args.out is None:
            raise ValueError("--format parquet needs --out FILE")
        index = SimilarityIndex(args.index)
        if args.outliers:
            table = index.outliers(args.n, by=args.by)
        else:
            exclude = None
            if args.cutout is not None:
                model_path = args.model or index.manifest.model_path
                if model_path is None:
                    raise ValueError("the index names no model: give --model")
                vector = _embed(args.cutout, Path(model_path), index.model_sha256)
            else:
                if args.id is not None:
                    exclude = index.key_of_id(args.id)
                else:
                    exclude = index.key_at(args.ra, args.dec, args.radius)
                vector = index.vector(exclude)
            table = index.search(
                vector, args.k, label=args.label, in_distribution=args.in_dist, exclude=exclude
            )
    except (SimilarityError, CutoutError, ModelLoadError, ValueError, OSError) as exc:
        return _fail("similar", exc)
    _write(table, args.format, args.out)
    return 0


def _plain(value: Any) -> Any:
    """JSON has no NaN: a missing figure is null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _write(table: pa.Table, fmt: str, out: Path | None) -> None:
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    from galmorph.core.files import atomic_write

    if fmt == "parquet":
        assert out is not None
        with atomic_write(out) as temp:
            pq.write_table(table, temp)
        return
    if fmt == "json":
        rows = [{key: _plain(v) for key, v in row.items()} for row in table.to_pylist()]
        text = json.dumps(rows, indent=1) + "\n"
    else:
        sink = pa.BufferOutputStream()
        pcsv.write_csv(table, sink)
        text = sink.getvalue().to_pybytes().decode()
    if out is None:
        sys.stdout.write(text)
    else:
        with atomic_write(out) as temp:
            temp.write_text(text)
