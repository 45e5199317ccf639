"""Inference speed of our ONNX artifact against PyTorch, the int8 artifact, and the GEMM limit.

Side by side in one process, same weights, same uint8 inputs, float32, equal thread counts
(onnxruntime intra_op_num_threads = torch.set_num_threads = --threads, one inter-op thread):

1. onnxruntime on the exported artifact (model.export, opset 20, through
galmorph.core.modelfile.engine's
   OnnxModel, the class the server and scorer use) vs PyTorch eager (torch.inference_mode) of
   the same graph module (model.export.ImageClassifierGraph: the /255, mean/std and layout
   step included on both sides), and vs the same model exported at opset 18 (the slow path
   the exporter defaulted to), per model and batch size.
2. torch.compile of the same module, where it works here (a failure is recorded, not hidden).
3. The machine's limit, measured in the same rounds: float32 GEMM GFLOP/s (benchmarks.bench_gemm)
   / FLOPs per image (model.flops) = the best possible images/s; each figure as a fraction.
4. int8 (static QDQ, model.export) vs float32: speed, and the accuracy change on a held-out
   synthetic set, for gm_astroformer_tiny trained briefly here on synthetic Galaxy10 images
   (or a run folder given with --trained-run).
5. On a host where onnxruntime's CUDA provider is active: CUDA fp32 and fp16 artifacts with
   and without IO binding; elsewhere the JSON says "skipped: no CUDA".

Weights for 1-3 are seeded random initialisations: speed does not depend on their values.
Contenders are timed in interleaved rounds after warm-up (benchmarks.common). Where onnxruntime
misses a target, its profile (time per operator type, node types of the optimised graph) and
PyTorch's are recorded for the case, so the reason can be read from the JSON.

    .venv/bin/python -m benchmarks.bench_models [--threads 2] [--quick]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from benchmarks.bench_gemm import gemm_callables, gemm_flops
from benchmarks.common import REPO_ROOT, RESULTS_DIR, Timing, time_interleaved, write_results

if TYPE_CHECKING:
    import torch

    from galmorph.core.modelfile.engine import OnnxModel

ORT = "onnxruntime"
ORT_SLOW = "onnxruntime_opset18"
EAGER = "torch_eager"
COMPILED = "torch_compile"
GEMM_SIZE = 2048
# Idle pause before each timed call, so that no contender pays for the previous one's
# busy-waiting thread pool (benchmarks.common.time_interleaved).
SETTLE_S = 0.25
DEMO_RECIPE = REPO_ROOT / "configs" / "cpu_demo.yaml"
SEED = 0


@dataclass(frozen=True)
class ModelCase:
    """One model to compare: which batch sizes get every contender, which only the sweep."""

    name: str
    batch_sizes: tuple[int, ...] = (1, 32)
    sweep_batch_sizes: tuple[int, ...] = ()  # onnxruntime and eager only, for the plot
    warmup: int = 1
    min_repeats: int = 5
    max_repeats: int = 30
    seconds_per_case: float = 30.0  # keep timing rounds beyond min_repeats up to this long
    profile_batch_sizes: tuple[int, ...] = ()
    settle_s: float = SETTLE_S


@dataclass(frozen=True)
class Int8Study:
    """Train gm_astroformer_tiny briefly on synthetic images, quantise, compare with fp32."""

    img_size: int = 64
    train_images: int = 1500
    heldout_images: int = 600
    epochs: int = 4
    calib_images: int = 128
    batch_sizes: tuple[int, ...] = (1, 32)
    warmup: int = 2
    min_repeats: int = 5
    max_repeats: int = 30
    seconds_per_case: float = 15.0


FULL_CASES = (
    ModelCase("gm_astroformer_tiny", sweep_batch_sizes=(2, 4, 8, 16, 64), max_repeats=30),
    ModelCase(
        "astroformer_0",
        sweep_batch_sizes=(4, 8),
        min_repeats=5,
        max_repeats=30,  # batch 1 is quick: more rounds, a steadier median
        seconds_per_case=60.0,
        profile_batch_sizes=(1, 32),
    ),
    # The reference figures (2.0x at batch 1, 3.3x at batch 32) are for a
    # CoAtNet-0-like model: measuring coatnet_0 in the same run says how far they carry over.
    ModelCase("coatnet_0", seconds_per_case=45.0),
)
QUICK_CASES = (
    ModelCase(
        "gm_astroformer_tiny",
        batch_sizes=(1, 2),
        sweep_batch_sizes=(4,),
        min_repeats=2,
        max_repeats=2,
        seconds_per_case=0.0,
        profile_batch_sizes=(2,),
        settle_s=0.0,
    ),
)
QUICK_INT8 = Int8Study(
    img_size=64,  # the smallest size training.synth renders
    train_images=64,
    heldout_images=40,
    epochs=1,
    calib_images=16,
    batch_sizes=(1, 2),
    warmup=1,
    min_repeats=2,
    max_repeats=2,
    seconds_per_case=0.0,
)


def _timed_rounds(
    contenders: Mapping[str, Callable[[], object]],
    *,
    warmup: int,
    min_repeats: int,
    max_repeats: int,
    seconds: float,
    settle_s: float = SETTLE_S,
) -> dict[str, Timing]:
    """min_repeats interleaved rounds, then more while the case's time budget lasts."""
    started = time.perf_counter()
    timings = time_interleaved(contenders, warmup=warmup, repeats=min_repeats, settle_s=settle_s)
    per_round = (time.perf_counter() - started) / (warmup + min_repeats)
    extra = min(max_repeats - min_repeats, int((seconds - per_round * min_repeats) / per_round))
    if extra > 0:
        more = time_interleaved(contenders, warmup=0, repeats=extra, settle_s=settle_s)
        timings = {
            name: Timing(timings[name].samples + more[name].samples, warmup) for name in timings
        }
    return timings


