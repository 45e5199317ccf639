"""Where the time of one cutout goes: FITS parse, colour stretch, uint8 conversion, inference.

The same 256x256 grz Legacy Survey cutout, one thread, each stage timed alone (median of
repeats after warm-up, wall and CPU): galmorph.core.cutouts.fits_io.read_fits (header cards, data,
band selection), the dr2_rgb stretch, to_uint8, the whole galmorph.core.cutouts.decode.decode_cutout
for FITS and
for PNG, and the demo model's onnxruntime inference per image at batch 1 and amortised over a
batch of 32 (gm_astroformer_tiny at 256, seeded random weights). The HTTP layer's own cost is
measured by benchmarks.bench_service. Results: benchmarks/results/stages.json.

    .venv/bin/python -m benchmarks.bench_stages [--threads 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import RESULTS_DIR, Timing, write_results

SIZE = 256


def _timed(call: Callable[[], object], repeats: int, items: int = 1) -> dict[str, Any]:
    """Wall time per call (median, min, max) and the median CPU time, steadier when shared."""
    warmup = 2
    for _ in range(warmup):
        call()
    wall, cpu = [], []
    for _ in range(repeats):
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        call()
        wall.append(time.perf_counter() - start_wall)
        cpu.append(time.process_time() - start_cpu)
    figures = Timing(tuple(wall), warmup).to_dict(items_per_call=items)
    figures["cpu_median_ms"] = round(float(np.median(cpu)) * 1e3, 3)
    figures["ms_per_item"] = round(figures["median_ms"] / items, 3)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "stages.json")
    args = parser.parse_args(argv)

    from benchmarks.bench_models import (
        make_checkpoint,
        open_cpu_model,
        predict_call,
        timed_export,
    )
    from galmorph.core.cutouts.decode import DecodeLimits, decode_cutout
    from galmorph.core.cutouts.fits_io import read_fits
    from galmorph.core.cutouts.imaging import STRETCHES, flip_north_up, to_uint8
    from tests.support.cutout_factory import make_grz_fits, make_png

    with tempfile.TemporaryDirectory(prefix="galmorph-stages-") as tmp:
        run_dir = make_checkpoint("gm_astroformer_tiny", SIZE, Path(tmp) / "run")
        path, _ = timed_export(run_dir, Path(tmp) / "tiny.onnx", args.threads)
        # Sessions hold the graph in memory: the file may go once they are open.
        models = {threads: open_cpu_model(path, threads) for threads in sorted({1, args.threads})}
    model = models[1]
    fits_bytes = make_grz_fits(size=SIZE)
    png_bytes = make_png(size=(SIZE, SIZE), seed=0)

    limits = DecodeLimits()
    planes = {b: flip_north_up(p) for b, p in read_fits(fits_bytes, limits).planes.items()}
    stretch = STRETCHES["dr2_rgb"]
    rgb = stretch.render_bands(planes)
    batch = np.stack([decode_cutout(fits_bytes, spec=model.card.input_spec).image] * 32)
    stages = {
        "fits_parse": _timed(lambda: read_fits(fits_bytes, limits), args.repeats),
        "dr2_rgb_stretch": _timed(lambda: stretch.render_bands(planes), args.repeats),
        "to_uint8": _timed(lambda: to_uint8(rgb), args.repeats),
        "decode_cutout_fits": _timed(
            lambda: decode_cutout(fits_bytes, spec=model.card.input_spec), args.repeats
        ),
        "decode_cutout_png": _timed(
            lambda: decode_cutout(png_bytes, spec=model.card.input_spec), args.repeats
        ),
    }
    for threads, threaded in models.items():
        stages[f"inference_batch1_{threads}_threads"] = _timed(
            predict_call(threaded, batch[:1]), args.repeats
        )
        stages[f"inference_batch32_{threads}_threads"] = _timed(
            predict_call(threaded, batch), max(5, args.repeats // 6), items=32
        )
    for name, figures in stages.items():
        print(f"{name:32s} {figures['ms_per_item']:8.2f} ms/item (wall median)", flush=True)
    write_results(
        args.out,
        {
            "benchmark": "cost of each stage of one 256x256 grz FITS cutout",
            "model": "gm_astroformer_tiny @256, random initialisation, model.export fp32",
            "decode_threads": 1,
            "stages": stages,
        },
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
