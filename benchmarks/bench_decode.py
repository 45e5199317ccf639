"""Decode cost per cutout (ms) for the formats the server and scorer see.

Each case decodes the same bytes repeatedly in one thread and reports the median and p90 of
per-call wall and CPU times, for a 256x256 model: grz FITS (plain, gzip, fpack), 0.131"/px FITS
(resampled), single-band HST .fits.gz, Galaxy10 PNG and JPEG. Results go to
benchmarks/results/decode.json.

    .venv/bin/python -m benchmarks.bench_decode [--repeats 50]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from benchmarks.common import REAL_DATA, RESULTS_DIR

RESULTS = RESULTS_DIR / "decode.json"


def time_calls(call: Callable[[], object], repeats: int) -> dict[str, float]:
    """Wall and CPU (process) time per call; CPU time is the steadier figure on a shared box."""
    call()  # warm caches (imports, astropy's header parser)
    wall, cpu = [], []
    for _ in range(repeats):
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        call()
        wall.append((time.perf_counter() - start_wall) * 1000.0)
        cpu.append((time.process_time() - start_cpu) * 1000.0)
    wall.sort()
    return {
        "median_ms": round(statistics.median(wall), 3),
        "p90_ms": round(wall[int(0.9 * (len(wall) - 1))], 3),
        "cpu_median_ms": round(statistics.median(cpu), 3),
        "repeats": repeats,
    }


def cases() -> dict[str, bytes]:
    from tests.support.cutout_factory import make_grz_fits

    hst = REAL_DATA / "hst-fits" / "abell_2744_cd_galaxy_f105w.fits.gz"
    galaxy10 = REAL_DATA / "galaxy10-real"
    return {
        "grz_fits_256": make_grz_fits(size=256),
        "grz_fits_gz_256": make_grz_fits(size=256, gz=True),
        "grz_fits_fz_256": make_grz_fits(size=256, fpack=True),
        "griz_fits_256": make_grz_fits(size=256, bands="griz"),
        "grz_fits_0.131_512_resampled": make_grz_fits(size=512, pixel_scale=0.131),
        "hst_single_band_fits_gz_400": hst.read_bytes(),
        "png_256": (galaxy10 / "class5_Barred_Spiral.png").read_bytes(),
        "jpeg_256": (galaxy10 / "sample_6_Barred_Spiral.jpg").read_bytes(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50, help="timed calls per case")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON results file")
    args = parser.parse_args(argv)

    from galmorph.core.cutouts.decode import decode_cutout
    from galmorph.core.inputspec import InputSpec

    spec = InputSpec(input_size=(256, 256))
    results = {}
    for name, data in cases().items():
        timing = time_calls(partial(decode_cutout, data, spec=spec), args.repeats)
        results[name] = {"bytes": len(data), **timing}
        print(
            f"{name:30s} wall {timing['median_ms']:7.2f} ms (p90 {timing['p90_ms']:.2f})"
            f"  cpu {timing['cpu_median_ms']:7.2f} ms"
        )
    report = {
        "what": "decode_cutout wall and CPU time per cutout, one thread, model input 256x256",
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
