"""Training on a CPU: fp32 against the default precision, in speed and in accuracy.

1. Throughput: full training steps as `galmorph train` runs them (augmentation, forward,
   fp32 loss, backward, AdamW; the model prepared by training/precision.py as the trainer
   prepares it) on random images, for the small-data recipe's case (configs/small_data.yaml:
   gm_astroformer_small at 128 px, batch 32), astroformer_0 at 256 px (batch 8) and the demo's
   gm_astroformer_tiny at 128 px (batch 16). Each case times precision=fp32 (what training
   on a CPU ran before `precision` existed) against precision=auto (this CPU's default)
   in interleaved rounds: images/s from the median step, wall-clock and per CPU-second.
2. --explore: the other levers, on the recipe's case, each against the default: channels_last
   (in fp32 and with the default), bf16 with every convolution autocast (no fp32 strided
   depthwise ones), fused and foreach AdamW; the share of a step's CPU time that goes to the
   input (augmentation, normalisation); --compile adds torch.compile (its compile seconds from
   an empty cache, and steady images/s).
3. --accuracy: configs/small_data.yaml at fp32 and at precision=auto over 3 seeds on the
   low-data synthetic 4-class sets of bench_small_data.py; top-1, macro-F1, merger recall on
   the separate test file, evaluated in fp32 (as the exported model runs), plain and TTA.
4. The CPU demo: `train` with configs/cpu_demo.yaml on a synthetic 64 px file, `evaluate` on
   its test split; wall time, top-1 and macro-F1 (--skip-demo leaves it out).

The machine is shared: rounds are interleaved so a neighbour's burst slows every contender
alike; CPU-seconds per step are less sensitive to it than wall-clock. Results go to
benchmarks/results/train.json (parts not run keep their previous figures).

    .venv/bin/python -m benchmarks.bench_train [--threads 2] [--rounds 5]
    .venv/bin/python -m benchmarks.bench_train --explore --compile --accuracy --skip-demo
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if not __package__:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO_ROOT, RESULTS_DIR, write_results

RESULTS = RESULTS_DIR / "train.json"
RECIPE = REPO_ROOT / "configs" / "small_data.yaml"
# (name, model, input size, batch): the recipe's case first (the one --explore varies).
CASES = (
    ("small_data_recipe", "gm_astroformer_small", 128, 32),
    ("astroformer_0_256px", "astroformer_0", 256, 8),
    ("demo_tiny_128px", "gm_astroformer_tiny", 128, 16),
)
# --explore: variant -> (precision, channels_last override, keep strided depthwise fp32, AdamW).
VARIANTS: dict[str, tuple[str, bool | None, bool, str]] = {
    "fp32": ("fp32", None, False, "for-loop"),
    "fp32 + channels_last": ("fp32", True, False, "for-loop"),
    "bf16, every conv autocast": ("bf16", None, False, "for-loop"),
    "default + channels_last": ("auto", True, True, "for-loop"),
    "default + fused AdamW": ("auto", None, True, "fused"),
    "default + foreach AdamW": ("auto", None, True, "foreach"),
}


class Stepper:
    """One training step of `model` at `size`, as the trainer runs it, on fixed random images."""

    def __init__(
        self,
        model_name: str,
        size: int,
        batch: int,
        precision: str,
        *,
        channels_last: bool | None = None,
        depthwise_fp32: bool = True,
        adamw_impl: str = "for-loop",
        compile_model: bool = False,
    ) -> None:
        import numpy as np
        import torch

        from galmorph.model.preprocess import ImagePreprocess
        from galmorph.model.registry import create_model
        from galmorph.training.augment import AugmentSettings, BatchAugmenter
        from galmorph.training.mixup import smooth_one_hot
        from galmorph.training.optim import adamw
        from galmorph.training.precision import resolve_precision

        self.precision = resolve_precision(precision, torch.device("cpu"))
        self.channels_last = (
            self.precision.channels_last if channels_last is None else channels_last
        )
        torch.manual_seed(0)
        model = create_model(model_name, img_size=size).train()
        if depthwise_fp32:
            self.precision.prepare(model, training=True)
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        model.to(memory_format=layout)
        optimizer = adamw(model, 1e-3, 0.05, (0.9, 0.999))
        if adamw_impl != "for-loop":
            optimizer = torch.optim.AdamW(
                optimizer.param_groups,
                fused=adamw_impl == "fused" or None,
                foreach=adamw_impl == "foreach" or None,
            )
        self.model = torch.compile(model) if compile_model else model
        self.optimizer = optimizer
        self.augmenter = BatchAugmenter(AugmentSettings(policy="galaxy"), size)
        self.preprocess = ImagePreprocess((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        rng = np.random.default_rng(0)
        self.images = torch.from_numpy(rng.integers(0, 256, (batch, size, size, 3), np.uint8))
        self.targets = smooth_one_hot(torch.from_numpy(rng.integers(0, 10, batch)), 10, 0.1)
        self.batch = batch
        self.setup = {
            "precision": self.precision.describe(),
            "channels_last": self.channels_last,
            "depthwise_fp32": depthwise_fp32 and self.precision.bf16,
            "adamw": adamw_impl,
        }
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.input_cpu: list[float] = []  # augmentation and normalisation: the data side

    def step(self) -> None:
        import torch

        from galmorph.training.mixup import soft_target_cross_entropy

        wall, cpu = time.perf_counter(), time.process_time()
        x = self.preprocess(self.augmenter(self.images, torch.Generator().manual_seed(0)))
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        self.input_cpu.append(time.process_time() - cpu)
        with self.precision.autocast():
            logits = self.model(x)
        soft_target_cross_entropy(logits.float(), self.targets).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.wall.append(time.perf_counter() - wall)
        self.cpu.append(time.process_time() - cpu)

    def figures(self, warmup: int) -> dict[str, Any]:
        wall, cpu = self.wall[warmup:], self.cpu[warmup:]
        return {
            **self.setup,
            "images_per_s": round(self.batch / statistics.median(wall), 2),
            "images_per_s_min": round(self.batch / max(wall), 2),
            "images_per_s_max": round(self.batch / min(wall), 2),
            "images_per_cpu_s": round(self.batch / statistics.median(cpu), 2),
            "input_share_of_cpu": round(
                statistics.median(self.input_cpu[warmup:]) / statistics.median(cpu), 3
            ),
            "steps": len(wall),
        }


def interleave(steppers: dict[str, Stepper], *, warmup: int, rounds: int) -> dict[str, Any]:
    """Warm every contender up, then one step each per round, rotating who goes first."""
    names = list(steppers)
    for name in names:
        for _ in range(warmup):
            steppers[name].step()
    for index in range(rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            steppers[name].step()
    return {name: stepper.figures(warmup) for name, stepper in steppers.items()}


def throughput(rounds: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name, model, size, batch in CASES:
        steppers = {p: Stepper(model, size, batch, p) for p in ("fp32", "auto")}
        figures = interleave(steppers, warmup=2, rounds=rounds)
        results[name] = {
            "model": model,
            "img_size": size,
            "batch": batch,
            **figures,
            "speedup": _ratio(figures, "images_per_s"),
            "speedup_cpu_time": _ratio(figures, "images_per_cpu_s"),
        }
        print(name, json.dumps(results[name]), flush=True)
    return results


def explore(rounds: int, with_compile: bool) -> dict[str, Any]:
    _, model, size, batch = CASES[0]
    steppers: dict[str, Stepper] = {"default": Stepper(model, size, batch, "auto")}
    for name, (precision, channels_last, depthwise_fp32, impl) in VARIANTS.items():
        steppers[name] = Stepper(
            model,
            size,
            batch,
            precision,
            channels_last=channels_last,
            depthwise_fp32=depthwise_fp32,
            adamw_impl=impl,
        )
    results: dict[str, Any] = {"case": CASES[0][0]}
    results.update(interleave(steppers, warmup=2, rounds=rounds))
    if with_compile:
        results["torch.compile"] = compile_cost(model, size, batch, rounds)
    print(json.dumps(results, indent=1), flush=True)
    return results


def compile_cost(model: str, size: int, batch: int, rounds: int) -> dict[str, Any]:
    """Seconds until the first compiled step is done (with an empty compile cache, as a
    user's first run has), then compiled vs eager steps."""
    eager = Stepper(model, size, batch, "auto")
    compiled = Stepper(model, size, batch, "auto", compile_model=True)
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        started = time.perf_counter()
        compiled.step()
        compiled.step()  # the backward graph compiles on the first step, a recompile may follow
        first = time.perf_counter() - started
        figures = interleave({"eager": eager, "compiled": compiled}, warmup=1, rounds=rounds)
    gain = 1 / figures["eager"]["images_per_s"] - 1 / figures["compiled"]["images_per_s"]
    return {
        "first_two_steps_s": round(first, 1),
        **figures,
        # Images the compiled model must train before its saving pays for the compilation.
        "break_even_images": round(first / gain) if gain > 0 else None,
    }


def _ratio(figures: dict[str, Any], key: str) -> float:
    return round(figures["auto"][key] / figures["fp32"][key], 2)


def accuracy(seeds: int, epochs: int, workdir: Path) -> dict[str, Any]:
    """The recipe at fp32 and at the default over seeds on bench_small_data's low-data sets."""
    from benchmarks.bench_small_data import RARE_CLASS, data_sets, summarise

    setting = {"model": "gm_astroformer_tiny", "img_size": 64, "epochs": epochs}
    sets = data_sets(workdir, seeds=range(seeds), n_train=300, n_test=800, size=64)
    results: dict[str, Any] = {
        "what": f"configs/small_data.yaml with model={setting['model']}, img_size=64, "
        f"epochs={epochs}; {seeds} seeds (training file and training seed); 300 training "
        "images in 4 classes (10 % mergers), a separate 800-image test file; evaluated in "
        "fp32 (as the exported model runs)",
        "rare_class": RARE_CLASS,
    }
    for precision in ("fp32", "auto"):
        runs = []
        for seed in range(seeds):
            out = workdir / f"{precision}_s{seed}"
            overrides = [f"{key}={value}" for key, value in setting.items()]
            overrides += [f"precision={precision}", f"seed={seed}", "progress=false"]
            run = _train_and_evaluate(sets["train"][seed], sets["test"], out, overrides)
            print(precision, seed, json.dumps(run), flush=True)
            runs.append(run)
        numeric = [{k: v for k, v in run.items() if isinstance(v, float)} for run in runs]
        results[precision] = {"ran": runs[0]["ran"], "runs": runs, **summarise(numeric)}
    results["setting"] = setting
    return results


def _train_and_evaluate(data: Path, test: Path, out: Path, overrides: list[str]) -> dict[str, Any]:
    from galmorph.training.config import load_config
    from galmorph.training.evaluate import EvaluationRequest, evaluate
    from galmorph.training.train import train

    config = load_config(RECIPE, overrides, data=str(data), out=str(out))
    started = time.perf_counter()
    run_dir = train(config)
    result: dict[str, Any] = {"train_seconds": round(time.perf_counter() - started, 1)}
    result["ran"] = _ran(run_dir)
    for tta in (False, True):
        report = evaluate(
            EvaluationRequest(
                model=run_dir, data=test, split="all", tta=tta, precision="fp32",
                out_dir=out / f"eval_tta{int(tta)}", progress=False,
            )
        )  # fmt: skip
        suffix = "_tta" if tta else ""
        result[f"top1{suffix}"] = round(report["top1"], 4)
        result[f"macro_f1{suffix}"] = round(report["macro_f1"], 4)
        result[f"merger_recall{suffix}"] = round(report["per_class"]["merger"]["recall"], 4)
    return result


def _ran(run_dir: Path) -> str:
    """What the run computed in and why, as its model card records it."""
    return str(json.loads((run_dir / "model.json").read_text())["training_data"]["precision"])


def demo_run(n: int, epochs: int, workdir: Path) -> dict[str, Any]:
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
        "precision": _ran(run_dir),
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
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--rounds", type=int, default=5, help="timed steps per contender")
    parser.add_argument("--explore", action="store_true", help="time the other levers too")
    parser.add_argument("--compile", action="store_true", help="with --explore: torch.compile")
    parser.add_argument("--accuracy", action="store_true", help="fp32 vs default over seeds")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--accuracy-epochs", type=int, default=12)
    parser.add_argument("--skip-demo", action="store_true", help="leave out the demo run")
    parser.add_argument("--n", type=int, default=3000, help="demo: synthetic images (64 px)")
    parser.add_argument("--epochs", type=int, default=6, help="demo: epochs")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    previous = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    parts: dict[str, Any] = {
        key: previous[key]
        for key in ("explore", "accuracy_by_precision", "demo")
        if key in previous
    }
    steps: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("throughput", lambda: throughput(args.rounds))
    ]
    if args.explore:
        steps.append(("explore", lambda: explore(args.rounds, args.compile)))
    with tempfile.TemporaryDirectory() as tmp:
        if args.accuracy:
            steps.append(
                (
                    "accuracy_by_precision",
                    lambda: accuracy(args.seeds, args.accuracy_epochs, Path(tmp) / "accuracy"),
                )
            )
        if not args.skip_demo:
            steps.append(("demo", lambda: demo_run(args.n, args.epochs, Path(tmp) / "demo")))
        for key, run in steps:
            parts[key] = run()
    payload = {
        "torch_threads": args.threads,
        "note": "shared 2-core machine: other engineers' jobs ran alongside; contenders "
        "interleaved, medians of rounds",
        **parts,
    }
    write_results(RESULTS, payload)
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
