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

    from galmorph.core.data.galaxy10 import GALAXY10_CLASS_NAMES
    from galmorph.core.inputspec import IMAGENET_MEAN, IMAGENET_STD
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
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
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
    model_engine: str = "onnxruntime",
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
    providers=("CPUExecutionProvider",), model_engine={model_engine!r}))
after = raw() if {raw_seconds} > 0 else None
hwm = next(x for x in open("/proc/self/status") if x.startswith("VmHWM")).split()[1]
print(json.dumps({{"images_per_second": summary.images_per_second,
                  "startup_seconds": summary.startup_seconds,
                  "raw_before": before, "raw_after": after,
                  "rows": summary.rows_scored, "main_peak_rss_mib": int(hwm) / 1024}}))
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
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
    result["process_seconds"] = time.perf_counter() - started
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


# --- --cpu-engines: the scorer on OpenVINO bf16 vs onnxruntime fp32 vs a PIL + torch loop ----

CPU_ENGINES_RESULTS = REPO / "benchmarks" / "results" / "score_cpu_engines.json"
REAL_JPEGS = REPO / "tests" / "data" / "galaxy10-real"
ENGINE_CONTENDERS = ("openvino", "onnxruntime")  # galmorph score --model-engine
TORCH_LOOPS = ("torch_fp32", "torch_bf16_autocast")

# What a user would write instead of `galmorph score`: PIL decode, the model's resize and
# normalisation, torch eager at batch B, optionally the one added autocast line. Timed from the
# first image opened to the last batch's probabilities; the model load and one warm-up batch
# are not timed, as the scorer's images/s exclude its start-up and warm-up.
TORCH_LOOP = """
import contextlib, json, sys, time
import numpy as np, torch
from PIL import Image
from galmorph.model.checkpoint import load_model
run_dir, catalog, batch, threads, bf16 = sys.argv[1:6]
torch.set_num_threads(int(threads))
model, spec = load_model(run_dir)
model.eval()
mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
std = torch.tensor(spec.std).view(1, 3, 1, 1)
paths = [line.split(",")[1] for line in open(catalog).read().splitlines()[1:]]
size = (spec.img_size, spec.img_size)
autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 == "1" else contextlib.nullcontext()
with torch.inference_mode(), autocast:
    model(torch.zeros(int(batch), 3, *size))
probabilities = []
started = time.perf_counter()
with torch.inference_mode(), autocast:
    for i in range(0, len(paths), int(batch)):
        images = np.stack([np.asarray(Image.open(p).convert("RGB").resize(size, Image.BILINEAR))
                           for p in paths[i:i + int(batch)]])
        x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - mean) / std
        probabilities.append(model(x).float().softmax(-1))
seconds = time.perf_counter() - started
print(json.dumps({"images_per_second": len(paths) / seconds, "rows": len(paths),
                  "probabilities": torch.cat(probabilities)[:64].tolist()}))
"""


def run_torch_loop(run_dir: Path, catalog: Path, batch: int, threads: int, bf16: bool) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    args = [str(run_dir), str(catalog), str(batch), str(threads), "1" if bf16 else "0"]
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", TORCH_LOOP, *args], env=env, capture_output=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"torch loop failed:\n{proc.stderr.decode()[-3000:]}")
    result = dict(json.loads(proc.stdout.decode().strip().splitlines()[-1]))
    result["process_seconds"] = time.perf_counter() - started
    return result


def real_jpeg_catalog(folder: Path, rows: int) -> Path:
    """The real Galaxy10 JPEGs the repository carries, cycled to `rows` rows."""
    jpegs = sorted(REAL_JPEGS.glob("*.jpg"))
    path = folder / f"catalog_jpeg_{rows}.csv"
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id_str", "file_loc"])
        for i in range(rows):
            writer.writerow([f"g{i}", str(jpegs[i % len(jpegs)])])
    return path


def scored_probabilities(out: Path, class_names: list[str]) -> np.ndarray:
    import pyarrow.parquet as pq

    from galmorph.core.data.tables import class_columns

    table = pq.read_table(sorted(out.glob("part-*.parquet")))
    return np.stack([table[c].to_numpy() for c in class_columns(class_names)], axis=1)


def parity(got: np.ndarray, want: np.ndarray) -> dict[str, Any]:
    return {
        "max_abs_prob_diff": float(np.abs(got - want).max()),
        "top1_equal": int((got.argmax(1) == want.argmax(1)).sum()),
        "rows_compared": len(want),
    }


