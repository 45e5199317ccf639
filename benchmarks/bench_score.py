"""Batch-scoring throughput vs raw onnxruntime, and peak memory vs catalog length.

Run from the repository root: `python -m benchmarks.bench_score` (results to
benchmarks/results/score.json). What is measured:

1. raw: OnnxModel.predict on ready uint8 batches (no decode, no I/O), same threads as the
   scoring run (all the cores: 2 here), after two untimed runs that grow its memory arena.
2. scoring: `galmorph score` end to end in a fresh process (catalog read, decode + stretch,
   inference, Parquet parts) on catalogs of 256x256 Legacy Survey grz FITS cutouts and of
   256x256 PNGs, with the default split of the cores (on 2 cores: decode between batches,
   onnxruntime on both cores). Its images/s exclude opening and warming the model up, which
   the summary reports separately (`startup_seconds`).
   The machine is shared: raw throughput drifts by 10-20 % within minutes and differs between
   processes, so each format runs `--rounds` fresh processes that each time raw onnxruntime,
   score, and time raw again; a round's fraction is scoring images/s over the mean of its two
   raw figures, and the headline is the median round.
   One decode worker beside onnxruntime's two threads is run once per format for comparison.
3. memory: peak RSS of the scoring process and of its decode workers (separate processes, run
   fresh) for catalogs of 2k and 8k rows; flat means the catalog and output are streamed.

Model: gm_astroformer_tiny exported through model/export.py (seeded random weights: the cost,
not the accuracy, matters here). The memory runs use the cheap onnx_factory model at 256 px so
that 8k rows finish quickly; memory flatness is a property of the pipeline, not the model.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "score.json"
UNIQUE_CUTOUTS = 32  # files on disk; catalog rows cycle through them (decode runs every row)


def export_tiny_model(folder: Path) -> tuple[Path, str]:
    """gm_astroformer_tiny with seeded weights, exported with the project's exporter."""
    import torch

    from galmorph.core.modelfile.contract import GALAXY10_CLASS_NAMES
    from galmorph.model.checkpoint import ModelSpec, save_model
    from galmorph.model.export import export_onnx
    from galmorph.model.registry import create_model

    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = create_model("gm_astroformer_tiny", num_classes=10, img_size=256).eval()
    spec = ModelSpec(
        name="gm_astroformer_tiny",
        num_classes=10,
        img_size=256,
        class_names=tuple(GALAXY10_CLASS_NAMES),
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
    )
    save_model(folder / "run", model, spec)
    path = export_onnx(folder / "run", folder / "tiny.onnx", intra_op_threads=2)
    return path, "gm_astroformer_tiny (model/export.py, seeded random weights)"


def make_catalog(folder: Path, kind: str, rows: int) -> Path:
    from tests.support.cutout_factory import make_grz_fits, make_png

    cutouts = folder / f"cutouts_{kind}"
    if not cutouts.exists():
        cutouts.mkdir()
        for i in range(UNIQUE_CUTOUTS):
            if kind == "fits":
                make_grz_fits(cutouts, size=256, seed=i, name=f"c{i}.fits")
            else:
                make_png(cutouts, size=(256, 256), seed=i, name=f"c{i}.png")
    path = folder / f"catalog_{kind}_{rows}.csv"
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id_str", "file_loc", "ra", "dec"])
        for i in range(rows):
            writer.writerow([f"g{i}", f"{cutouts.name}/c{i % UNIQUE_CUTOUTS}.{kind}", i, -i])
    return path


def raw_throughput(model_path: Path, threads: int, batch_size: int, seconds: float) -> float:
    from galmorph.core.modelfile.engine import OnnxModel

    model = OnnxModel(
        model_path,
        providers=["CPUExecutionProvider"],
        intra_op_threads=threads,
        inter_op_threads=1,
    )
    height, width = model.input_size
    images = np.random.default_rng(0).integers(0, 256, (batch_size, height, width, 3), np.uint8)
    for _ in range(2):  # the first runs at a batch size grow onnxruntime's arena: not timed
        model.predict(images)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        model.predict(images)
        done += batch_size
    return done / (time.perf_counter() - started)


def _tree_rss_kib(pid: int) -> int:
    """Resident memory of a process and all its descendants (decode workers, forkserver)."""
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            total += int(next(x for x in status.splitlines() if x.startswith("VmRSS")).split()[1])
            for task in Path(f"/proc/{current}/task").iterdir():
                stack += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, StopIteration):
            continue  # the process ended between listing and reading
    return total


