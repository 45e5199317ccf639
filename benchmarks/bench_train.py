"""Training on a CPU: throughput of the demo variant, and the accuracy a few minutes buy.

1. Throughput: optimizer steps of gm_astroformer_tiny (augmentation + forward + backward +
   AdamW, as `galmorph train` runs them) at 64 and 128 px, images/s after warm-up steps.
2. Accuracy: `train` with configs/cpu_demo.yaml on a synthetic 64 px Galaxy10 file, then
   `evaluate` on its held-out test split; wall time, top-1 and macro-F1.

Results go to benchmarks/results/train.json.

    .venv/bin/python -m benchmarks.bench_train [--n 3000] [--epochs 6] [--threads 2]
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
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks" / "results" / "train.json"
MODEL = "gm_astroformer_tiny"


def step_rate(size: int, batch: int, steps: int, warmup: int = 3) -> dict[str, float]:
    """Images/s of full training steps on random uint8 images (data loading excluded)."""
    import numpy as np
    import torch
    from galmorph.model.preprocess import ImagePreprocess
    from galmorph.model.registry import create_model
    from galmorph.training.augment import AugmentSettings, BatchAugmenter
    from galmorph.training.mixup import smooth_one_hot, soft_target_cross_entropy
    from galmorph.training.optim import adamw

    torch.manual_seed(0)
    model = create_model(MODEL, img_size=size).train()
    optimizer = adamw(model, 1e-3, 0.05, (0.9, 0.999))
    augmenter = BatchAugmenter(AugmentSettings(policy="galaxy"), size)
    preprocess = ImagePreprocess((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8))
    targets = smooth_one_hot(torch.from_numpy(rng.integers(0, 10, batch)), 10, 0.1)
    generator = torch.Generator().manual_seed(0)
    timings = []
    for _ in range(warmup + steps):
        start = time.perf_counter()
        loss = soft_target_cross_entropy(model(preprocess(augmenter(images, generator))), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        timings.append(time.perf_counter() - start)
    measured = sorted(timings[warmup:])
    median = measured[len(measured) // 2]
    return {
        "batch": batch,
        "steps": steps,
        "images_per_s_median_step": round(batch / median, 1),
        "images_per_s_mean": round(batch * steps / sum(measured), 1),
    }


def accuracy_run(n: int, epochs: int, workdir: Path) -> dict[str, Any]:
    from galmorph.training.config import load_config
    from galmorph.training.evaluate import EvaluationRequest, evaluate
    from galmorph.training.synth import synthesize
    from galmorph.training.train import train

    data = synthesize(workdir / "synth.h5", n=n, size=64, seed=0, progress=False)
    config = load_config(
        REPO_ROOT / "configs" / "cpu_demo.yaml",
        [f"epochs={epochs}", "progress=false"],
        data=str(data),
        out=str(workdir / "run"),
    )
    start = time.perf_counter()
    run_dir = train(config)
    train_seconds = time.perf_counter() - start
    report = evaluate(EvaluationRequest(model=run_dir, data=data, split="test", progress=False))
    tta = evaluate(
        EvaluationRequest(
            model=run_dir, data=data, split="test", tta=True, out_dir=workdir / "tta",
            progress=False,
        )
    )  # fmt: skip
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epoch_records = [r for r in records if r["kind"] == "epoch"]
    return {
        "config": "configs/cpu_demo.yaml",
        "data": {"images": n, "size": 64, "train": config.split_fractions[0]},
        "epochs": epochs,
        "train_seconds": round(train_seconds, 1),
        "train_images_per_s_last_epoch": round(epoch_records[-1]["images_per_s"], 1),
        "test_images": report["num_images"],
        "test_top1": round(report["top1"], 4),
        "test_macro_f1": round(report["macro_f1"], 4),
        "test_ece": round(report["ece"], 4),
        "test_top1_tta8": round(tta["top1"], 4),
        "val_top1_per_epoch": [round(r.get("val_top1", float("nan")), 4) for r in epoch_records],
        "chance_top1": 0.1,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3000, help="synthetic images (64 px)")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per throughput size")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": args.threads,
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "platform": platform.platform(),
            "note": "shared 2-core machine: other jobs may have been running",
        },
        "model": MODEL,
        "throughput": {},
    }
    for size, batch in ((64, 32), (128, 16)):
        results["throughput"][str(size)] = step_rate(size, batch, args.steps)
        print(size, json.dumps(results["throughput"][str(size)]), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        results["accuracy"] = accuracy_run(args.n, args.epochs, Path(tmp))
    print(json.dumps(results["accuracy"], indent=1))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT))
    sys.exit(main())