def measure_cpu_engines(args: argparse.Namespace) -> dict[str, Any]:
    """Interleaved rounds of fresh processes: the scorer on each engine (JPEG and FITS) and the
    torch loops (JPEG: PIL reads no FITS). The results file is rewritten after every round, so
    a run cut short on a busy machine still leaves its finished rounds."""
    from benchmarks.bench_models import make_checkpoint, timed_export
    from benchmarks.common import write_results
    from galmorph.core.modelfile.engine_choice import open_model

    threads, batch = args.threads, args.batch_size
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        run_dir = make_checkpoint(args.model, args.img_size, folder / "run")
        model, export_s = timed_export(run_dir, folder / "model.onnx", threads)
        opened = open_model(model, engine="openvino", intra_op_threads=threads)
        meta = {"export_seconds": round(export_s, 1), "engine": opened.engine_report()}
        class_names = list(opened.card.class_names)
        del opened
        catalogs = {
            "jpeg": real_jpeg_catalog(folder, args.rows),
            "fits": make_catalog(folder, "fits", args.rows),
        }
        samples: dict[str, dict[str, list[dict[str, Any]]]] = {k: {} for k in catalogs}
        probabilities: dict[str, np.ndarray] = {}
        for index in range(args.rounds):
            for kind, catalog in catalogs.items():
                for engine in ENGINE_CONTENDERS:
                    out = folder / f"out_{kind}_{engine}_{index}"
                    run = run_scoring(catalog, model, out, 0, threads, batch, model_engine=engine)
                    samples[kind].setdefault(f"score_{engine}", []).append(run)
                    if kind == "jpeg":
                        probabilities[engine] = scored_probabilities(out, class_names)
                    print(kind, engine, json.dumps(run), flush=True)
                if kind != "jpeg":
                    continue
                for name in TORCH_LOOPS:
                    run = run_torch_loop(run_dir, catalog, batch, threads, name != "torch_fp32")
                    probabilities[name] = np.asarray(run.pop("probabilities"))
                    samples[kind].setdefault(name, []).append(run)
                    print(kind, name, json.dumps(run), flush=True)
            report = cpu_engines_summary(args, meta, samples, probabilities, index + 1)
            write_results(CPU_ENGINES_RESULTS, report)
    return report


def cpu_engines_summary(
    args: argparse.Namespace,
    meta: dict[str, Any],
    samples: dict[str, dict[str, list[dict[str, Any]]]],
    probabilities: dict[str, np.ndarray],
    rounds_done: int,
) -> dict[str, Any]:
    """Medians over the rounds so far, openvino's ratios to each contender, parity."""
    medians = {
        kind: {
            name: float(np.median([r["images_per_second"] for r in runs]))
            for name, runs in contenders.items()
        }
        for kind, contenders in samples.items()
    }
    ratios = {
        kind: {
            f"openvino_vs_{other}": round(rates["score_openvino"] / rates[other], 3)
            for other in rates
            if other != "score_openvino"
        }
        for kind, rates in medians.items()
    }
    unique = len(sorted(REAL_JPEGS.glob("*.jpg")))
    fp32, bf16 = probabilities["onnxruntime"], probabilities["openvino"]
    return {
        "benchmark": "galmorph score on OpenVINO bf16 vs onnxruntime fp32 vs PIL + torch loops",
        "model": f"{args.model} @ {args.img_size} px (model/export.py, seeded random weights)",
        **meta,
        "threads": args.threads,
        "batch_size": args.batch_size,
        "rows_per_run": args.rows,
        "rounds": args.rounds,
        "rounds_done": rounds_done,
        "inputs": {
            "jpeg": f"the {unique} real Galaxy10 JPEGs in tests/data/galaxy10-real, cycled",
            "fits": f"{UNIQUE_CUTOUTS} synthetic 256 px grz FITS cutouts, cycled",
        },
        "how": "each contender a fresh process per round, rounds interleaved; scorer images/s "
        "exclude its start-up (startup_seconds, process_seconds say the rest); torch loops "
        "time decode + inference after the model load and one warm-up batch; medians over "
        "rounds",
        "images_per_second_median": medians,
        "ratios": ratios,
        "parity_real_jpegs": {
            "openvino_bf16_vs_onnxruntime_fp32": parity(bf16[:unique], fp32[:unique]),
            "torch_bf16_autocast_vs_torch_fp32": parity(
                probabilities["torch_bf16_autocast"][:unique], probabilities["torch_fp32"][:unique]
            ),
        },
        "goals": {"openvino_vs_score_onnxruntime": 1.4, "openvino_vs_torch_bf16_autocast": 1.5},
        "runs": samples,
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
    parser.add_argument(
        "--cpu-engines",
        action="store_true",
        help=f"only the CPU engine comparison (results to {CPU_ENGINES_RESULTS.name}); "
        "--rows 400 --rounds 3 as recorded",
    )
    parser.add_argument("--model", default="astroformer_0", help="with --cpu-engines")
    parser.add_argument("--img-size", type=int, default=256, help="with --cpu-engines")
    parser.add_argument("--threads", type=int, default=2, help="with --cpu-engines")
    args = parser.parse_args()
    if args.cpu_engines:
        report = measure_cpu_engines(args)
        print(json.dumps({k: report[k] for k in ("images_per_second_median", "ratios")}))
        print(json.dumps(report["parity_real_jpegs"]))
        print(f"wrote {CPU_ENGINES_RESULTS}")
        return

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
