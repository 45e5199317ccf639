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
4. --real DIR: the same question on real galaxies (files from scripts/real_data/
   build_real_sets.py; docs/real_data.md): each setting of REAL_SETTINGS and the timm peers
   on a few hundred real SDSS galaxies with a rare class, plain, 8-view and 16-view TTA
   (results/small_data_real.json).

The defaults (gm_astroformer_tiny at 64 px, 300 training images) keep a run to about 40
minutes on 2 CPU threads; `--model gm_astroformer_small --size 128` is the outside setting.

    .venv/bin/python -m benchmarks.bench_small_data [--seeds 3] [--threads 2]
    .venv/bin/python -m benchmarks.bench_small_data --sweep --epochs 15
    .venv/bin/python -m benchmarks.bench_small_data --real /work/data/real --seeds 1 \
        --settings recipe "any-angle rotation" --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
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
    "stochastic depth 0.1": ("drop_path_rate=0.1",),
    "dropout 0.1 (the paper's)": ("drop_rate=0.1",),
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


def train_run(
    config_file: Path, data: Path, out: Path, overrides: Sequence[str], seed: int
) -> tuple[Path, float]:
    """Train as `galmorph train` would with the config file; the run folder and the training
    seconds (a synthetic starting point is resolved, and built once, before the clock starts)."""
    from galmorph.training.config import load_config
    from galmorph.training.synthetic_pretrain import resolve_start
    from galmorph.training.train import train

    config = load_config(
        config_file,
        [*overrides, f"seed={seed}", "progress=false", "num_workers=0"],
        data=str(data),
        out=str(out),
    )
    config = resolve_start(config)
    started = time.perf_counter()
    run_dir = train(config)
    return run_dir, time.perf_counter() - started


def train_and_evaluate(
    config_file: Path,
    data: Path,
    test: Path,
    out: Path,
    overrides: Sequence[str],
    seed: int,
) -> dict[str, Any]:
    """Train as the config file says, then evaluate on the separate test file, plain and TTA."""
    from galmorph.training.evaluate import EvaluationRequest, evaluate

    run_dir, seconds = train_run(config_file, data, out, overrides, seed)
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
    """mean and sd over seeds of every numeric field (records such as `served` stay per run)."""
    summary: dict[str, Any] = {"seeds": len(runs)}
    for key in runs[0]:
        # Runs merged from several benchmark versions may lack a field the first one has.
        if not all(isinstance(run.get(key), int | float) for run in runs):
            continue
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


