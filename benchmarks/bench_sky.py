"""Scoring by sky position: warm cache vs files, and fetching bounded by the politeness settings.

Run from the repository root: `python -m benchmarks.bench_sky` (results to
benchmarks/results/sky.json). Everything runs in this process against tests/support/sky_stub.py, the
loopback stand-in for the Legacy Survey cutout service; the stub's FITS answers are rendered
before any clock starts, so its own work does not compete with the scorer's.

1. warm cache vs files: the same 256x256 grz FITS cutouts scored from a path catalog and from
   an ra/dec catalog whose cutouts are all in the cache (--offline: no request can be made),
   in interleaved rounds. The fetch stage then costs one stat per row; the two should be equal
   within noise. The model is the cheap onnx_factory model at 256 px, so decoding dominates and
   any overhead of the sky path would show rather than hide behind inference.
2. cold cache from the stub with injected latency: for a few politeness settings, the fetch
   stage alone (`galmorph fetch`'s path) and full scoring. Predicted fetch rate = min(rate,
   concurrency / time per request), the time per request measured by the stub (latency plus
   rendering and transfer); scoring runs at min(that, the warm-cache scoring rate), less the
   start-up while the first chunk of rows is fetched before any can be decoded. The stub's log
   checks the bounds held: requests in flight never above the concurrency, never more starts
   in a second than the rate allows.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS_DIR, write_results

RESULTS = RESULTS_DIR / "sky.json"
SIZE = 256


def _positions(n: int, ra0: float) -> list[tuple[float, float]]:
    return [(round(ra0 + 0.01 * i, 4), round(1.0 + 0.003 * i, 4)) for i in range(n)]


def _write_catalog(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _score(catalog: Path, model: Path, out: Path, sky: Any, batch_size: int) -> Any:
    from galmorph.scoring.run import ScoreConfig, score

    return score(
        ScoreConfig(
            catalog=catalog,
            model=model,
            out_dir=out,
            workers=0,  # the 2-core default (benchmarks/results/score.json)
            batch_size=batch_size,
            progress=False,
            sky=sky,
        )
    )


def _summary(rates: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(rates), 2),
        "min": round(min(rates), 2),
        "max": round(max(rates), 2),
    }


def warm_cache_vs_files(
    root: Path, model: Path, stub: Any, rows: int, rounds: int, batch_size: int
) -> dict[str, Any]:
    from galmorph.core.sky.cache import CutoutCache
    from galmorph.core.sky.client import CutoutSpec
    from galmorph.core.sky.options import CutoutOptions
    from galmorph.scoring.sky_fetch import SkyConfig
    from tests.support.sky_stub import render_fits

    sky = _positions(rows, 150.0)
    cache = CutoutCache(root / "cache")
    spec = CutoutSpec(base_url=stub.base_url, width=SIZE, height=SIZE)
    files = root / "files"
    files.mkdir()
    for i, (ra, dec) in enumerate(sky):
        data = render_fits(ra, dec, "grz", 0.262, SIZE, SIZE)
        cache.put(spec.request(ra, dec).key, spec.suffix, data)
        (files / f"c{i}.fits").write_bytes(data)
    by_path = _write_catalog(
        root / "paths.csv",
        ["id_str", "file_loc"],
        [[f"g{i}", f"files/c{i}.fits"] for i in range(rows)],
    )
    by_position = _write_catalog(
        root / "positions.csv",
        ["id_str", "ra", "dec"],
        [[f"g{i}", ra, dec] for i, (ra, dec) in enumerate(sky)],
    )
    config = SkyConfig(
        cutouts=CutoutOptions(base_url=stub.base_url), cache_dir=root / "cache", offline=True
    )
    contenders = {"files": by_path, "warm_cache": by_position}
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    runs = 0
    _score(by_position, model, root / "warmup", config, batch_size)  # imports, page cache
    for round_index in range(rounds):
        names = list(contenders)
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            runs += 1
            summary = _score(contenders[name], model, root / f"run{runs}", config, batch_size)
            assert summary.errors == {}, summary.errors
            rates[name].append(summary.images_per_second)
    ratios = [c / f for c, f in zip(rates["warm_cache"], rates["files"], strict=True)]
    return {
        "rows": rows,
        "rounds": rounds,
        "cutout": f"{SIZE}x{SIZE} grz float32 FITS",
        "rows_per_s": {name: _summary(values) for name, values in rates.items()},
        "rows_per_s_samples": {name: [round(v, 2) for v in vals] for name, vals in rates.items()},
        "warm_cache_over_files": _summary(ratios),
        "requests_made": len(stub.log),
    }


def from_stub(
    root: Path,
    model: Path,
    stub: Any,
    *,
    name: str,
    concurrency: int,
    rate: float,
    latency: float,
    rows: int,
    batch_size: int,
    score_rate: float,
    sky_offset: float,
) -> dict[str, Any]:
    from galmorph.core.sky.client import CutoutSpec
    from galmorph.core.sky.options import CutoutOptions, Politeness
    from galmorph.scoring.catalog import open_catalog
    from galmorph.scoring.sky_fetch import CHUNK_ROWS, SkyConfig, SkyStage
    from tests.support.sky_stub import max_starts_within, render_fits

    stub.latency = latency
    result: dict[str, Any] = {
        "setting": name,
        "concurrency": concurrency,
        "rate_per_s": rate,
        "latency_s": latency,
        "rows": rows,
    }
    politeness = Politeness(concurrency=concurrency, rate=rate, timeout=30.0)
    for phase, ra0 in (("fetch_only", 10.0), ("score", 40.0)):
        sky = _positions(rows, ra0 + sky_offset)
        for ra, dec in sky:
            render_fits(ra, dec, "grz", 0.262, SIZE, SIZE)  # the stub answers from memory
        folder = root / f"{name}-{phase}"
        folder.mkdir()
        catalog = _write_catalog(
            folder / "cat.csv",
            ["id_str", "ra", "dec"],
            [[f"g{i}", ra, dec] for i, (ra, dec) in enumerate(sky)],
        )
        config = SkyConfig(
            cutouts=CutoutOptions(base_url=stub.base_url),
            cache_dir=folder / "cache",
            politeness=politeness,
        )
        first = len(stub.log)
        started = time.perf_counter()
        if phase == "fetch_only":
            spec = CutoutSpec(base_url=stub.base_url, width=SIZE, height=SIZE)
            opened = open_catalog(catalog)
            stage = SkyStage(config, spec, progress=False)
            for _ in stage.resolve(opened.iter_blocks([range(rows)])):
                pass
            seconds = time.perf_counter() - started
            measured = rows / seconds
            assert stage.counts.fetched == rows, stage.counts
        else:
            summary = _score(catalog, model, folder / "out", config, batch_size)
            assert summary.errors == {}, summary.errors
            measured = summary.images_per_second
        log = stub.log[first:]
        per_request = statistics.mean(r.end - r.start for r in log)
        fetch_bound = min(rate, concurrency / per_request)
        if phase == "fetch_only":
            predicted = fetch_bound
        else:
            # Decoding overlaps fetching, except for the last chunk, decoded after its last
            # cutout arrives (all of it when the catalog is one chunk).
            steady = min(fetch_bound, score_rate)
            predicted = rows / (rows / steady + min(rows, CHUNK_ROWS) / score_rate)
        starts = sorted(r.start for r in log)
        result[phase] = {
            "rows_per_s": round(measured, 2),
            "predicted_rows_per_s": round(predicted, 2),
            "measured_over_predicted": round(measured / predicted, 3),
            "seconds_per_request_at_stub": round(per_request, 4),
            "requests": len(log),
            "max_in_flight": max(r.in_flight for r in log),
            "mean_start_rate_per_s": round((len(starts) - 1) / (starts[-1] - starts[0]), 2),
            # Server-side arrival jitter (a request delayed by a busy client core arrives
            # closer to the next one) can put one or two more into a 1 s window.
            "max_starts_in_1s": max_starts_within(log, 1.0),
        }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=192, help="rows of the warm-cache runs")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved warm-cache rounds")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    from galmorph.core.modelfile.engine import OnnxModel
    from tests.support.onnx_factory import FactoryModel, write_model
    from tests.support.sky_stub import SkyStub

    with tempfile.TemporaryDirectory() as folder, SkyStub() as stub:
        root = Path(folder)
        model = write_model(root / "model.onnx", FactoryModel(input_size=SIZE))
        warm = warm_cache_vs_files(root, model, stub, args.rows, args.rounds, args.batch_size)
        score_rate = warm["rows_per_s"]["warm_cache"]["median"]
        settings = [  # name, concurrency, rate, latency, rows (several fetch chunks each)
            ("defaults: rate-bound", 4, 4.0, 0.1, 96),
            ("concurrency-bound", 2, 50.0, 0.25, 192),
            ("higher rate, rate-bound", 8, 12.0, 0.1, 192),
        ]
        stub_runs = [
            from_stub(
                root,
                model,
                stub,
                name=name,
                concurrency=concurrency,
                rate=rate,
                latency=latency,
                rows=rows,
                batch_size=args.batch_size,
                score_rate=score_rate,
                sky_offset=100.0 * index,
            )
            for index, (name, concurrency, rate, latency, rows) in enumerate(settings)
        ]
        provider = OnnxModel(model, intra_op_threads=2).providers[0]
    path = write_results(
        args.out,
        {
            "benchmark": "sky",
            "model": f"onnx_factory model at {SIZE} px ({provider})",
            "warm_cache_vs_files": warm,
            "from_stub": stub_runs,
        },
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
