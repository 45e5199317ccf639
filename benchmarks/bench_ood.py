"""How well the exported `ood_score` tells galaxies from what is not one.

A small model (gm_astroformer_tiny at 32 px) is trained on synthetic Galaxy10 images and
exported with its OOD score (Mahalanobis distance of the embeddings, fitted on the training
split, threshold at 5% of the validation split: galmorph.core.modelfile.ood). It then scores:

in distribution
- `synthetic_test`: the run's held-out test split (never seen by the fit or the threshold);
- `real_galaxy10`: the 20 real Galaxy10 DECaLS images in tests/data (real survey galaxies:
  a domain the synthetic-trained model has not seen, reported for what it is);

out of distribution, all rendered by the synthetic survey itself (the same PSF, sky noise,
field stars and dr2_rgb stretch as its galaxies) unless said otherwise
- `star`: a bright star at the centre of an empty field;
- `blank_sky`: the field with no galaxy (field stars and faint background galaxies only);
- `artefacts`: satellite trails, saturated bleed columns, cosmic-ray hits, half the field
  without coverage (zero flux, as Legacy Survey cutouts have off the footprint);
- `non_galaxy`: pictures that are not sky: colour noise, gradients, stripes, flat colour;
- `hst_star` (real): the HST F105W PSF in tests/data, decoded as the server decodes it
  (single band, grey), against `hst_galaxies` (the four real HST galaxy cutouts beside it).

For each set: the AUROC of the score against `synthetic_test` (and against `real_galaxy10`),
the fraction flagged at the exported threshold, and the AUROCs of two baselines computed from
the same model's outputs: the energy score and 1 - max softmax probability.

    .venv/bin/python -m benchmarks.bench_ood [--n 2000] [--epochs 8] [--out results/ood.json]
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import REPO_ROOT, RESULTS_DIR, write_results

DATA = REPO_ROOT / "tests" / "data"
PER_SET = 60
SYNTH_SIZE = 64  # the training file's images; the model sees them at IMG_SIZE
IMG_SIZE = 32


def render_sets(seed: int) -> dict[str, np.ndarray]:
    """uint8 (N, 64, 64, 3) images of each synthetic out-of-distribution kind."""
    from galmorph.core.cutouts.imaging import dr2_rgb, flip_north_up, to_uint8
    from galmorph.training import synth

    rng = np.random.default_rng(seed)
    grid = synth._grid(SYNTH_SIZE)

    def rendered(scene: Any, damage: Any = None) -> np.ndarray:
        cube = scene.render(rng)
        if damage is not None:
            damage(cube)
        planes = {band: cube[i] for i, band in enumerate(synth.BANDS)}
        return to_uint8(flip_north_up(dr2_rgb(planes)))

    def field() -> Any:
        scene = synth._Scene(grid)
        synth._add_field(scene, rng)
        return scene

    def star() -> np.ndarray:
        scene = field()
        mag = rng.uniform(14.0, 18.0)
        g_r = rng.uniform(0.3, 1.4)
        flux = synth._flux(rng, mag, g_r, 0.4 * g_r)
        scene.add_sources("point", rng.normal(0, 1.5), rng.normal(0, 1.5), flux[None])
        return rendered(scene)

    def trail() -> np.ndarray:
        scene = field()
        angle, offset = rng.uniform(0, math.pi), rng.normal(0, 6.0)
        distance = np.abs(grid.x * math.sin(angle) - grid.y * math.cos(angle) - offset)
        line = np.exp(-0.5 * (distance / 0.6) ** 2).astype(np.float32)
        brightness = rng.uniform(0.3, 3.0)
        scene.add_profile(line / line.sum() * 50, np.full(3, brightness, np.float32))
        return rendered(scene)

    def bleed() -> np.ndarray:
        scene = field()
        column = int(rng.integers(16, 48))
        flux = synth._flux(rng, rng.uniform(11.0, 13.0), 0.8, 0.4)
        scene.add_sources("point", column - (SYNTH_SIZE - 1) / 2, 0.0, flux[None])

        def saturate(cube: np.ndarray) -> None:
            start, stop = sorted(rng.integers(0, SYNTH_SIZE, 2))
            cube[:, start : stop + 8, column - 1 : column + 2] = cube.max()

        return rendered(scene, saturate)

    def cosmic_rays() -> np.ndarray:
        def hits(cube: np.ndarray) -> None:
            for _ in range(int(rng.integers(15, 40))):
                row, col = rng.integers(0, SYNTH_SIZE - 3, 2)
                band = int(rng.integers(0, 3))
                cube[band, row : row + rng.integers(1, 3), col : col + rng.integers(1, 3)] += (
                    rng.uniform(0.5, 5.0)
                )

        return rendered(field(), hits)

    def no_coverage() -> np.ndarray:
        scene = synth._Scene(grid)
        synth._CLASS_RENDERERS[int(rng.integers(0, 10))](scene, rng, float(rng.uniform(0.02, 0.1)))
        synth._add_field(scene, rng)

        def cut(cube: np.ndarray) -> None:
            edge = int(rng.integers(24, 40))
            if rng.random() < 0.5:
                cube[:, :, edge:] = 0.0
            else:
                cube[:, edge:, :] = 0.0

        return rendered(scene, cut)

    def non_galaxy() -> np.ndarray:
        kind = int(rng.integers(0, 4))
        y, x = np.mgrid[0:SYNTH_SIZE, 0:SYNTH_SIZE] / SYNTH_SIZE
        if kind == 0:
            return rng.integers(0, 256, (SYNTH_SIZE, SYNTH_SIZE, 3), dtype=np.uint8)
        if kind == 1:
            colours = rng.uniform(0, 255, (2, 3))
            t = (x * rng.uniform(-1, 1) + y * rng.uniform(-1, 1))[..., None]
            t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
            return (colours[0] * (1 - t) + colours[1] * t).astype(np.uint8)
        if kind == 2:
            period = rng.uniform(0.05, 0.3)
            stripes = (np.sin(2 * math.pi * (x + y * rng.uniform(-1, 1)) / period) > 0)[..., None]
            colours = rng.uniform(0, 255, (2, 3))
            return np.where(stripes, colours[0], colours[1]).astype(np.uint8)
        return np.broadcast_to(rng.uniform(0, 255, 3), (SYNTH_SIZE, SYNTH_SIZE, 3)).astype(np.uint8)

    artefacts = [trail, bleed, cosmic_rays, no_coverage]
    return {
        "star": np.stack([star() for _ in range(PER_SET)]),
        "blank_sky": np.stack([rendered(field()) for _ in range(PER_SET)]),
        "artefacts": np.stack([artefacts[i % 4]() for i in range(PER_SET)]),
        "non_galaxy": np.stack([non_galaxy() for _ in range(PER_SET)]),
    }


def decoded(files: list[Path], card: Any) -> np.ndarray:
    """Real files decoded exactly as the server decodes an upload of them."""
    from galmorph.core.cutouts.decode import decode_path

    return np.stack([decode_path(path, spec=card.input_spec).image for path in files])


def scores(model: Any, images: np.ndarray) -> dict[str, np.ndarray]:
    """The exported OOD score and the two baselines, from one run of the model."""
    from galmorph.core.modelfile.contract import INPUT_NAME, LOGITS_NAME
    from galmorph.core.modelfile.ood import energy_score

    outputs = model.run(images)
    (logits,) = model.session.run([LOGITS_NAME], {INPUT_NAME: images})
    return {
        "ood_score": outputs.ood_score,
        "flagged": ~outputs.in_distribution,
        "energy": energy_score(logits),
        "one_minus_msp": 1.0 - outputs.probabilities.max(axis=1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="synthetic training images")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "ood.json")
    args = parser.parse_args(argv)

    import torch

    from galmorph.core.cutouts.resample import resize_images
    from galmorph.core.data.galaxy10 import Galaxy10File
    from galmorph.core.data.splits import Split
    from galmorph.core.modelfile.engine import OnnxModel
    from galmorph.core.modelfile.ood import auroc
    from galmorph.model.checkpoint import load_spec
    from galmorph.model.export import export_model, load_fit_images
    from galmorph.training.config import TrainConfig
    from galmorph.training.synth import synthesize
    from galmorph.training.train import train

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_ood-") as work_dir:
        work = Path(work_dir)
        data = synthesize(
            work / "synth.h5", n=args.n, size=SYNTH_SIZE, seed=args.seed, progress=False
        )
        config = TrainConfig.from_dict(
            {
                "data": str(data), "out": str(work / "run"), "model": "gm_astroformer_tiny",
                "img_size": IMG_SIZE, "batch_size": 32, "epochs": args.epochs, "lr": 2e-3,
                "warmup_epochs": min(1.0, args.epochs / 4), "num_workers": 0,
                "threads": args.threads, "progress": False, "seed": args.seed,
            }
        )  # fmt: skip
        run = train(config)
        train_seconds = time.perf_counter() - started
        split = Split.load(run / "split.json")
        spec = load_spec(run)
        fit = load_fit_images(
            data, split, size=spec.img_size, interpolation=spec.interpolation, count=2000
        )
        report = export_model(
            run, work / "model.onnx", fit_images=fit, intra_op_threads=args.threads
        )
        model = OnnxModel(
            report.path, providers=["CPUExecutionProvider"], intra_op_threads=args.threads
        )
        card = model.card

        with Galaxy10File(data) as file:
            test_images = file.images(np.sort(split.test))
            test_labels = file.labels[np.sort(split.test)]
        inside = {
            "synthetic_test": resize_images(test_images, IMG_SIZE, card.interpolation),
            "real_galaxy10": decoded(sorted((DATA / "galaxy10-real").iterdir()), card),
        }
        outside = {
            name: resize_images(images, IMG_SIZE, card.interpolation)
            for name, images in render_sets(args.seed + 1).items()
        }
        hst = sorted((DATA / "hst-fits").glob("*.fits.gz"))
        outside["hst_star"] = decoded([p for p in hst if "psf" in p.name], card)
        hst_galaxies = decoded([p for p in hst if "galax" in p.name and "rms" not in p.name], card)

        measured = {name: scores(model, images) for name, images in {**inside, **outside}.items()}
        measured["hst_galaxies"] = scores(model, hst_galaxies)
        test_top1 = float((model.predict(inside["synthetic_test"]).argmax(1) == test_labels).mean())

    def summary(name: str) -> dict[str, Any]:
        got = measured[name]
        return {
            "num_images": len(got["ood_score"]),
            "flagged_fraction": round(float(got["flagged"].mean()), 4),
            "ood_score_median": round(float(np.median(got["ood_score"])), 4),
        }

    def aurocs(name: str, reference: str) -> dict[str, float]:
        return {
            metric: round(auroc(measured[reference][metric], measured[name][metric]), 4)
            for metric in ("ood_score", "energy", "one_minus_msp")
        }

    results: dict[str, Any] = {
        "in_distribution": {name: summary(name) for name in inside},
        "out_of_distribution": {
            name: {
                **summary(name),
                "auroc_vs_synthetic_test": aurocs(name, "synthetic_test"),
                "auroc_vs_real_galaxy10": aurocs(name, "real_galaxy10"),
            }
            for name in outside
        },
        "hst": {
            "hst_galaxies": summary("hst_galaxies"),
            "hst_star": summary("hst_star"),
            # One real star against four real galaxies: a rank, not a statistic.
            "star_scores_above_galaxies": int(
                (measured["hst_star"]["ood_score"][0] > measured["hst_galaxies"]["ood_score"]).sum()
            ),
        },
    }
    all_outside = np.concatenate([measured[name]["ood_score"] for name in outside])
    results["all_out_of_distribution_auroc"] = round(
        auroc(measured["synthetic_test"]["ood_score"], all_outside), 4
    )
    write_results(
        args.out,
        {
            "benchmark": "ood",
            "model": {
                "name": card.model_name,
                "img_size": IMG_SIZE,
                "train_images": args.n,
                "epochs": args.epochs,
                "synthetic_test_top1": round(test_top1, 4),
            },
            "ood": card.ood,
            "calibration": card.calibration,
            "results": results,
            "seconds": {
                "train": round(train_seconds, 1),
                "total": round(time.perf_counter() - started, 1),
            },
        },
    )
    print(f"wrote {args.out}")
    print(f"AUROC, all OOD vs synthetic test: {results['all_out_of_distribution_auroc']}")
    for name, got in results["out_of_distribution"].items():
        print(f"  {name:<12} {got['auroc_vs_synthetic_test']}  flagged {got['flagged_fraction']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