# --real: real galaxies (scripts/real_data/build_real_sets.py writes the files). Each seed
# draws REAL_TRAIN_IMAGES training rows in REAL_PROPORTIONS from the 1,400-row training file;
# the test file keeps the same proportions, drawn once from the separate 600-row file.
REAL_TRAIN_FILE = "gz2_sdss_train.h5"
REAL_TEST_FILE = "gz2_sdss_test.h5"
REAL_CLASSES = ("non-spiral", "spiral")
REAL_PROPORTIONS = (0.7, 0.3)  # the spirals are the rare class
REAL_RARE_CLASS = "spiral"
# 16-view TTA: 8 angles 45 degrees apart, each unflipped and flipped.
TTA_ANGLES = tuple(float(a) for a in range(0, 360, 45))
PRETRAINED = "pretrained on synthetic galaxies"
# Settings on top of configs/small_data.yaml and the common overrides (later keys win).
# "recipe" is the file as it is: since this benchmark, without loss weights.
REAL_SETTINGS: dict[str, tuple[str, ...]] = {
    "recipe": (),
    "balanced loss weights (the recipe before)": ("loss_weighting=balanced",),
    "lr 1e-3": ("lr=1e-3",),
    "lr 1e-3, balanced loss weights": ("lr=1e-3", "loss_weighting=balanced"),
    "2x epochs": ("epochs*2",),
    "lr 1e-3, 2x epochs": ("lr=1e-3", "epochs*2"),
    "any-angle rotation": ("augment.rotation=any",),
    "lr 1e-3, any-angle rotation": ("lr=1e-3", "augment.rotation=any"),
    "balanced weights, any-angle rotation": ("loss_weighting=balanced", "augment.rotation=any"),
    "no label smoothing": ("mixup.label_smoothing=0",),
    "balanced weights, no label smoothing": ("loss_weighting=balanced", "mixup.label_smoothing=0"),
    "EMA 0.99": ("ema=true", "ema_decay=0.99"),
    "SWA of the last 8 epochs": ("swa_epochs=8",),
    "shift 6 % + zoom 0.9-1.1": ("augment.shift_fraction=0.0625", "augment.scale_range=[0.9,1.1]"),
    "stochastic depth 0.1": ("drop_path_rate=0.1",),
    "dropout 0.1 (the paper's)": ("drop_rate=0.1",),
    "balanced weights, EMA 0.99": ("loss_weighting=balanced", "ema=true", "ema_decay=0.99"),
    "input 64 px": ("img_size=64",),
    "input 96 px": ("img_size=96",),
    "input 128 px": ("img_size=128",),
    "fp32 (no bf16 autocast)": ("precision=fp32",),
    # --init-from (default synthetic: init_from's built-in start, 3 epochs on 6,000 synthetic
    # galaxies; the measured runs used a run folder made the same way by hand).
    PRETRAINED: ("init_from=synthetic",),
}
PEERS = ("timm resnet18", "timm coatnet C-C-C-T")
# timm's CoAtNet in the C-C-C-T layout at galmorph's widths and depths (--model): 1.4 M
# parameters beside the tiny model (the 64 px screen), 5.4 M beside gm_astroformer_small (5.3 M).
PEER_COATNET_SIZES: dict[str, dict[str, Any]] = {
    "gm_astroformer_tiny": {"embed_dim": (48, 96, 128, 192), "depths": (1, 2, 2, 1)},
    "gm_astroformer_small": {
        "embed_dim": (48, 96, 192, 384), "depths": (2, 2, 4, 2), "stem_width": 48,
    },
}  # fmt: skip
# The recipe trained 3 times on one subset (training seeds +0, +100, +200), probabilities
# averaged: what a seed ensemble exported as one model would answer.
ENSEMBLE = "ensemble of 3 recipe runs"
ENSEMBLE_SEED_OFFSETS = (0, 100, 200)


def real_sets(real_dir: Path, workdir: Path, *, seeds: Sequence[int], n_train: int) -> dict:
    """One training subset per seed and one test file, in REAL_PROPORTIONS."""
    import h5py

    workdir.mkdir(parents=True, exist_ok=True)
    with h5py.File(real_dir / REAL_TRAIN_FILE, "r") as handle:
        train_labels = handle["ans"][()]
    with h5py.File(real_dir / REAL_TEST_FILE, "r") as handle:
        test_labels = handle["ans"][()]
    train = {}
    for seed in seeds:
        rows = _stratified(train_labels, n_train, np.random.default_rng([seed, 27]))
        train[seed] = _subset(real_dir / REAL_TRAIN_FILE, rows, workdir / f"train_s{seed}.h5")
    # As many test rows as the rarest class allows in the same proportions.
    n_test = int(min(np.bincount(test_labels) / np.asarray(REAL_PROPORTIONS)))
    rows = _stratified(test_labels, n_test, np.random.default_rng(99))
    test = _subset(real_dir / REAL_TEST_FILE, rows, workdir / "test.h5")
    return {"train": train, "test": test}


