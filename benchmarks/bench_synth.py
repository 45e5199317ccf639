"""Synthetic Galaxy10 throughput (images/s) at 64, 128 and 256 px.

Two measurements per size: rendering alone in one process (wall and CPU time, the steadier
figure on a shared machine), and the whole `synthesize` call writing an HDF5 file with 1 and 2
worker processes. Results go to benchmarks/results/synth.json.

    .venv/bin/python -m benchmarks.bench_synth [--n 400]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks" / "results" / "synth.json"
SIZES = (64, 128, 256)


def render_rate(size: int, n: int) -> dict[str, float]:
    from galmorph.training.synth import render_galaxy

    render_galaxy(0, size, np.random.default_rng(0))  # warm the PSF and grid caches
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    for index in range(n):
        render_galaxy(index % 10, size, np.random.default_rng([1, index]))
    wall, cpu = time.perf_counter() - start_wall, time.process_time() - start_cpu
    return {"images_per_s_wall": round(n / wall, 1), "images_per_s_cpu": round(n / cpu, 1)}


def file_rate(size: int, n: int, workers: int) -> float:
    from galmorph.training.synth import synthesize

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        synthesize(Path(tmp) / "s.h5", n=n, size=size, seed=0, num_workers=workers, progress=False)
        return round(n / (time.perf_counter() - start), 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=400, help="images per measurement at 64 px")
    args = parser.parse_args(argv)
    results: dict[str, object] = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "numpy": np.__version__,
            "platform": platform.platform(),
        },
        "sizes": {},
    }
    for size in SIZES:
        n = max(40, args.n * 64 * 64 // (size * size))  # similar pixel counts per size
        entry = {
            "images": n,
            "render_one_process": render_rate(size, n),
            "synthesize_1_worker_images_per_s": file_rate(size, n, 1),
            "synthesize_2_workers_images_per_s": file_rate(size, n, 2),
        }
        results["sizes"][str(size)] = entry  # type: ignore[index]
        print(size, json.dumps(entry))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT))
    sys.exit(main())
