"""`make bench`: every benchmark in one run, then the summary table and the throughput plot.

Each benchmark runs as a child process of this one (one process tree, one after the other so
they do not compete for the cores), with the BLAS/OpenMP thread pools pinned to --threads.
A benchmark that fails is reported and the others still run; the exit code says whether all
succeeded. Afterwards benchmarks/results/summary.md and throughput_vs_batch.png are rebuilt
from the results JSON files (benchmarks.report), and run.json records what ran and how long.

    .venv/bin/python -m benchmarks.run                 # everything (tens of minutes here)
    .venv/bin/python -m benchmarks.run --only gemm startup
    .venv/bin/python -m benchmarks.run --quick --results-dir /tmp/bench   # harness smoke run
    .venv/bin/python -m benchmarks.run --report-only   # rebuild summary.md and the plot
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import REPO_ROOT, RESULTS_DIR, thread_env, write_results


@dataclass(frozen=True)
class Benchmark:
    name: str  # results file stem: results/<name>.json
    module: str
    owner: str
    args: tuple[str, ...] = ()
    quick_args: tuple[str, ...] | None = None  # None: not part of the --quick smoke run
    writes_to_out: bool = True  # accepts --out; otherwise it writes results/<name>.json itself
    takes_threads: bool = False  # accepts --threads (others read the thread environment)

    @property
    def script(self) -> Path:
        return REPO_ROOT / Path(*self.module.split(".")).with_suffix(".py")


# Machine limit first, then ours, then the components measured by their owners.
BENCHMARKS = (
    Benchmark(
        "gemm",
        "benchmarks.bench_gemm",
        "benchmarks",
        quick_args=("--sizes", "256", "--warmup", "1", "--repeats", "2"),
        takes_threads=True,
    ),
    Benchmark(
        "models",
        "benchmarks.bench_models",
        "benchmarks",
        quick_args=("--quick",),
        takes_threads=True,
    ),
    Benchmark(
        "startup",
        "benchmarks.bench_startup",
        "benchmarks",
        quick_args=("--runs", "1", "--models", "gm_astroformer_tiny", "--img-size", "64"),
        takes_threads=True,
    ),
    Benchmark(
        "stages",
        "benchmarks.bench_stages",
        "benchmarks",
        quick_args=("--repeats", "3"),
        takes_threads=True,
    ),
    Benchmark("decode", "benchmarks.bench_decode", "imaging"),
    Benchmark("service", "benchmarks.bench_service", "service"),
    Benchmark("slow_clients", "benchmarks.bench_slow_clients", "service"),
    Benchmark("hostile", "benchmarks.bench_hostile", "service"),
    Benchmark("a5_export", "benchmarks.bench_a5_export", "model"),
    Benchmark("score", "benchmarks.bench_score", "scoring", writes_to_out=False),
    Benchmark("sky", "benchmarks.bench_sky", "scoring"),
    Benchmark("synth", "benchmarks.bench_synth", "data", writes_to_out=False),
    Benchmark(
        "train", "benchmarks.bench_train", "training", writes_to_out=False, takes_threads=True
    ),
    # About 40 minutes on 2 cores: three seeds of two recipes, a teacher and its students.
    Benchmark("small_data", "benchmarks.bench_small_data", "training", takes_threads=True),
    # The ANN libraries on 1 M synthetic embeddings (tens of minutes on 2 cores; the candidates
    # other than usearch are measured only where installed), galmorph's index at 200 k, and
    # neighbour quality with demo/model.onnx (make demo) against raw pixels.
    Benchmark(
        "similarity",
        "benchmarks.bench_similarity",
        "similarity",
        args=("--parts", "libraries", "galmorph_index", "quality"),
        quick_args=("--quick", "--parts", "galmorph_index"),
        takes_threads=True,
    ),
    # About 5 minutes: trains a small model, then scores stars, sky, artefacts and galaxies.
    Benchmark("ood", "benchmarks.bench_ood", "model", takes_threads=True),
)


def run_one(
    benchmark: Benchmark, *, results_dir: Path, threads: int, quick: bool
) -> dict[str, Any]:
    """Run one benchmark as a child process; say why when it is not run."""
    if not benchmark.script.is_file():
        return {"status": f"missing: {benchmark.script.relative_to(REPO_ROOT)} does not exist"}
    if quick and benchmark.quick_args is None:
        return {"status": "not run in --quick (its owner's tests cover it)"}
    if not benchmark.writes_to_out and results_dir.resolve() != RESULTS_DIR.resolve():
        return {"status": f"not run: it writes only to {RESULTS_DIR}"}
    command = [sys.executable, "-m", benchmark.module]
    command += list(benchmark.quick_args or ()) if quick else list(benchmark.args)
    if benchmark.takes_threads:
        command += ["--threads", str(threads)]
    if benchmark.writes_to_out:
        command += ["--out", str(results_dir / f"{benchmark.name}.json")]
    print(f"\n=== {benchmark.name}: {' '.join(command[1:])}", flush=True)
    started = time.perf_counter()
    completed = subprocess.run(command, cwd=REPO_ROOT, env=thread_env(threads), check=False)
    seconds = round(time.perf_counter() - started, 1)
    status = "ok" if completed.returncode == 0 else f"failed: exit code {completed.returncode}"
    print(f"=== {benchmark.name}: {status} in {seconds} s", flush=True)
    return {"status": status, "seconds": seconds, "command": command[1:]}


def _previous_runs(results_dir: Path, only: list[str] | None) -> dict[str, Any]:
    """With --only, keep the record of the benchmarks not rerun this time."""
    path = results_dir / "run.json"
    if not only or not path.is_file():
        return {}
    previous = json.loads(path.read_text()).get("benchmarks", {})
    return {name: run for name, run in previous.items() if name not in only}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="threads for every engine")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run of our harness")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument(
        "--only", nargs="+", choices=[b.name for b in BENCHMARKS], help="run just these"
    )
    parser.add_argument(
        "--report-only", action="store_true", help="only rebuild summary.md and the plot"
    )
    args = parser.parse_args(argv)

    from benchmarks.report import write_report

    results_dir: Path = args.results_dir
    results_dir.mkdir(parents=True, exist_ok=True)
    failed = False
    if not args.report_only:
        selected = [b for b in BENCHMARKS if not args.only or b.name in args.only]
        runs = {}
        for benchmark in selected:
            runs[benchmark.name] = {
                "owner": benchmark.owner,
                **run_one(
                    benchmark, results_dir=results_dir, threads=args.threads, quick=args.quick
                ),
            }
        failed = any(run["status"].startswith("failed") for run in runs.values())
        write_results(
            results_dir / "run.json",
            {
                "quick": args.quick,
                "threads": args.threads,
                "benchmarks": {**_previous_runs(results_dir, args.only), **runs},
            },
        )
    summary, plot = write_report(results_dir)
    print(f"\nwrote {summary} and {plot}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