def _stratified(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    counts = np.floor(np.asarray(REAL_PROPORTIONS) * n).astype(int)
    counts[0] += n - counts.sum()
    picked = [
        rng.choice(np.flatnonzero(labels == k), size=int(c), replace=False)
        for k, c in enumerate(counts)
    ]
    return np.sort(np.concatenate(picked))


def _subset(source: Path, rows: np.ndarray, out: Path) -> Path:
    """The given rows of a real-set file, with its class names and provenance. The draws are
    seeded, so a file already in the work folder is the same file: benchmarks running side by
    side in one work folder reuse it (written under a temporary name, then renamed)."""
    import h5py

    if out.exists():
        return out
    partial = out.with_name(f"{out.name}.{os.getpid()}.partial")
    with h5py.File(source, "r") as src, h5py.File(partial, "w") as dst:
        for key in ("images", "ans", "source", "source_id"):
            dst.create_dataset(key, data=src[key][rows])
        for key, value in src.attrs.items():
            dst.attrs[key] = value
    partial.replace(out)
    return out


def _rows_in(path: Path) -> int:
    import h5py

    with h5py.File(path, "r") as handle:
        return int(handle["ans"].shape[0])


def _real_overrides(common: Sequence[str], setting: Sequence[str], epochs: int) -> list[str]:
    """`epochs*2` doubles the common epochs; everything else is a --set override."""
    return [f"epochs={epochs * 2}" if o == "epochs*2" else o for o in (*common, *setting)]


def view_probabilities(run_dir: Path, test: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(per-view probabilities (views, images, classes), labels, class names) of a run's model
    on every row of `test`, for the 16 views of TTA_ANGLES.

    The model is opened as `galmorph evaluate` opens it (fp32, the same resize), and the
    16 views hold the 8 dihedral views (the multiples of 90 degrees, exact pixel moves), so
    one pass gives what `evaluate` and `evaluate --tta` report, and more.
    """
    from galmorph.core.cutouts.resample import resize_images
    from galmorph.core.data.galaxy10 import Galaxy10File
    from galmorph.training.augment import rotated_views
    from galmorph.training.evaluate import EvaluationRequest, _open_model

    predictor = _open_model(EvaluationRequest(model=run_dir, data=test, progress=False))[0]
    data = Galaxy10File(test)
    images = resize_images(
        data.images(np.arange(data.num_images)), predictor.input_size, predictor.interpolation
    )
    per_view = np.stack([predictor.predict(v) for v in rotated_views(images, TTA_ANGLES)])
    return per_view, data.labels, list(predictor.class_names)


def view_metrics(
    per_view: np.ndarray, labels: np.ndarray, class_names: Sequence[str], rare: str
) -> dict[str, float]:
    """Plain, 8-view and 16-view TTA top-1, macro-F1 and rare-class recall."""
    from galmorph.training.metrics import classification_report

    flips = (0, len(TTA_ANGLES))  # rotated_views: unflipped views first, then flipped
    dihedral = [f + i for f in flips for i, a in enumerate(TTA_ANGLES) if a % 90 == 0]
    result: dict[str, float] = {}
    for suffix, views in (("", [0]), ("_tta", dihedral), ("_tta16", range(len(per_view)))):
        report = classification_report(per_view[list(views)].mean(0), labels, class_names)
        result[f"top1{suffix}"] = round(report["top1"], 4)
        result[f"macro_f1{suffix}"] = round(report["macro_f1"], 4)
        result[f"{rare}_recall{suffix}"] = round(report["per_class"][rare]["recall"], 4)
    return result


def _finished(run_dir: Path) -> bool:
    """Whether a run folder holds a run trained to its last epoch (a run stopped early also
    leaves model.safetensors: the trainer saves on SIGTERM)."""
    try:
        epochs = json.loads((run_dir / "config.json").read_text())["epochs"]
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except (OSError, KeyError, ValueError):
        return False
    done = [json.loads(line)["epoch"] for line in lines if '"kind": "epoch"' in line]
    return bool(done) and done[-1] == epochs


def recipe_member(
    args: argparse.Namespace, sets: dict, workdir: Path, data_seed: int, train_seed: int
) -> tuple[Path, float]:
    """The recipe trained on data seed `data_seed`'s subset with training seed `train_seed`;
    an earlier run in the work folder is reused (the "recipe" setting's run is member one)."""
    name = "recipe" if train_seed == data_seed else f"recipe_t{train_seed}"
    out = workdir / "runs" / f"{name}_s{data_seed}"
    if _finished(out):
        return out, float("nan")
    overrides = _real_overrides(args.common, (), args.epochs)
    return train_run(RECIPE, sets["train"][data_seed], out, overrides, train_seed)


def real_benchmark(args: argparse.Namespace, sets: dict, workdir: Path) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name in args.settings or [*REAL_SETTINGS, *PEERS]:
        runs = []
        for seed in args.seeds_list:
            out = workdir / "runs" / f"{name.replace(' ', '_')}_s{seed}"
            if name in PEERS:
                run = train_peer(name, sets["train"][seed], sets["test"], seed, args)
            elif name == ENSEMBLE:
                run = ensemble_run(args, sets, workdir, seed)
            else:
                setting = [
                    f"init_from={args.init_from}" if o.startswith("init_from=") else o
                    for o in REAL_SETTINGS[name]
                ]
                overrides = _real_overrides(args.common, setting, args.epochs)
                if name == "recipe":
                    run_dir, seconds = recipe_member(args, sets, workdir, seed, seed)
                else:
                    run_dir, seconds = train_run(RECIPE, sets["train"][seed], out, overrides, seed)
                run = {"train_seconds": round(seconds, 1)}
                run.update(
                    view_metrics(*view_probabilities(run_dir, sets["test"]), REAL_RARE_CLASS)
                )
            print(name, seed, json.dumps(run), flush=True)
            runs.append(run)
        overrides = list(REAL_SETTINGS.get(name, ()))
        results[name] = {"overrides": overrides, "runs": runs, **summarise(runs)}
        _progress_file(args, results)
    return results


def ensemble_run(args: argparse.Namespace, sets: dict, workdir: Path, seed: int) -> dict[str, Any]:
    """The recipe trained ENSEMBLE_SEED_OFFSETS times on seed `seed`'s draw (members differ only
    in the training seed), exported as one file as `galmorph export RUN RUN RUN` exports it and
    evaluated through that file; with its cost per galaxy against one member's file."""
    from galmorph.model.export import export_onnx

    members = [
        recipe_member(args, sets, workdir, seed, seed + offset) for offset in ENSEMBLE_SEED_OFFSETS
    ]
    # Untempered (no fit images): the probabilities are exactly the members' mean.
    files = {
        "one run": export_onnx(
            members[0][0], workdir / "onnx" / f"one_s{seed}.onnx", intra_op_threads=args.threads
        ),
        ENSEMBLE: export_onnx(
            [run_dir for run_dir, _ in members],
            workdir / "onnx" / f"ensemble_s{seed}.onnx",
            intra_op_threads=args.threads,
        ),
    }
    run: dict[str, Any] = {"train_seconds": round(sum(t for _, t in members if t == t), 1)}
    run.update(view_metrics(*view_probabilities(files[ENSEMBLE], sets["test"]), REAL_RARE_CLASS))
    speed = onnx_speed(files, sets["test"], args)
    run["served"] = {
        **speed,
        "ms_per_galaxy": {name: round(1000 / speed[name]["items_per_s"], 2) for name in files},
        "cost_over_one_run": round(
            speed["one run"]["items_per_s"] / speed[ENSEMBLE]["items_per_s"], 2
        ),
    }
    return run


def train_peer(
    name: str, train_file: Path, test_file: Path, seed: int, args: argparse.Namespace
) -> dict[str, Any]:
    """A timm peer trained as the recipe trains (AdamW, cosine with warmup, the recipe's batch,
    lr, weight decay, label smoothing, dihedral flips and epochs), evaluated like galmorph's
    runs. timm comes from outside the project's venv (PYTHONPATH), as the issue allows."""
    import timm
    import torch
    import torch.nn.functional as F

    from galmorph.core.cutouts.resample import resize_images
    from galmorph.core.data.galaxy10 import Galaxy10File
    from galmorph.training.augment import BatchAugmenter, dihedral_views, rotated_views
    from galmorph.training.config import load_config
    from galmorph.training.metrics import classification_report

    config = load_config(RECIPE, [*args.common, f"seed={seed}"], data=str(train_file), out="-")
    torch.manual_seed(seed)
    size = config.img_size or args.size
    train, test = Galaxy10File(train_file), Galaxy10File(test_file)
    classes = train.num_classes
    if name == "timm resnet18":
        model = timm.create_model("resnet18", num_classes=classes)
    else:  # the Astroformer layout in timm's own CoAtNet code, sized like galmorph's model
        model = timm.create_model(
            "coatnet_0_224", block_type=("C", "C", "C", "T"), img_size=size,
            num_classes=classes, **PEER_COATNET_SIZES[args.model],
        )  # fmt: skip
    mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)

    def forward(uint8_nhwc: torch.Tensor) -> torch.Tensor:
        x = uint8_nhwc.permute(0, 3, 1, 2).float().div(255)
        return model((x - mean) / std)

    images = torch.from_numpy(train.images(np.arange(train.num_images)))
    labels = torch.from_numpy(train.labels.astype(np.int64))
    augment = BatchAugmenter(config.augment, size)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    steps_per_epoch = -(-train.num_images // config.batch_size)
    total, warmup = config.epochs * steps_per_epoch, config.warmup_epochs * steps_per_epoch
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    step = 0
    model.train()
    for _ in range(config.epochs):
        order = torch.randperm(train.num_images, generator=generator)
        for start in range(0, train.num_images, config.batch_size):
            batch = order[start : start + config.batch_size]
            scale = (step + 1) / warmup if step < warmup else 0.5 * (
                1 + np.cos(np.pi * (step - warmup) / max(1, total - warmup))
            )  # fmt: skip
            for group in optimizer.param_groups:
                group["lr"] = config.lr * float(scale)
            logits = forward(augment(images[batch], generator))
            loss = F.cross_entropy(
                logits, labels[batch], label_smoothing=config.mixup.label_smoothing
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
    seconds = time.perf_counter() - started
    model.eval()
    test_images = resize_images(test.images(np.arange(test.num_images)), size)
    result: dict[str, Any] = {"train_seconds": round(seconds, 1), "params": sum(
        p.numel() for p in model.parameters()
    )}  # fmt: skip
    views_by_suffix = {
        "": [test_images],
        "_tta": dihedral_views(test_images),
        "_tta16": rotated_views(test_images, TTA_ANGLES),
    }
    with torch.no_grad():
        for suffix, views in views_by_suffix.items():
            probabilities = np.mean(
                [torch.softmax(forward(torch.from_numpy(v)), -1).numpy() for v in views], axis=0
            )
            report = classification_report(probabilities, test.labels, train.class_names)
            result[f"top1{suffix}"] = round(report["top1"], 4)
            result[f"macro_f1{suffix}"] = round(report["macro_f1"], 4)
            recall = report["per_class"][REAL_RARE_CLASS]["recall"]
            result[f"{REAL_RARE_CLASS}_recall{suffix}"] = round(recall, 4)
    return result


def merge_real(documents: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One --real results document from several runs of the benchmark (each setting's runs
    of every document, seeds in order; a --partial file is the `real` section alone)."""
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    first = next((d for d in documents if "real" in d), {})
    for document in documents:
        section = document.get("real", document)
        seeds = document.get("data", {}).get("seeds")
        for name, row in section.items():
            for i, run in enumerate(row["runs"]):
                seed = seeds[i] if seeds else run.get("seed", i)
                runs.setdefault(name, {})[seed] = run
    merged = {
        name: {
            "overrides": list(REAL_SETTINGS.get(name, ())),
            "seeds_run": sorted(by_seed),
            "runs": [by_seed[k] for k in sorted(by_seed)],
            **summarise([by_seed[k] for k in sorted(by_seed)]),
        }
        for name, by_seed in runs.items()
    }
    data = dict(first.get("data", {}))
    data.pop("seeds", None)
    return {"data": data, "common_overrides": first.get("common_overrides"), "real": merged}


def real_table(results: dict[str, Any], rare: str = REAL_RARE_CLASS) -> str:
    """The docs/real_data.md table: mean +- sd over seeds, plain and TTA, macro-F1 and
    rare-class recall, and each setting's change from the recipe on the same seeds (paired by
    seed)."""
    keys = ("top1", "top1_tta", "top1_tta16", "macro_f1", "macro_f1_tta")
    keys += (f"{rare}_recall", f"{rare}_recall_tta")
    rows = [
        "| setting | seeds | top-1 | top-1 TTA (8) | top-1 TTA (16) | macro-F1 | macro-F1 TTA | "
        f"{rare} recall | {rare} recall TTA | Δ top-1 | Δ top-1 TTA |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = results.get("recipe")
    for name, row in results.items():
        cells = [_mean_sd(row, k) for k in keys]
        setting = " ".join(f"`{o}`" for o in row.get("overrides", ()))
        label = f"{name}: {setting}" if setting else name
        deltas = [_paired_delta(row, base, key) for key in ("top1", "top1_tta")]
        rows.append(f"| {label} | {row['seeds']} | " + " | ".join(cells + deltas) + " |")
    return "\n".join(rows)


def _mean_sd(row: dict[str, Any], key: str) -> str:
    if key not in row:
        return "–"
    if row["seeds"] == 1:  # no spread to show
        return f"{row[key]['mean']:.3f}"
    return f"{row[key]['mean']:.3f} ± {row[key]['sd']:.3f}"


def _paired_delta(row: dict[str, Any], base: dict[str, Any] | None, key: str) -> str:
    """Mean over the seeds both have of (setting - recipe); '–' for the recipe itself."""
    if base is None or row is base or "seeds_run" not in row:
        return "–"
    base_by_seed = dict(zip(base["seeds_run"], base["runs"], strict=True))
    shared = [(run, base_by_seed[s]) for s, run in zip(row["seeds_run"], row["runs"], strict=True)
              if s in base_by_seed]  # fmt: skip
    if not shared:
        return "–"
    return f"{statistics.fmean(r[key] - b[key] for r, b in shared):+.3f}"


def _progress_file(args: argparse.Namespace, results: dict[str, Any]) -> None:
    if args.partial is not None:
        args.partial.write_text(json.dumps(results, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds start here")
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
        "--table",
        type=Path,
        metavar="RESULTS",
        help="print a --sweep or --real results file as markdown",
    )
    parser.add_argument("--out", type=Path, help="results file")
    parser.add_argument(
        "--real", type=Path, metavar="DIR", help="real sets from build_real_sets.py instead"
    )
    parser.add_argument(
        "--settings",
        nargs="+",
        choices=[*REAL_SETTINGS, *PEERS, ENSEMBLE],
        help="--real: just these",
    )
    parser.add_argument("--real-train", type=int, default=300, help="--real: training rows")
    parser.add_argument(
        "--init-from",
        default="synthetic",
        help=f"--real: what setting {PRETRAINED!r} fine-tunes from (default: init_from's "
        "built-in synthetic start; or a run folder)",
    )
    parser.add_argument(
        "--merge",
        nargs="+",
        type=Path,
        metavar="RESULTS",
        help="--real results (or --partial files) of other seeds/settings, merged into --out",
    )
    args = parser.parse_args(argv)
    if args.merge is not None:
        if args.out is None:
            parser.error("--merge needs --out")
        write_results(args.out, merge_real([json.loads(p.read_text()) for p in args.merge]))
        print(real_table(json.loads(args.out.read_text())["real"]))
        return 0
    if args.table is not None:
        document = json.loads(args.table.read_text())
        print(
            real_table(document["real"]) if "real" in document else sweep_table(document["sweep"])
        )
        return 0

    import torch

    torch.set_num_threads(args.threads)
    args.seeds_list = list(range(args.first_seed, args.first_seed + args.seeds))
    args.common = [
        f"model={args.model}",
        f"img_size={args.size}",
        f"threads={args.threads}",
        f"epochs={args.epochs}",
    ]
    default_name = "small_data_sweep.json" if args.sweep else "small_data.json"
    if args.real is not None:
        default_name = "small_data_real.json"
    out_file = args.out or RESULTS_DIR / default_name
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        if args.real is not None:
            real = real_sets(
                args.real, workdir / "data", seeds=args.seeds_list, n_train=args.real_train
            )
            payload = {
                "data": {
                    "source": "scripts/real_data/build_real_sets.py gz2-sdss (docs/real_data.md)",
                    "proportions": dict(zip(REAL_CLASSES, REAL_PROPORTIONS, strict=True)),
                    "train_images": args.real_train,
                    "test_images": _rows_in(real["test"]),
                    "seeds": args.seeds_list,
                },
                "common_overrides": args.common,
                "real": real_benchmark(args, real, workdir),
            }
            write_results(out_file, payload)
            print(f"wrote {out_file}")
            return 0
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
    from galmorph.model.export import export_onnx

    files = {
        name: export_onnx(run, run / "model.onnx", intra_op_threads=args.threads)
        for name, run in (("teacher", teacher_dir), ("student", student_dir))
    }
    speed = onnx_speed(files, test, args)
    speed["student_over_teacher"] = round(
        speed["student"]["items_per_s"] / speed["teacher"]["items_per_s"], 2
    )
    return speed


def onnx_speed(files: dict[str, Path], test: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Images/s of exported files through the server's engine, timed in interleaved rounds on
    the same 64 test images (one batch of 64 a call)."""
    from benchmarks.common import time_interleaved
    from galmorph.core.cutouts.resample import resize_images
    from galmorph.core.data.galaxy10 import Galaxy10File
    from galmorph.core.modelfile.engine import OnnxModel

    images = Galaxy10File(test).images(np.arange(64))
    engines, inputs = {}, {}
    for name, path in files.items():
        engines[name] = OnnxModel(path, intra_op_threads=args.threads, inter_op_threads=1)
        size = engines[name].input_size[0]
        inputs[name] = resize_images(images, size, engines[name].card.interpolation)
    timings = time_interleaved(
        {name: (lambda n=name: engines[n].predict(inputs[n])) for name in engines},
        warmup=2,
        repeats=args.speed_repeats,
        settle_s=0.25,
    )
    return {name: timing.to_dict(items_per_call=64) for name, timing in timings.items()}


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT))
    sys.exit(main())
