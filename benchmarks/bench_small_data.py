"""Small labelled data sets: the small-data recipe against the CPU demo recipe, and distillation.

The outside benchmark this answers (the issue "Your own labelled galaxies") is a few hundred
SDSS galaxies in 4 classes with a separate test file. Here the same shape is made from the
synthetic generator: 4 classes merged from Galaxy10's (elliptical = round, in-between and
cigar-shaped smooth; spiral = barred, tight and loose; edge-on = with and without bulge;
merger = merging and disturbed), so that cigars pass for edge-on disks and disturbed
galaxies for spirals; a training file of a few hundred images in which mergers are rare
(10 %), and a separate test file drawn with another seed in the same proportions. Each seed
draws its own training file and trains with its own seed; the test file is shared.

1. recipes: `configs/small_data.yaml` against `configs/cpu_demo.yaml`, with the same model,
   size and epochs, >= 3 seeds: top-1, macro-F1 and merger recall on the separate test file
   (what `galmorph evaluate RUN --data test.h5` reports), plain and 8-fold TTA.
2. distillation: a teacher (gm_astroformer_small) trained with the recipe on seed 0's file;
   students (the recipe's model) with it on every seed, against the recipe's runs without
   it; images/s of teacher and student as served (exported ONNX, the server's engine),
   timed in interleaved rounds on the same images.
3. --sweep: the evidence for the recipe: one knob at a time away from it, mean and sd over
   seeds (results/small_data_sweep.json; the table in docs/small_data.md).

The defaults (gm_astroformer_tiny at 64 px, 300 training images) keep a run to about 40
minutes on 2 CPU threads; `--model gm_astroformer_small --size 128` is the outside setting.

    .venv/bin/python -m benchmarks.bench_small_data [--seeds 3] [--threads 2]
    .venv/bin/python -m benchmarks.bench_small_data --sweep --epochs 15
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import REPO_ROOT, RESULTS_DIR, machine_info, write_results

CLASS_NAMES = ("elliptical", "spiral", "edge-on", "merger")
# Galaxy10 classes merged into each of the four (training/synth.py renders all ten).
SOURCE_CLASSES = ((2, 3, 4), (5, 6, 7), (8, 9), (0, 1))
PROPORTIONS = (0.35, 0.35, 0.2, 0.1)  # mergers are the rare class
RECIPE = REPO_ROOT / "configs" / "small_data.yaml"
CPU_DEMO = REPO_ROOT / "configs" / "cpu_demo.yaml"
RARE_CLASS = "merger"

# --sweep: one knob at a time away from a starting point: configs/small_data.yaml with
# SWEEP_START's overrides (the recipe before the sweep chose its lr and loss weighting).
SWEEP_START = ("lr=1e-3", "loss_weighting=none")
SWEEP: dict[str, tuple[str, ...]] = {
    "start": (),
    "SAM rho 0.05": ("sam=sam", "sam_rho=0.05"),
    "ASAM rho 0.5": ("sam=asam", "sam_rho=0.5"),
    "balanced sampling": ("sampling=balanced",),
    "balanced loss": ("loss_weighting=balanced",),
    "lr 2e-3": ("lr=2e-3",),
    "weight decay 2e-5 (paper)": ("weight_decay=2e-5",),
    "batch 16": ("batch_size=16",),
    "shift 6 % + zoom 0.9-1.1": ("augment.shift_fraction=0.0625", "augment.scale_range=[0.9,1.1]"),
    "colour jitter 0.2": ("augment.color_jitter=0.2",),
    "mixup 0.2": ("mixup.mixup_alpha=0.2",),
    "EMA 0.99": ("ema=true", "ema_decay=0.99"),
    "no label smoothing": ("mixup.label_smoothing=0",),
    "30 epochs": ("epochs=30",),
    "lr 2e-3, 30 epochs": ("lr=2e-3", "epochs=30"),
    "lr 2e-3 + balanced loss": ("lr=2e-3", "loss_weighting=balanced"),
    "lr 2e-3 + balanced loss, 30 epochs": ("lr=2e-3", "loss_weighting=balanced", "epochs=30"),
}


def make_low_data_set(
    out: Path, *, n: int, size: int, seed: int, proportions: Sequence[float] = PROPORTIONS
) -> Path:
    """A 4-class file of `n` synthetic galaxies in `proportions`, with its class names."""
    import h5py

    from galmorph.training.synth import synthesize

    counts = np.floor(np.asarray(proportions) * n).astype(int)
    counts[0] += n - counts.sum()
    per_source = max(-(-int(c) // len(src)) for c, src in zip(counts, SOURCE_CLASSES, strict=True))
    full = synthesize(
        out.with_suffix(".all.h5"), n=10 * per_source, size=size, seed=seed, progress=False
    )
    rng = np.random.default_rng([seed, 4])
    with h5py.File(full, "r") as source:
        labels = source["ans"][()]
        rows: list[int] = []
        new_labels: list[int] = []
        for target, (count, sources) in enumerate(zip(counts, SOURCE_CLASSES, strict=True)):
            pool = np.flatnonzero(np.isin(labels, sources))
            picked = np.sort(rng.choice(pool, size=int(count), replace=False))
            rows += picked.tolist()
            new_labels += [target] * int(count)
        order = np.argsort(rows)
        rows_sorted = np.asarray(rows)[order]
        with h5py.File(out, "w") as handle:
            handle.create_dataset("images", data=source["images"][rows_sorted])
            handle.create_dataset("ans", data=np.asarray(new_labels, np.uint8)[order])
            for column in ("ra", "dec", "redshift", "pxscale"):
                handle.create_dataset(column, data=source[column][rows_sorted])
            handle.attrs["class_names"] = list(CLASS_NAMES)
            handle.attrs["generator"] = "benchmarks.bench_small_data"
            handle.attrs["seed"] = seed
    full.unlink()
    return out


def data_sets(workdir: Path, *, seeds: Sequence[int], n_train: int, n_test: int, size: int) -> dict:
    """One training file per seed and one shared test file (another generator seed)."""
    workdir.mkdir(parents=True, exist_ok=True)
    train = {}
    for seed in seeds:
        path = workdir / f"train_s{seed}_{n_train}_{size}.h5"
        if not path.is_file():
            make_low_data_set(path, n=n_train, size=size, seed=1000 + seed)
        train[seed] = path
    test = workdir / f"test_{n_test}_{size}.h5"
    if not test.is_file():
        make_low_data_set(test, n=n_test, size=size, seed=99)
    return {"train": train, "test": test}


def train_and_evaluate(
    config_file: Path, data: Path, test: Path, out: Path, overrides: Sequence[str], seed: int
) -> dict[str, Any]:
    """Train as the config file says, then evaluate on the separate test file, plain and TTA."""
    from galmorph.training.config import load_config
    from galmorph.training.evaluate import EvaluationRequest, evaluate
    from galmorph.training.train import train

    config = load_config(
        config_file,
        [*overrides, f"seed={seed}", "progress=false", "num_workers=0"],
        data=str(data),
        out=str(out),
    )
    started = time.perf_counter()
    run_dir = train(config)
    seconds = time.perf_counter() - started
    result: dict[str, Any] = {"train_seconds": round(seconds, 1)}
    for tta in (False, True):
        report = evaluate(
            EvaluationRequest(
                model=run_dir, data=test, split="all", tta=tta, out_dir=out / f"eval_tta{int(tta)}",
                progress=False,
            )
        )  # fmt: skip
        suffix = "_tta" if tta else ""
        result[f"top1{suffix}"] = round(report["top1"], 4)
        result[f"macro_f1{suffix}"] = round(report["macro_f1"], 4)
        result[f"{RARE_CLASS}_recall{suffix}"] = round(report["per_class"][RARE_CLASS]["recall"], 4)
    return result


def summarise(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """mean and sd over seeds of every numeric field."""
    summary: dict[str, Any] = {"seeds": len(runs)}
    for key in runs[0]:
        values = [float(run[key]) for run in runs]
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        summary[key] = {"mean": round(statistics.fmean(values), 4), "sd": round(sd, 4)}
    return summary


def sweep(args: argparse.Namespace, sets: dict, workdir: Path) -> dict[str, Any]:
    results: dict[str, Any] = {}
    names = args.only or list(SWEEP)
    for name in names:
        runs = []
        for seed in args.seeds_list:
            out = workdir / "runs" / f"{name.replace(' ', '_')}_s{seed}"
            overrides = [*args.common, *SWEEP_START, *SWEEP[name]]
            run = train_and_evaluate(
                RECIPE, sets["train"][seed], sets["test"], out, overrides, seed
            )
            print(name, seed, json.dumps(run), flush=True)
            runs.append(run)
        results[name] = {"overrides": list(SWEEP[name]), "runs": runs, **summarise(runs)}
        _progress_file(args, results)
    return results


def sweep_table(results: dict[str, Any]) -> str:
    """The docs/small_data.md table: each knob's mean +- sd and its change from the recipe."""
    base = results["start"]
    rows = [
        "| knob (`--set`) | top-1 | top-1 TTA | macro-F1 | merger recall | Δ top-1 | Δ top-1 TTA |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in results.items():
        cells = [
            f"{row[key]['mean']:.3f} ± {row[key]['sd']:.3f}"
            for key in ("top1", "top1_tta", "macro_f1", f"{RARE_CLASS}_recall")
        ]
        deltas = [
            "–" if name == "start" else f"{row[key]['mean'] - base[key]['mean']:+.3f}"
            for key in ("top1", "top1_tta")
        ]
        knob = " ".join(f"`{o}`" for o in row["overrides"]) or "(the starting point)"
        rows.append(f"| {name}: {knob} | " + " | ".join(cells + deltas) + " |")
    return "\n".join(rows)


def _progress_file(args: argparse.Namespace, results: dict[str, Any]) -> None:
    if args.partial is not None:
        args.partial.write_text(json.dumps(results, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--size", type=int, default=64, help="image size of the data sets")
    parser.add_argument("--n-train", type=int, default=300)
    parser.add_argument("--n-test", type=int, default=800)
    parser.add_argument(
        "--model", default="gm_astroformer_tiny", help="model of both recipes (and the student)"
    )
    parser.add_argument("--epochs", type=int, default=30, help="both recipes' epochs")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--workdir", type=Path, help="keep data and runs here (default: temp)")
    parser.add_argument("--sweep", action="store_true", help="the knob table instead")
    parser.add_argument("--only", nargs="+", choices=list(SWEEP), help="sweep just these")
    parser.add_argument("--partial", type=Path, help="write sweep results here as they come")
    parser.add_argument(
        "--teacher-model",
        default="gm_astroformer_small",
        help="distillation teacher trained with the recipe ('' skips distillation)",
    )
    parser.add_argument("--speed-repeats", type=int, default=10)
    parser.add_argument(
        "--table", type=Path, metavar="RESULTS", help="print a sweep results file as markdown"
    )
    parser.add_argument("--out", type=Path, help="results file")
    args = parser.parse_args(argv)
    if args.table is not None:
        print(sweep_table(json.loads(args.table.read_text())["sweep"]))
        return 0

    import torch

    torch.set_num_threads(args.threads)
    args.seeds_list = list(range(args.seeds))
    args.common = [
        f"model={args.model}",
        f"img_size={args.size}",
        f"threads={args.threads}",
        f"epochs={args.epochs}",
    ]
    default_name = "small_data_sweep.json" if args.sweep else "small_data.json"
    out_file = args.out or RESULTS_DIR / default_name
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        sets = data_sets(
            workdir / "data",
            seeds=args.seeds_list,
            n_train=args.n_train,
            n_test=args.n_test,
            size=args.size,
        )
        payload: dict[str, Any] = {
            "machine": machine_info(),
            "data": {
                "classes": list(CLASS_NAMES),
                "proportions": list(PROPORTIONS),
                "train_images": args.n_train,
                "test_images": args.n_test,
                "size": args.size,
                "seeds": args.seeds_list,
            },
            "common_overrides": args.common,
        }
        if args.sweep:
            payload["sweep"] = sweep(args, sets, workdir)
        else:
            payload.update(compare(args, sets, workdir))
    write_results(out_file, payload)
    print(f"wrote {out_file}")
    return 0


def compare(args: argparse.Namespace, sets: dict, workdir: Path) -> dict[str, Any]:
    """The two recipes on every seed, then the teacher, the taught students and their speed."""
    runs: dict[str, list[dict[str, Any]]] = {"small_data": [], "cpu_demo": []}
    for seed in args.seeds_list:
        for name, config_file in (("small_data", RECIPE), ("cpu_demo", CPU_DEMO)):
            out = workdir / "runs" / f"{name}_s{seed}"
            run = train_and_evaluate(
                config_file, sets["train"][seed], sets["test"], out, args.common, seed
            )
            print(name, seed, json.dumps(run), flush=True)
            runs[name].append(run)
    results: dict[str, Any] = {
        "recipes": {
            name: {"config": f"configs/{name}.yaml", "runs": r, **summarise(r)}
            for name, r in runs.items()
        }
    }
    if args.teacher_model:
        results["distillation"] = distillation(args, sets, workdir, runs["small_data"])
    return results


def distillation(
    args: argparse.Namespace, sets: dict, workdir: Path, students_alone: list[dict[str, Any]]
) -> dict[str, Any]:
    """A teacher (the recipe, a bigger model) on seed 0's file; students with it on every seed.

    The students without a teacher are the recipe's runs above (same model, seeds, files).
    """
    teacher_dir = workdir / "runs" / "teacher"
    overrides = [*args.common, f"model={args.teacher_model}"]
    teacher = train_and_evaluate(RECIPE, sets["train"][0], sets["test"], teacher_dir, overrides, 0)
    print("teacher", json.dumps(teacher), flush=True)
    taught = []
    for seed in args.seeds_list:
        out = workdir / "runs" / f"student_s{seed}"
        run = train_and_evaluate(
            RECIPE,
            sets["train"][seed],
            sets["test"],
            out,
            [*args.common, f"distill.teacher={teacher_dir}"],
            seed,
        )
        print("student+teacher", seed, json.dumps(run), flush=True)
        taught.append(run)
    return {
        "teacher": {"model": args.teacher_model, "seed": 0, **teacher},
        "student": {"model": args.model, "distill": "hard, alpha 0.5 (the default)"},
        "student_without_teacher": summarise(students_alone),
        "student_with_teacher": {"runs": taught, **summarise(taught)},
        "speed": served_speed(teacher_dir, workdir / "runs" / "student_s0", sets["test"], args),
    }


def served_speed(
    teacher_dir: Path, student_dir: Path, test: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """Images/s of teacher and student as served (exported ONNX through the server's engine),
    timed in interleaved rounds on the same 64 test images."""
    from benchmarks.common import time_interleaved
    from galmorph.core.cutouts.resample import resize_images
    from galmorph.core.data.galaxy10 import Galaxy10File
    from galmorph.core.modelfile.engine import OnnxModel
    from galmorph.model.export import export_onnx

    images = Galaxy10File(test).images(np.arange(64))
    engines, inputs = {}, {}
    for name, run in (("teacher", teacher_dir), ("student", student_dir)):
        path = export_onnx(run, run / "model.onnx", intra_op_threads=args.threads)
        engines[name] = OnnxModel(path, intra_op_threads=args.threads, inter_op_threads=1)
        size = engines[name].input_size[0]
        inputs[name] = resize_images(images, size, engines[name].card.interpolation)
    timings = time_interleaved(
        {name: (lambda n=name: engines[n].predict(inputs[n])) for name in engines},
        warmup=2,
        repeats=args.speed_repeats,
        settle_s=0.25,
    )
    speed = {name: timing.to_dict(items_per_call=64) for name, timing in timings.items()}
    speed["student_over_teacher"] = round(timings["teacher"].median / timings["student"].median, 2)
    return speed


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT))
    sys.exit(main())