def run_scoring(
    catalog: Path,
    model: Path,
    out: Path,
    workers: int,
    threads: int,
    batch_size: int,
    raw_seconds: float = 0.0,
) -> dict[str, Any]:
    """Score in a fresh process; images/s, and peak RSS (MiB) sampled over its process tree.

    With raw_seconds > 0 the same process also times raw onnxruntime (`raw_throughput`, same
    model, threads and batch size) right before and right after scoring: throughput differed
    by up to 40 % between otherwise identical processes here, so the fraction is taken within
    one process. Its peak RSS then includes those sessions.
    """
    code = f"""
import json
from pathlib import Path
from benchmarks.bench_score import raw_throughput
from galmorph.scoring.run import ScoreConfig, score
raw = lambda: raw_throughput(Path({str(model)!r}), {threads}, {batch_size}, {raw_seconds})
before = raw() if {raw_seconds} > 0 else None
summary = score(ScoreConfig(catalog=Path({str(catalog)!r}), model=Path({str(model)!r}),
    out_dir=Path({str(out)!r}), workers={workers}, ort_threads={threads},
    batch_size={batch_size}, shard_size=1000, progress=False, merge=False,
    providers=("CPUExecutionProvider",)))
after = raw() if {raw_seconds} > 0 else None
hwm = next(x for x in open("/proc/self/status") if x.startswith("VmHWM")).split()[1]
print(json.dumps({{"images_per_second": summary.images_per_second,
                  "startup_seconds": summary.startup_seconds,
                  "raw_before": before, "raw_after": after,
                  "rows": summary.rows_scored, "main_peak_rss_mib": int(hwm) / 1024}}))
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _tree_rss_kib(proc.pid))
        time.sleep(0.05)
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"scoring run failed:\n{stderr.decode()[-3000:]}")
    result = dict(json.loads(stdout.decode().strip().splitlines()[-1]))
    result["tree_peak_rss_mib"] = peak / 1024
    return result


def measure_format(
    folder: Path, model: Path, kind: str, args: argparse.Namespace
) -> dict[str, object]:
    """Rounds of raw / scoring / raw for one input format, then one run with a decode worker."""
    catalog = make_catalog(folder, kind, args.rows)
    threads = os.cpu_count() or 1
    default_workers = max(0, threads - 2)  # galmorph.scoring.local_engine.default_decode_workers

    def scoring_round(name: str, workers: int, ort_threads: int) -> dict[str, Any]:
        run = run_scoring(
            catalog,
            model,
            folder / f"out_{kind}_{name}",
            workers,
            ort_threads,
            args.batch_size,
            raw_seconds=args.raw_seconds,
        )
        raw = (float(run["raw_before"]) + float(run["raw_after"])) / 2
        result = {"workers": workers, "ort_threads": ort_threads, **run}
        result["fraction_of_raw"] = float(run["images_per_second"]) / raw
        print(kind, name, json.dumps(result), flush=True)
        return result

    rounds = [
        scoring_round(str(index), default_workers, threads - default_workers)
        for index in range(args.rounds)
    ]
    fractions = [float(r["fraction_of_raw"]) for r in rounds]
    return {
        "rounds": rounds,
        "median_fraction_of_raw": float(np.median(fractions)),
        "min_fraction": min(fractions),
        "max_fraction": max(fractions),
        "one_decode_worker": scoring_round("worker", 1, threads),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rows",
        type=int,
        default=960,
        help="rows per scoring run (30 batches; start-up is timed apart, so runs can be short)",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5, help="raw/scoring rounds per format")
    parser.add_argument("--raw-seconds", type=float, default=5.0)
    parser.add_argument("--memory-rows", type=int, nargs=2, default=(2000, 8000))
    args = parser.parse_args()

    from tests.support.onnx_factory import FactoryModel, write_model

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model, model_note = export_tiny_model(folder)
        throughput = {kind: measure_format(folder, model, kind, args) for kind in ("fits", "png")}
        for kind, figures in throughput.items():
            print(kind, "median fraction of raw", figures["median_fraction_of_raw"], flush=True)

        cheap = write_model(folder / "cheap.onnx", FactoryModel(input_size=256))
        memory = []
        for rows in args.memory_rows:
            catalog = make_catalog(folder, "png", rows)
            result = run_scoring(catalog, cheap, folder / f"mem_{rows}", 1, 1, args.batch_size)
            result["catalog_rows"] = rows
            memory.append(result)
            print("memory", json.dumps(result), flush=True)

    report = {
        "benchmark": "batch scoring throughput vs raw onnxruntime; peak memory vs catalog rows",
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_average_at_end": os.getloadavg(),
        },
        "model": model_note,
        "batch_size": args.batch_size,
        "rows_per_run": args.rows,
        "throughput": throughput,
        "memory_model": "onnx_factory FactoryModel(input_size=256), PNG 256x256 cutouts",
        "memory": memory,
        "target_fraction": 0.85,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    headline = {kind: figures["median_fraction_of_raw"] for kind, figures in throughput.items()}
    print(json.dumps(headline, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