# --- the artifacts ---------------------------------------------------------------------------


def make_checkpoint(name: str, img_size: int, run_dir: Path) -> Path:
    """A seeded random initialisation saved as a run folder (what export reads)."""
    import torch

    from galmorph.core.data.galaxy10 import GALAXY10_CLASS_NAMES
    from galmorph.model.checkpoint import ModelSpec, save_model
    from galmorph.model.registry import create_model

    torch.manual_seed(SEED)
    model = create_model(name, num_classes=len(GALAXY10_CLASS_NAMES), img_size=img_size).eval()
    spec = ModelSpec(
        name=name,
        num_classes=len(GALAXY10_CLASS_NAMES),
        img_size=img_size,
        class_names=tuple(GALAXY10_CLASS_NAMES),
    )
    save_model(run_dir, model, spec)
    return run_dir


def timed_export(run_dir: Path, out: Path, threads: int, **options: Any) -> tuple[Path, float]:
    from galmorph.model.export import export_onnx

    started = time.perf_counter()
    path = export_onnx(run_dir, out, intra_op_threads=threads, **options)
    return path, time.perf_counter() - started


def open_cpu_model(path: Path, threads: int) -> OnnxModel:
    from galmorph.core.modelfile.engine import CPU_PROVIDER, OnnxModel

    return OnnxModel(path, providers=[CPU_PROVIDER], intra_op_threads=threads, inter_op_threads=1)


def torch_graph(run_dir: Path) -> torch.nn.Module:
    """The exact module export traces: uint8 NHWC -> (probabilities, logits)."""
    from galmorph.model.checkpoint import load_model
    from galmorph.model.export import ImageClassifierGraph

    model, spec = load_model(run_dir)
    return ImageClassifierGraph(model, spec.mean, spec.std).eval()


def random_images(batch: int, size: int, seed: int = SEED) -> np.ndarray:
    rng = np.random.default_rng([seed, batch])
    return rng.integers(0, 256, size=(batch, size, size, 3), dtype=np.uint8)


# --- 1-3: onnxruntime vs PyTorch vs the limit -------------------------------------------------


def _torch_call(graph: Callable[..., Any], images: np.ndarray) -> Callable[[], np.ndarray]:
    import torch

    tensor = torch.from_numpy(images)

    def run() -> np.ndarray:
        with torch.inference_mode():
            return graph(tensor)[0].numpy()

    return run


