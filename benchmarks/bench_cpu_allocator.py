"""Training on a CPU with glibc malloc as it comes against freed memory kept for reuse.

`galmorph train` and `galmorph evaluate` on a CPU call galmorph.core.allocator's
retain_freed_memory (two mallopt calls). This times `galmorph train` itself with
configs/small_data.yaml (gm_astroformer_small, 128 px, batch 32) on a file of synthetic
galaxies, each run in a fresh interpreter (malloc settings are per process): "kept" as
shipped, "glibc default" with the call replaced by a no-op. Per precision (the machine's
default and fp32), the two alternate for --rounds rounds; the median epoch time counts the
epochs after the first. Also recorded: minor page faults and peak resident memory per run,
and whether both trained to the same weights (the allocator must not change the numbers).
Results: benchmarks/results/cpu_allocator.json.

    .venv/bin/python -m benchmarks.bench_cpu_allocator [--rounds 2] [--epochs 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import REPO_ROOT, RESULTS_DIR, write_results

RECIPE = REPO_ROOT / "configs" / "small_data.yaml"
VARIANTS = ("glibc default", "kept")
PRECISIONS = ("auto", "fp32")


def child(variant: str, data: Path, out: Path, precision: str, epochs: int, threads: int) -> None:
    """One `galmorph train` run in this process; prints its figures as one JSON line."""
    import torch

    from galmorph.core import allocator
    from galmorph.training.config import load_config
    from galmorph.training.train import train

    if variant == "glibc default":
        allocator.retain_freed_memory = lambda: "left as is by the benchmark"
    torch.set_num_threads(threads)
    overrides = [f"epochs={epochs}", f"precision={precision}", f"threads={threads}"]
    config = load_config(RECIPE, [*overrides, "progress=false"], data=str(data), out=str(out))
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    train(config)
    epochs_s = [
        record["epoch_seconds"]
        for record in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
        if record.get("kind") == "epoch"
    ]
    usage = resource.getrusage(resource.RUSAGE_SELF)
    weights = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    print(
        json.dumps(
            {
                "epoch_seconds": [round(s, 2) for s in epochs_s],
                "minor_page_faults": usage.ru_minflt - faults,
                "peak_rss_mb": usage.ru_maxrss // 1024,
                "weights_sha256": weights,
                "precision": json.loads((out / "config.json").read_text())["precision"],
            }
        )
    )


def run_child(
    variant: str, data: Path, out: Path, precision: str, args: argparse.Namespace
) -> dict:
    command = [
        sys.executable, "-m", "benchmarks.bench_cpu_allocator", "--child", variant,
        "--data", str(data), "--out-dir", str(out), "--precision", precision,
        "--epochs", str(args.epochs), "--threads", str(args.threads),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    steady = [s for run in runs for s in run["epoch_seconds"][1:]]
    return {
        "median_epoch_seconds": round(statistics.median(steady), 2),
        "minor_page_faults": [run["minor_page_faults"] for run in runs],
        "peak_rss_mb": [run["peak_rss_mb"] for run in runs],
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="runs per variant and precision")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run (>= 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--images", type=int, default=288, help="synthetic training images")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "cpu_allocator.json")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--precision", choices=PRECISIONS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.data, args.out_dir, args.precision, args.epochs, args.threads)
        return 0
    if args.epochs < 3:
        parser.error("--epochs must be >= 3 (warmup is 2 epochs; the first epoch is not timed)")

    from galmorph.training.synth import synthesize

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = synthesize(Path(tmp) / "train.h5", n=args.images, size=128, seed=0, progress=False)
        for precision in PRECISIONS:
            runs: dict[str, list[dict[str, Any]]] = {variant: [] for variant in VARIANTS}
            for round_index in range(args.rounds):
                order = VARIANTS if round_index % 2 == 0 else VARIANTS[::-1]
                for variant in order:
                    out = Path(tmp) / f"{precision}_{variant.replace(' ', '_')}_{round_index}"
                    run = run_child(variant, data, out, precision, args)
                    print(precision, variant, round_index, json.dumps(run), flush=True)
                    runs[variant].append(run)
            figures = {variant: summarise(runs[variant]) for variant in VARIANTS}
            default, kept = (figures[v]["median_epoch_seconds"] for v in VARIANTS)
            weights = {run["weights_sha256"] for variant in VARIANTS for run in runs[variant]}
            results[precision] = {
                "resolved": runs["kept"][0]["precision"],
                **figures,
                "speedup": round(default / kept, 3),
                "same_weights": len(weights) == 1,
            }
    payload = {
        "setup": {
            "config": "configs/small_data.yaml",
            "images": args.images,
            "size": 128,
            "epochs": args.epochs,
            "threads": args.threads,
            "rounds": args.rounds,
        },
        "results": results,
    }
    write_results(args.out, payload)
    for precision, row in results.items():
        default, kept = (row[v]["median_epoch_seconds"] for v in VARIANTS)
        print(
            f"{precision} ({row['resolved']}): {default} s/epoch -> {kept} s/epoch kept "
            f"({row['speedup']}x), same weights: {row['same_weights']}"
        )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
