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
   depthwise ones), the fp32 strided depthwise ones in channels_last, fp32 with oneDNN's bf16
   math (VARIANTS), fused and foreach AdamW; the share of a step's CPU time that goes to the
   input (augmentation, normalisation) and to reading a batch from an HDF5 file in-process (what
   DataLoader workers could overlap with compute); --compile adds torch.compile (its compile
   seconds from an empty cache, and steady images/s).
   Every contender also records where its step's wall time goes: input, forward, backward
   (with the fp32 loss), optimizer.
   --profile: the recipe's step under torch.profiler, fp32 against the default, interleaved:
   self CPU ms per step by kind of operator (convolutions, GELU, batch norm, dtype casts, ...).
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
    .venv/bin/python -m benchmarks.bench_train --profile --skip-demo
"""

from __future__ import annotations

import argparse
import itertools
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
# --explore: variant -> (precision, channels_last override, strided depthwise convolutions
# (fp32 | fp32 channels_last | autocast), AdamW, oneDNN's math for fp32 convolutions and
# matmuls (torch.backends.mkldnn.*.fp32_precision: "none" is exact fp32, "bf16" lets oneDNN
# compute them in bf16 with fp32 tensors, as TF32 does on GPUs)).
VARIANTS: dict[str, tuple[str, bool | None, str, str, str]] = {
    "fp32": ("fp32", None, "autocast", "for-loop", "none"),
    "fp32 + channels_last": ("fp32", True, "autocast", "for-loop", "none"),
    "fp32 + oneDNN bf16 math": ("fp32", None, "autocast", "for-loop", "bf16"),
    "bf16, every conv autocast": ("bf16", None, "autocast", "for-loop", "none"),
    "default, strided depthwise fp32 in channels_last": (
        "auto",
        None,
        "fp32-cl",
        "for-loop",
        "none",
    ),
    "default + channels_last": ("auto", True, "fp32", "for-loop", "none"),
    "default + fused AdamW": ("auto", None, "fp32", "fused", "none"),
    "default + foreach AdamW": ("auto", None, "fp32", "foreach", "none"),
}
# --profile: operator kinds, by aten name (self CPU time; the rest is "other").
OP_KINDS = {
    # fp32 runs some convolutions through im2col + GEMM (_slow_conv2d), the rest through oneDNN.
    "convolution forward": ("aten::mkldnn_convolution", "aten::_slow_conv2d_forward"),
    "convolution backward": ("aten::convolution_backward", "aten::_slow_conv2d_backward"),
    "GELU forward + backward": ("aten::gelu", "aten::gelu_backward"),
    "batch norm forward + backward": (
        "aten::native_batch_norm",
        "aten::native_batch_norm_backward",
        "aten::_batch_norm_with_update",
    ),
    "dtype casts (autocast, fp32 depthwise)": ("aten::copy_", "aten::_to_copy"),
    "attention and linear (bmm, mm, softmax, layer norm)": (
        "aten::bmm",
        "aten::mm",
        "aten::addmm",
        "aten::_softmax",
        "aten::_softmax_backward_data",
        "aten::native_layer_norm",
        "aten::native_layer_norm_backward",
    ),
    "residual adds and gradient accumulation": ("aten::add_", "aten::add"),
    "augmentation (grid sample)": ("aten::grid_sampler_2d",),
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
        depthwise: str = "fp32",
        adamw_impl: str = "for-loop",
        compile_model: bool = False,
        fp32_math: str = "none",
    ) -> None:
        import numpy as np
        import torch

        from galmorph.core.inputspec import IMAGENET_MEAN, IMAGENET_STD
        from galmorph.model.preprocess import ImagePreprocess
        from galmorph.model.registry import create_model
        from galmorph.training.augment import AugmentSettings, BatchAugmenter
        from galmorph.training.mixup import smooth_one_hot
        from galmorph.training.optim import adamw
        from galmorph.training.precision import Fp32Conv2d, resolve_precision

        self.precision = resolve_precision(precision, torch.device("cpu"))
        self.channels_last = (
            self.precision.channels_last if channels_last is None else channels_last
        )
        torch.manual_seed(0)
        model = create_model(model_name, img_size=size).train()
        if depthwise != "autocast":
            self.precision.prepare(model, training=True)
        if depthwise == "fp32-cl":
            channels_last_conv = _strided_depthwise_fp32_channels_last()
            for module in model.modules():
                if type(module) is Fp32Conv2d:
                    module.__class__ = channels_last_conv
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        model.to(memory_format=layout)  # type: ignore[call-overload]
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
        self.preprocess = ImagePreprocess(IMAGENET_MEAN, IMAGENET_STD)
        rng = np.random.default_rng(0)
        self.images = torch.from_numpy(rng.integers(0, 256, (batch, size, size, 3), np.uint8))
        self.targets = smooth_one_hot(torch.from_numpy(rng.integers(0, 10, batch)), 10, 0.1)
        self.batch = batch
        self.setup = {
            "precision": self.precision.describe(),
            "channels_last": self.channels_last,
            "strided_depthwise": depthwise if self.precision.bf16 else "fp32",
            "adamw": adamw_impl,
            "onednn_fp32_math": fp32_math,
        }
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.input_cpu: list[float] = []  # augmentation and normalisation: the data side
        self.phases: list[tuple[float, float, float, float]] = []  # input, fwd, bwd, optimizer
        self.fp32_math = fp32_math

    def step(self) -> None:
        import torch

        # torch swaps this module for an object at import; its conv/matmul are not in its stubs.
        onednn: Any = torch.backends.mkldnn
        before = onednn.conv.fp32_precision, onednn.matmul.fp32_precision
        onednn.conv.fp32_precision = onednn.matmul.fp32_precision = self.fp32_math
        try:
            self._step()
        finally:
            onednn.conv.fp32_precision, onednn.matmul.fp32_precision = before

    def _step(self) -> None:
        import torch

        from galmorph.training.mixup import soft_target_cross_entropy

        wall, cpu = time.perf_counter(), time.process_time()
        x = self.preprocess(self.augmenter(self.images, torch.Generator().manual_seed(0)))
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        self.input_cpu.append(time.process_time() - cpu)
        marks = [wall, time.perf_counter()]
        with self.precision.autocast():
            logits = self.model(x)
        marks.append(time.perf_counter())
        soft_target_cross_entropy(logits.float(), self.targets).backward()
        marks.append(time.perf_counter())
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        marks.append(time.perf_counter())
        self.wall.append(marks[-1] - wall)
        self.cpu.append(time.process_time() - cpu)
        input_s, forward_s, backward_s, optimizer_s = (b - a for a, b in itertools.pairwise(marks))
        self.phases.append((input_s, forward_s, backward_s, optimizer_s))

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
            # Medians of each phase: they need not add up to the median step exactly.
            "phases_ms": {
                name: round(1000 * statistics.median(p[k] for p in self.phases[warmup:]), 1)
                for k, name in enumerate(("input", "forward", "backward (with loss)", "optimizer"))
            },
            "steps": len(wall),
        }


def _strided_depthwise_fp32_channels_last() -> type:
    """Fp32Conv2d computing in channels_last: the cast to fp32 and the change of layout are
    one copy, and oneDNN's fp32 depthwise convolution measured faster in channels_last."""
    import torch

    from galmorph.training.precision import Fp32Conv2d

    class Fp32Conv2dChannelsLast(Fp32Conv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            device = x.device.type
            if not torch.is_autocast_enabled(device):
                return super().forward(x)
            with torch.autocast(device, enabled=False):
                y = self._conv_forward(
                    x.to(torch.float32, memory_format=torch.channels_last), self.weight, self.bias
                )
            return y.to(torch.get_autocast_dtype(device), memory_format=torch.contiguous_format)

    return Fp32Conv2dChannelsLast


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


def explore(
    rounds: int, with_compile: bool, previous: dict[str, Any], workdir: Path
) -> dict[str, Any]:
    _, model, size, batch = CASES[0]
    steppers: dict[str, Stepper] = {"default": Stepper(model, size, batch, "auto")}
    for name, (precision, channels_last, depthwise, impl, fp32_math) in VARIANTS.items():
        steppers[name] = Stepper(
            model,
            size,
            batch,
            precision,
            channels_last=channels_last,
            depthwise=depthwise,
            adamw_impl=impl,
            fp32_math=fp32_math,
        )
    results: dict[str, Any] = {"case": CASES[0][0]}
    results.update(interleave(steppers, warmup=2, rounds=rounds))
    step_s = batch / results["default"]["images_per_s"]
    results["batch_read_in_process"] = batch_read(size, batch, rounds, step_s, workdir)
    if with_compile:
        results["torch.compile"] = compile_cost(model, size, batch, rounds)
    elif "torch.compile" in previous:
        results["torch.compile"] = previous["torch.compile"]  # from an earlier --compile run
    print(json.dumps(results, indent=1), flush=True)
    return results


def batch_read(size: int, batch: int, rounds: int, step_s: float, workdir: Path) -> dict[str, Any]:
    """One training batch read from an HDF5 file in the training process (num_workers=0, as
    configs/small_data.yaml has it): the most DataLoader workers could overlap with compute."""
    import numpy as np

    from galmorph.core.data.galaxy10 import Galaxy10File
    from galmorph.training.dataset import Galaxy10Dataset, ShardedBatchSampler, make_loader
    from galmorph.training.synth import synthesize

    path = synthesize(workdir / "batches.h5", n=4 * batch, size=size, seed=0, progress=False)
    dataset = Galaxy10Dataset(Galaxy10File(path), np.arange(4 * batch))
    sampler = ShardedBatchSampler(len(dataset), batch, seed=0)
    loader = make_loader(dataset, sampler, num_workers=0, seed=0)
    seconds: list[float] = []
    for epoch in range(rounds):
        sampler.set_epoch(epoch)
        batches = iter(loader)
        while True:
            started = time.perf_counter()
            if next(batches, None) is None:
                break
            seconds.append(time.perf_counter() - started)
    median = statistics.median(seconds)
    return {
        "file": f"synthetic, {size} px, as training/synth.py writes it",
        "ms_per_batch": round(1000 * median, 1),
        "share_of_default_step": round(median / step_s, 5),
    }


def profile(rounds: int) -> dict[str, Any]:
    """Self CPU ms per step by operator kind (OP_KINDS), fp32 against the default, on the
    recipe's case; rounds interleaved, means over them (the profiler slows small ops)."""
    from collections import Counter

    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    _, model, size, batch = CASES[0]
    steppers = {p: Stepper(model, size, batch, p) for p in ("fp32", "auto")}
    kind_of = {op: kind for kind, ops in OP_KINDS.items() for op in ops}
    per_kind: dict[str, Counter[str]] = {name: Counter() for name in steppers}
    others: dict[str, Counter[str]] = {name: Counter() for name in steppers}
    for stepper in steppers.values():
        stepper.step()
        stepper.step()
    for index in range(rounds):
        order = list(steppers) if index % 2 == 0 else list(reversed(steppers))
        for name in order:
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                steppers[name].step()
            for event in prof.key_averages():
                kind = kind_of.get(event.key, "other")
                per_kind[name][kind] += event.self_cpu_time_total / 1000 / rounds
                if kind == "other":
                    others[name][event.key] += event.self_cpu_time_total / 1000 / rounds
    table = {}
    for kind in [*OP_KINDS, "other"]:
        fp32, auto = per_kind["fp32"][kind], per_kind["auto"][kind]
        table[kind] = {
            "fp32_ms": round(fp32, 1),
            "default_ms": round(auto, 1),
            "speedup": round(fp32 / auto, 2) if auto else None,
        }
    totals = {name: sum(counts.values()) for name, counts in per_kind.items()}
    result = {
        "case": CASES[0][0],
        "precision": steppers["auto"].precision.describe(),
        "rounds": rounds,
        "self_cpu_ms_per_step": table,
        "total_ms": {"fp32": round(totals["fp32"]), "default": round(totals["auto"])},
        "speedup_under_profiler": round(totals["fp32"] / totals["auto"], 2),
        "largest_other_ops_ms": {
            "fp32" if name == "fp32" else "default": {
                op: round(ms, 1) for op, ms in counts.most_common(6)
            }
            for name, counts in others.items()
        },
    }
    print(json.dumps(result, indent=1), flush=True)
    return result


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
    from galmorph.training.synthetic_pretrain import resolve_start
    from galmorph.training.train import train

    config = resolve_start(load_config(RECIPE, overrides, data=str(data), out=str(out)))
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
    parser.add_argument("--profile", action="store_true", help="step time by operator kind")
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
        for key in ("explore", "profile", "accuracy_by_precision", "demo")
        if key in previous
    }
    steps: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("throughput", lambda: throughput(args.rounds))
    ]
    with tempfile.TemporaryDirectory() as tmp:
        if args.explore:
            steps.append(
                (
                    "explore",
                    lambda: explore(args.rounds, args.compile, parts.get("explore", {}), Path(tmp)),
                )
            )
        if args.profile:
            steps.append(("profile", lambda: profile(args.rounds)))
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