def predict_call(model: OnnxModel, images: np.ndarray) -> Callable[[], np.ndarray]:
    return lambda: model.predict(images)


def _compile(graph: torch.nn.Module) -> tuple[Callable[..., Any] | None, str]:
    import torch

    try:
        return torch.compile(graph, dynamic=False), "ok"
    except Exception as exc:  # any backend failure means "does not work here"; say which
        return None, f"failed: {type(exc).__name__}: {exc}"[:500]


def compare_batch(
    case: ModelCase,
    batch: int,
    img_size: int,
    ort_model: OnnxModel,
    slow_model: OnnxModel | None,
    graph: torch.nn.Module,
    compiled: Callable[..., Any] | None,
    compile_status: str,
    threads: int,
    flops_per_image: int,
) -> dict[str, Any]:
    images = random_images(batch, img_size)
    contenders: dict[str, Callable[[], object]] = {
        ORT: predict_call(ort_model, images),
        EAGER: _torch_call(graph, images),
    }
    if slow_model is not None:
        contenders[ORT_SLOW] = predict_call(slow_model, images)
    reference = contenders[EAGER]()
    assert isinstance(reference, np.ndarray)
    result: dict[str, Any] = {"contenders": {}, "max_abs_diff_vs_eager": {}}
    if compiled is not None:
        compiled_call = _torch_call(compiled, images)
        started = time.perf_counter()
        try:
            first = compiled_call()
        except Exception as exc:  # inductor needs a working C++ toolchain; record why not
            compile_status = f"failed: {type(exc).__name__}: {exc}"[:500]
        else:
            result["torch_compile_first_call_s"] = round(time.perf_counter() - started, 2)
            contenders[COMPILED] = compiled_call
            result["max_abs_diff_vs_eager"][COMPILED] = float(np.abs(first - reference).max())
    if COMPILED not in contenders:
        result["contenders"][COMPILED] = {"status": compile_status}
    for name in (ORT, ORT_SLOW):
        if name in contenders:
            output = contenders[name]()
            assert isinstance(output, np.ndarray)
            result["max_abs_diff_vs_eager"][name] = float(np.abs(output - reference).max())

    result.update(
        time_against_limit(contenders, batch, case, threads, flops_per_image, case.seconds_per_case)
    )
    result["contenders"].update(result.pop("figures"))
    return result


def time_against_limit(
    contenders: Mapping[str, Callable[[], object]],
    batch: int,
    case: ModelCase,
    threads: int,
    flops_per_image: int,
    seconds: float,
) -> dict[str, Any]:
    """Time the contenders and GEMMs in the same interleaved rounds: images/s, the limit
    (best GEMM GFLOP/s / FLOPs per image) in those rounds, and each contender's fraction."""
    gemm = {f"gemm_{name}": call for name, call in gemm_callables(GEMM_SIZE, threads).items()}
    timings = _timed_rounds(
        {**contenders, **gemm},
        warmup=case.warmup,
        min_repeats=case.min_repeats,
        max_repeats=case.max_repeats,
        seconds=seconds,
        settle_s=case.settle_s,
    )
    gemm_gflops = {
        name.removeprefix("gemm_"): gemm_flops(GEMM_SIZE) / timings[name].median / 1e9
        for name in gemm
    }
    limit_gflops = max(gemm_gflops.values())
    best_images_per_s = limit_gflops * 1e9 / flops_per_image
    figures = {}
    for name in contenders:
        figures[name] = timings[name].to_dict(items_per_call=batch)
        figures[name]["fraction_of_limit"] = round(
            figures[name]["items_per_s"] / best_images_per_s, 4
        )
        figures[name]["achieved_gflops"] = round(
            figures[name]["items_per_s"] * flops_per_image / 1e9, 2
        )
    return {
        "figures": figures,
        "gemm_gflops_same_rounds": {k: round(v, 2) for k, v in gemm_gflops.items()},
        "limit_gflops": round(limit_gflops, 2),
        "limit_images_per_s": round(best_images_per_s, 3),
        "speedup": {
            f"{ORT}_vs_{other}": round(timings[other].median / timings[ORT].median, 3)
            for other in (EAGER, COMPILED, ORT_SLOW)
            if other in contenders
        },
    }


def sweep(
    case: ModelCase,
    img_size: int,
    ort_model: OnnxModel,
    graph: torch.nn.Module,
    threads: int,
    flops_per_image: int,
) -> dict[str, dict[str, Any]]:
    """onnxruntime and eager at the extra batch sizes (for the throughput plot)."""
    out: dict[str, dict[str, Any]] = {}
    for batch in case.sweep_batch_sizes:
        images = random_images(batch, img_size)
        contenders = {ORT: predict_call(ort_model, images), EAGER: _torch_call(graph, images)}
        result = time_against_limit(
            contenders, batch, case, threads, flops_per_image, case.seconds_per_case / 2
        )
        result["contenders"] = result.pop("figures")
        out[str(batch)] = result
        print(f"  sweep batch {batch}: {_rates(result['contenders'])}", flush=True)
    return out


def _rates(contenders: dict[str, Any]) -> str:
    return ", ".join(
        f"{name} {figures['items_per_s']:.2f}/s"
        for name, figures in contenders.items()
        if "items_per_s" in figures
    )


# --- profiles: what the time goes to ---------------------------------------------------------


def profile_onnxruntime(path: Path, images: np.ndarray, threads: int, work: Path) -> dict[str, Any]:
    """Time per operator type over two runs after a warm-up, and the optimised graph's nodes."""
    import onnx
    import onnxruntime as ort

    from galmorph.core.modelfile.contract import INPUT_NAME

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_profiling = True
    options.profile_file_prefix = str(work / f"ort_profile_{len(images)}")
    optimised = work / f"optimised_{len(images)}.onnx"
    options.optimized_model_filepath = str(optimised)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for _ in range(3):
        session.run(None, {INPUT_NAME: images})
    events = json.loads(Path(session.end_profiling()).read_text())
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    warm_end = runs[0]["ts"] + runs[0]["dur"]
    by_op: Counter[str] = Counter()
    for event in events:
        if (
            event.get("cat") == "Node"
            and event["ts"] > warm_end
            and event["name"].endswith("_kernel_time")
        ):
            by_op[event["args"]["op_name"]] += event["dur"]
    total = sum(by_op.values()) or 1
    run_us = sum(run["dur"] for run in runs[1:]) or 1
    graph = onnx.load_model(str(optimised), load_external_data=False).graph
    node_types = Counter(
        f"{node.domain}.{node.op_type}" if node.domain else node.op_type for node in graph.node
    )
    return {
        "batch": len(images),
        "kernel_time_fraction_of_run": round(total / run_us, 3),
        "time_share_by_op": {op: round(us / total, 4) for op, us in by_op.most_common(15)},
        "optimised_graph_nodes": len(graph.node),
        "optimised_graph_node_types": dict(node_types.most_common()),
    }


def profile_eager(graph: torch.nn.Module, images: np.ndarray) -> dict[str, Any]:
    """PyTorch's time per aten operator for one run after a warm-up."""
    from torch.profiler import ProfilerActivity, profile

    run = _torch_call(graph, images)
    run()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in events) or 1
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
    return {
        "batch": len(images),
        "self_time_share_by_op": {e.key: round(e.self_cpu_time_total / total, 4) for e in top},
    }


# --- per model ----------------------------------------------------------------------------------


def benchmark_model(
    case: ModelCase,
    img_size: int,
    threads: int,
    work: Path,
    *,
    with_compile: bool,
    with_slow_export: bool,
) -> dict[str, Any]:
    from galmorph.model.flops import measure_cost

    cost = measure_cost(case.name, img_size=img_size)
    flops_per_image = 2 * cost.macs
    run_dir = make_checkpoint(case.name, img_size, work / case.name / "run")
    fast_path, fast_seconds = timed_export(run_dir, work / case.name / "model.onnx", threads)
    exports = {"opset20_seconds": round(fast_seconds, 1)}
    slow_model = None
    if with_slow_export:
        slow_path, slow_seconds = timed_export(
            run_dir, work / case.name / "model_opset18.onnx", threads, opset=18
        )
        exports["opset18_seconds"] = round(slow_seconds, 1)
        slow_model = open_cpu_model(slow_path, threads)
    ort_model = open_cpu_model(fast_path, threads)
    graph = torch_graph(run_dir)
    compiled, compile_status = _compile(graph) if with_compile else (None, "not run (--no-compile)")
    result: dict[str, Any] = {
        "img_size": img_size,
        "params": cost.params,
        "flops_per_image": flops_per_image,
        "weights": f"random initialisation (torch.manual_seed({SEED}))",
        "artifact_bytes": fast_path.stat().st_size,
        "export": exports,
        "providers": ort_model.providers,
        "batches": {},
    }
    for batch in case.batch_sizes:
        figures = compare_batch(
            case,
            batch,
            img_size,
            ort_model,
            slow_model,
            graph,
            compiled,
            compile_status,
            threads,
            flops_per_image,
        )
        result["batches"][str(batch)] = figures
        print(
            f"{case.name} batch {batch}: {_rates(figures['contenders'])}; "
            f"speedups {figures['speedup']}; limit {figures['limit_images_per_s']:.2f}/s",
            flush=True,
        )
    result["sweep"] = sweep(case, img_size, ort_model, graph, threads, flops_per_image)
    profiles = {}
    for batch in case.profile_batch_sizes:
        images = random_images(batch, img_size)
        profiles[str(batch)] = {
            ORT: profile_onnxruntime(fast_path, images, threads, work / case.name),
            EAGER: profile_eager(graph, images),
        }
    result["profiles"] = profiles
    return result


# --- 4: int8 vs fp32 on a trained model ------------------------------------------------------


def train_tiny(study: Int8Study, threads: int, work: Path) -> tuple[Path, Path, dict[str, Any]]:
    """Synthetic training file + a short run of the CPU demo recipe; returns (run, data, how)."""
    from galmorph.training.config import load_config
    from galmorph.training.synth import synthesize
    from galmorph.training.train import train

    data = synthesize(
        work / "synth_train.h5", n=study.train_images, size=study.img_size, seed=0, progress=False
    )
    config = load_config(
        DEMO_RECIPE,
        data=str(data),
        out=str(work / "trained_tiny"),
        model="gm_astroformer_tiny",
        img_size=study.img_size,
        epochs=study.epochs,
        warmup_epochs=min(1.0, study.epochs / 2),
        threads=threads,
        progress=False,
    )
    started = time.perf_counter()
    run_dir = train(config)
    how = {
        "how": f"galmorph.training.train.train with {DEMO_RECIPE.relative_to(REPO_ROOT)} on "
        f"{study.train_images} training.synth images (seed 0), {study.epochs} epochs, in this run",
        "train_seconds": round(time.perf_counter() - started, 1),
        "train_images": study.train_images,
        "epochs": study.epochs,
    }
    return run_dir, data, how


def _labelled_images(path: Path, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    from galmorph.core.data.galaxy10 import Galaxy10File

    with Galaxy10File(path) as data:
        count = data.num_images if limit is None else min(limit, data.num_images)
        indices = np.arange(count)
        return data.images(indices), data.labels[indices]


def int8_vs_fp32(
    study: Int8Study, threads: int, work: Path, trained_run: Path | None
) -> dict[str, Any]:
    from galmorph.model.checkpoint import load_model
    from galmorph.model.export import export_model
    from galmorph.training.synth import synthesize

    if trained_run is None:
        run_dir, train_data, how = train_tiny(study, threads, work)
        calib, _ = _labelled_images(train_data, study.calib_images)
    else:
        run_dir, how = trained_run, {"how": f"reused run folder {trained_run} (--trained-run)"}
        calib = None
    _, spec = load_model(run_dir)
    # A fresh synthetic draw (another seed) the model never saw is the held-out set.
    heldout_path = synthesize(
        work / "synth_heldout.h5",
        n=study.heldout_images,
        size=spec.img_size,
        seed=1_000_003,
        progress=False,
    )
    heldout, labels = _labelled_images(heldout_path)
    if calib is None:
        calib = heldout[: study.calib_images]
        how["calibration"] = "first held-out images (the training data was not given)"
    fp32_path, fp32_seconds = timed_export(run_dir, work / "trained_fp32.onnx", threads)
    started = time.perf_counter()
    report = export_model(
        run_dir,
        work / "trained_int8.onnx",
        precision="int8",
        calib_images=calib,
        eval_images=heldout,
        eval_labels=labels,
        intra_op_threads=threads,
    )
    int8_seconds = time.perf_counter() - started
    fp32_model, int8_model = (
        open_cpu_model(fp32_path, threads),
        open_cpu_model(report.path, threads),
    )

    fp32_probs = _predict_all(fp32_model, heldout)
    int8_probs = _predict_all(int8_model, heldout)
    fp32_pred, int8_pred = fp32_probs.argmax(1), int8_probs.argmax(1)
    accuracy = {
        "heldout_images": len(heldout),
        "heldout": "galmorph.training.synth.synthesize, seed 1000003 (not the training seed)",
        "fp32_top1": round(float((fp32_pred == labels).mean()), 4),
        "int8_top1": round(float((int8_pred == labels).mean()), 4),
        "top1_change": round(float((int8_pred == labels).mean() - (fp32_pred == labels).mean()), 4),
        "prediction_agreement": round(float((fp32_pred == int8_pred).mean()), 4),
        "max_abs_prob_diff": round(float(np.abs(fp32_probs - int8_probs).max()), 4),
        "export_metadata_int8_eval": report.card.metrics.get("int8_eval"),
    }
    speed: dict[str, Any] = {}
    for batch in study.batch_sizes:
        images = heldout[:batch] if batch <= len(heldout) else random_images(batch, spec.img_size)
        timings = _timed_rounds(
            {"fp32": predict_call(fp32_model, images), "int8": predict_call(int8_model, images)},
            warmup=study.warmup,
            min_repeats=study.min_repeats,
            max_repeats=study.max_repeats,
            seconds=study.seconds_per_case,
        )
        speed[str(batch)] = {
            **{name: t.to_dict(items_per_call=batch) for name, t in timings.items()},
            "int8_speedup": round(timings["fp32"].median / timings["int8"].median, 3),
        }
        print(f"int8 vs fp32 batch {batch}: {speed[str(batch)]['int8_speedup']:.2f}x", flush=True)
    print(f"int8 accuracy change {accuracy['top1_change']:+.4f}", flush=True)
    return {
        "model": spec.name,
        "img_size": spec.img_size,
        "training": how,
        "export_seconds": {"fp32": round(fp32_seconds, 1), "int8": round(int8_seconds, 1)},
        "artifact_bytes": {"fp32": fp32_path.stat().st_size, "int8": report.size_bytes},
        "accuracy": accuracy,
        "speed": speed,
    }


def _predict_all(model: OnnxModel, images: np.ndarray, batch: int = 32) -> np.ndarray:
    return np.concatenate(
        [model.predict(images[i : i + batch]) for i in range(0, len(images), batch)]
    )


# --- 5: CUDA (GPU hosts only) --------------------------------------------------------------


def cuda_availability() -> str | None:
    """None when onnxruntime can run on CUDA here, else why not (for the JSON)."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "skipped: no CUDA (this onnxruntime build has no CUDA provider)"
    try:
        import ctypes

        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return "skipped: no CUDA (no NVIDIA driver on this machine)"
    return None


def _io_bound_call(model: OnnxModel, images: np.ndarray) -> Callable[[], None]:
    """Input copied to the GPU once and the output left there: the engine's own speed."""
    import onnxruntime as ort

    from galmorph.core.modelfile.contract import INPUT_NAME, OUTPUT_NAME

    binding = model.session.io_binding()
    binding.bind_ortvalue_input(INPUT_NAME, ort.OrtValue.ortvalue_from_numpy(images, "cuda", 0))
    binding.bind_output(OUTPUT_NAME, "cuda", 0)

    def run() -> None:
        model.session.run_with_iobinding(binding)
        binding.synchronize_outputs()

    return run


def benchmark_cuda(case: ModelCase, img_size: int, work: Path) -> dict[str, Any]:
    """fp32 and fp16 artifacts on the CUDA provider: host arrays vs IO binding on the device."""
    from galmorph.core.modelfile.engine import CUDA_PROVIDER, OnnxModel

    run_dir = make_checkpoint(case.name, img_size, work / f"cuda_{case.name}" / "run")
    result: dict[str, Any] = {}
    for precision in ("fp32", "fp16"):
        path, _ = timed_export(
            run_dir, work / f"cuda_{case.name}" / f"{precision}.onnx", 1, precision=precision
        )
        model = OnnxModel(path, providers=[CUDA_PROVIDER])
        if not model.cuda_active:
            return {"status": f"skipped: CUDA provider did not activate ({model.providers})"}
        per_batch = {}
        for batch in case.batch_sizes:
            images = random_images(batch, img_size)
            timings = _timed_rounds(
                {
                    "host_arrays": predict_call(model, images),
                    "io_binding": _io_bound_call(model, images),
                },
                warmup=max(case.warmup, 3),
                min_repeats=max(case.min_repeats, 10),
                max_repeats=max(case.max_repeats, 50),
                seconds=case.seconds_per_case,
            )
            per_batch[str(batch)] = {
                name: t.to_dict(items_per_call=batch) for name, t in timings.items()
            }
        result[precision] = {"providers": model.providers, "batches": per_batch}
    return result


# --- main -----------------------------------------------------------------------------------


def run(
    cases: Sequence[ModelCase],
    study: Int8Study,
    *,
    img_size: int,
    threads: int,
    work: Path,
    with_compile: bool,
    with_slow_export: bool,
    trained_run: Path | None,
) -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    models = {
        case.name: benchmark_model(
            case,
            img_size,
            threads,
            work,
            with_compile=with_compile,
            with_slow_export=with_slow_export,
        )
        for case in cases
    }
    int8 = int8_vs_fp32(study, threads, work / "int8", trained_run)
    skip = cuda_availability()
    cuda = (
        {"status": skip}
        if skip
        else {case.name: benchmark_cuda(case, img_size, work) for case in cases}
    )
    return {
        "benchmark": "onnxruntime vs PyTorch (eager, compile), int8 vs fp32, vs the GEMM limit",
        "threads": {"onnxruntime_intra_op": threads, "torch": threads, "inter_op": 1},
        "settle_s_before_each_timed_call": SETTLE_S,
        "dtype": "float32",
        "inputs": "seeded random uint8 NHWC images, identical for every contender",
        "models": models,
        "int8": int8,
        "cuda": cuda,
    }


# --- --cpu-engines: OpenVINO bf16 vs onnxruntime fp32 vs torch eager fp32 / bf16 autocast ------

OPENVINO_BF16 = "openvino_bf16"
EAGER_BF16 = "torch_eager_bf16_autocast"


def _torch_bf16_call(graph: Callable[..., Any], images: np.ndarray) -> Callable[[], np.ndarray]:
    import torch

    tensor = torch.from_numpy(images)

    def run() -> np.ndarray:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return graph(tensor)[0].float().numpy()

    return run


def real_images(size: int) -> np.ndarray:
    """The real Galaxy10 JPEGs the repository carries, at the model's input size."""
    from PIL import Image

    paths = sorted((REPO_ROOT / "tests" / "data" / "galaxy10-real").glob("*.jpg"))
    return np.stack([np.asarray(Image.open(p).convert("RGB").resize((size, size))) for p in paths])


def cpu_engines(name: str, img_size: int, batch: int, threads: int, work: Path) -> dict[str, Any]:
    """One model, ready uint8 batches: every CPU contender in interleaved rounds, and each one's
    answers on the real JPEGs against onnxruntime fp32 (the card's answers)."""
    import torch

    from galmorph.core.modelfile.openvino_engine import OpenVinoModel

    torch.set_num_threads(threads)
    run_dir = make_checkpoint(name, img_size, work / f"{name}_run")
    path, _ = timed_export(run_dir, work / f"{name}.onnx", threads)
    reference = open_cpu_model(path, threads)
    started = time.perf_counter()
    bf16 = OpenVinoModel(path, intra_op_threads=threads, inter_op_threads=1)
    load_s = time.perf_counter() - started
    graph = torch_graph(run_dir)
    images = random_images(batch, img_size)
    contenders: dict[str, Callable[[], object]] = {
        OPENVINO_BF16: predict_call(bf16, images),
        ORT: predict_call(reference, images),
        EAGER: _torch_call(graph, images),
        EAGER_BF16: _torch_bf16_call(graph, images),
    }
    timings = time_interleaved(contenders, warmup=1, repeats=5, settle_s=SETTLE_S)
    real = real_images(img_size)
    want = reference.predict(real)
    answers = {
        OPENVINO_BF16: bf16.predict(real),
        EAGER: _torch_call(graph, real)(),
        EAGER_BF16: _torch_bf16_call(graph, real)(),
    }
    return {
        "model": f"{name} @ {img_size} px (seeded random weights)",
        "batch_size": batch,
        "engine": bf16.engine_report(),
        "openvino_load_seconds": round(load_s, 2),
        "contenders": {k: t.to_dict(items_per_call=batch) for k, t in timings.items()},
        "speedup_of_openvino_bf16": {
            f"vs_{other}": round(timings[other].median / timings[OPENVINO_BF16].median, 3)
            for other in (ORT, EAGER, EAGER_BF16)
        },
        "vs_onnxruntime_fp32_on_real_jpegs": {
            name: {
                "max_abs_prob_diff": float(np.abs(got - want).max()),
                "top1_equal": f"{int((got.argmax(1) == want.argmax(1)).sum())} of {len(want)}",
            }
            for name, got in answers.items()
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="threads for every engine")
    parser.add_argument("--img-size", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (harness check)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--no-slow-export", action="store_true", help="skip the opset 18 export")
    parser.add_argument(
        "--models",
        nargs="+",
        help="model names to compare (default: gm_astroformer_tiny, astroformer_0, coatnet_0)",
    )
    parser.add_argument(
        "--trained-run",
        type=Path,
        help="run folder of a trained gm_astroformer_tiny for the int8 study (default: train)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "models.json")
    parser.add_argument(
        "--cpu-engines",
        action="store_true",
        help="only OpenVINO bf16 vs onnxruntime fp32 vs torch fp32/bf16 on astroformer_0, batch "
        "32 (results to models_cpu_engines.json)",
    )
    args = parser.parse_args(argv)
    if args.cpu_engines:
        with tempfile.TemporaryDirectory(prefix="galmorph-bench-") as tmp:
            name = (args.models or ["astroformer_0"])[0]
            size = 32 if args.quick else args.img_size
            result = cpu_engines(name, size, 2 if args.quick else 32, args.threads, Path(tmp))
        out = RESULTS_DIR / "models_cpu_engines.json"
        print(json.dumps(result["speedup_of_openvino_bf16"]))
        print(write_results(out, {"benchmark": "CPU engines on ready batches", **result}))
        return 0

    cases: Sequence[ModelCase] = QUICK_CASES if args.quick else FULL_CASES
    if args.models:
        known = {case.name: case for case in FULL_CASES}
        cases = [known.get(name, replace(cases[0], name=name)) for name in args.models]
    study = QUICK_INT8 if args.quick else Int8Study()
    img_size = 32 if args.quick else args.img_size
    with tempfile.TemporaryDirectory(prefix="galmorph-bench-") as tmp:
        payload = run(
            cases,
            study,
            img_size=img_size,
            threads=args.threads,
            work=Path(tmp),
            with_compile=not (args.no_compile or args.quick),
            with_slow_export=not (args.no_slow_export or args.quick),
            trained_run=args.trained_run,
        )
    payload["quick"] = args.quick
    write_results(args.out, payload)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
