"""`make gpu-check`: is this host ready to run galmorph on its GPU? Measured, never assumed.

Ten parts run in order, each in its own try/except with a time budget printed before it starts
(seconds on one H100-class GPU with 16 CPU cores; without DDP they add up to 9 minutes there):

  export                 astroformer_0 fp32 + fp16 and astroformer_4 fp16 at 256 px, seeded
                         random weights (no trained weights are needed for any figure here),
                         through model/export.py (its own CPU parity check included)
  cuda_provider          in this process: OnnxModel's default providers put CUDA first and
                         `session.get_providers()` says it is active; images bound as an OrtValue
                         on the GPU and the output left there match predict(); a torch tensor
                         computes on the GPU
  cuda_without_torch     the same session in a fresh process that never imports torch, as
                         `galmorph serve` and `galmorph score` run (torch's import loads CUDA
                         libraries that onnxruntime alone may not find)
  parity                 real images from tests/data/galaxy10-real: onnxruntime on CUDA (fp32
                         without TF32, fp32 as served, fp16 as served) against the PyTorch fp32
                         model with TF32 off
  io_binding_cuda_graph  host arrays vs IO binding vs a captured CUDA graph (enable_cuda_graph,
                         batch dimension fixed per session), outputs checked after an in-place
                         input update
  batch_sweep            images/s at batch 1..256 for astroformer_0 and _4 (host arrays as the
                         server and scorer feed them, and IO binding), GPU memory in use
  service                `galmorph serve --require-gpu` at the sweep's best batch size under a
                         keep-alive HTTP load of real JPEGs, as a fraction of raw predict()
  scorer                 `galmorph score` of a FITS catalog at the best batch size, as a fraction
                         of raw predict()
  training               50 steps of `galmorph train` on CUDA at precision=fp32, then at bf16
                         (the default there: bf16 autocast + channels_last), images/s of
                         each and the speed-up, peak GPU memory
  ddp                    `torchrun` over every visible GPU with NCCL (2+ GPUs only)

Each part ends ok, skipped (with the reason: no NVIDIA driver, no CUDA provider in this
onnxruntime build, a CPU-only torch, one GPU, or a part it needs did not succeed) or failed
(with the error); a part past three times its budget is stopped and failed. The exit status is
1 only when a part that could run failed. On a host without a GPU every part is skipped in a
few seconds. Results: benchmarks/results/gpu.json and gpu_summary.md beside it (--out moves
both).

`--cpu-rehearsal` runs the same code on the CPU provider with whatever small settings are given
(GPU-only steps are skipped): a harness check, never GPU figures; the JSON says so.

    make gpu-check                      # install, then this with the defaults
    .venv/bin/python -m benchmarks.gpu_check --plan          # budgets and what would run
    .venv/bin/python -m benchmarks.gpu_check --only batch_sweep   # and the parts it needs
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import numpy as np

if not __package__:
    # Run as a file (`python benchmarks/gpu_check.py`), Python puts benchmarks/ on the path, not
    # the checkout that holds the `benchmarks` package; `python -m benchmarks.gpu_check` has it.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO_ROOT, RESULTS_DIR, write_results
from galmorph.core.modelfile.engine import CPU_PROVIDER, CUDA_PROVIDER

if TYPE_CHECKING:
    from galmorph.core.modelfile.engine import OnnxModel

DEFAULT_OUT = RESULTS_DIR / "gpu.json"
REAL_IMAGES = REPO_ROOT / "tests" / "data" / "galaxy10-real"
# A part still running at this multiple of its budget is stopped and failed.
HARD_STOP_FACTOR = 3
# The best batch size: the smallest one within this fraction of the sweep's best images/s
# (beyond it, a bigger batch buys latency and memory, not throughput).
KNEE_FRACTION = 0.9
# Capacity arithmetic (docs/capacity.md): a survey catalog scored in one night.
CATALOG_GALAXIES = 10_000_000
NIGHT_HOURS = 8.0
OOM_MARKERS = ("out of memory", "failed to allocate", "cudaerrormemoryallocation")
TORCH_FREE_PROBE = """\
import json, sys
from galmorph.core.modelfile.engine import OnnxModel
model = OnnxModel(sys.argv[1], providers=sys.argv[2:] or None)
print(json.dumps({"providers": model.providers, "torch_imported": "torch" in sys.modules,
                  "cpu_reason": None if model.cuda_active else model.placement.cpu_reason()}))
"""


class Skipped(Exception):
    """The part cannot run here; the message says why."""


class CheckFailed(Exception):
    """The part ran and found a problem; details go into the results next to the message."""

    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.details = details or {}


class PartTimeout(Exception):
    """The part ran past HARD_STOP_FACTOR times its budget."""


@dataclass(frozen=True)
class Part:
    name: str
    budget_s: int
    what: str
    run: Callable[[Check], dict[str, Any]]
    # Conditions ("ort_cuda", "torch_cuda", "gpu_only", "two_gpus") and parts that must be ok.
    needs: tuple[str, ...]


# --- environment -------------------------------------------------------------------------------


def nvidia_smi(query: str, gpu: str | None = None) -> list[list[str]] | None:
    """Rows of `nvidia-smi --query-gpu=QUERY`; None when nvidia-smi is missing or fails."""
    binary = shutil.which("nvidia-smi")
    if binary is None:
        return None
    command = [binary, f"--query-gpu={query}", "--format=csv,noheader,nounits"]
    if gpu is not None:
        command += ["-i", gpu]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    return [[cell.strip() for cell in line.split(",")] for line in done.stdout.splitlines() if line]


def first_visible_gpu() -> str:
    """nvidia-smi's id of CUDA device 0 (CUDA_VISIBLE_DEVICES renumbers devices)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    return visible or "0"


def gpu_memory_used_mib() -> float | None:
    """Memory in use on CUDA device 0 by every process (nvidia-smi), or None."""
    rows = nvidia_smi("memory.used", first_visible_gpu())
    try:
        return float(rows[0][0]) if rows else None
    except ValueError:
        return None


class MemoryPeak:
    """Highest GPU memory in use while the block runs, sampled twice a second (child processes
    included: nvidia-smi sees the whole device)."""

    def __init__(self) -> None:
        self.baseline = gpu_memory_used_mib()
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.5):
            used = gpu_memory_used_mib()
            if used is not None and (self.peak is None or used > self.peak):
                self.peak = used

    def __enter__(self) -> MemoryPeak:
        if self.baseline is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def above_baseline_mib(self) -> float | None:
        if self.baseline is None or self.peak is None:
            return None
        return round(self.peak - self.baseline, 1)


def torch_facts() -> dict[str, Any]:
    """torch's build and what it sees. Importing torch first also loads its CUDA libraries,
    which onnxruntime's CUDA provider then finds in this process (as onnxruntime.preload_dlls
    documents for a torch built for the same CUDA)."""
    import torch
    import torch.distributed as distributed

    facts: dict[str, Any] = {
        "version": torch.__version__,
        "cuda_build": torch.version.cuda,
        "cuda_available": bool(torch.cuda.is_available()),
        "device_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
    }
    if facts["cuda_available"]:
        facts["devices"] = [
            {
                "name": torch.cuda.get_device_name(index),
                "capability": ".".join(map(str, torch.cuda.get_device_capability(index))),
                "memory_gib": round(
                    torch.cuda.get_device_properties(index).total_memory / 2**30, 1
                ),
            }
            for index in range(facts["device_count"])
        ]
        facts["bf16_supported"] = bool(torch.cuda.is_bf16_supported())
        facts["nccl_available"] = bool(distributed.is_nccl_available())
    return facts


def environment() -> dict[str, Any]:
    import onnxruntime as ort
    from onnxruntime.capi import build_and_package_info

    from galmorph.core.modelfile.engine import nvidia_driver_present

    torch = torch_facts()  # before any onnxruntime session (see torch_facts)
    rows = nvidia_smi("index,name,memory.total,driver_version")
    gpus = (
        [
            {"index": r[0], "name": r[1], "memory_mib": float(r[2]), "driver": r[3]}
            for r in rows
            if len(r) == 4
        ]
        if rows is not None
        else "nvidia-smi not found or failed"
    )
    return {
        "nvidia_driver": nvidia_driver_present(),
        "gpus": gpus,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "onnxruntime": {
            "package": getattr(build_and_package_info, "package_name", "onnxruntime"),
            "version": ort.__version__,
            "built_for_cuda": getattr(build_and_package_info, "cuda_version", None),
            "available_providers": list(ort.get_available_providers()),
        },
        "torch": torch,
        "cpu_count": os.cpu_count(),
    }


def condition_problem(condition: str, env: dict[str, Any], rehearsal: bool) -> str | None:
    """Why a condition does not hold here, or None."""
    if rehearsal:
        if condition == "gpu_only":
            return "CPU rehearsal: this step needs a GPU"
        if condition == "two_gpus":
            return (
                "CPU rehearsal: DDP over NCCL needs 2+ GPUs"
                " (tests/training/test_ddp.py covers gloo)"
            )
        return None
    no_driver = "no NVIDIA driver on this machine (libcuda.so.1 does not load)"
    ort_facts, torch = env["onnxruntime"], env["torch"]
    if condition in ("ort_cuda", "gpu_only"):
        if not env["nvidia_driver"]:
            return no_driver
        if CUDA_PROVIDER not in ort_facts["available_providers"]:
            return (
                f"{ort_facts['package']} {ort_facts['version']} has no {CUDA_PROVIDER} "
                "(install onnxruntime-gpu, not onnxruntime)"
            )
        return None
    if condition in ("torch_cuda", "two_gpus"):
        if not env["nvidia_driver"]:
            return no_driver
        if torch["cuda_build"] is None:
            return (
                f"torch {torch['version']} is a CPU-only build: install a CUDA build "
                "(`make gpu-check TORCH_SPEC=...`, benchmarks/README.md)"
            )
        if not torch["cuda_available"]:
            return f"torch {torch['version']} (CUDA {torch['cuda_build']}) sees no GPU"
        if condition == "two_gpus" and torch["device_count"] < 2:
            return f"{torch['device_count']} GPU visible: DDP needs at least 2"
        return None
    raise ValueError(f"unknown condition {condition!r}")


# --- the shared state of one run ---------------------------------------------------------------


@dataclass
class Check:
    args: argparse.Namespace
    work: Path
    env: dict[str, Any]
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    run_dirs: dict[str, Path] = field(default_factory=dict)
    artifacts: dict[tuple[str, str], Path] = field(default_factory=dict)
    part_started: float = 0.0
    part_budget_s: float = 0.0
    _real: np.ndarray | None = None
    _training_data: Path | None = None

    @property
    def gpu(self) -> bool:
        return not self.args.cpu_rehearsal

    @property
    def provider(self) -> str:
        return CUDA_PROVIDER if self.gpu else CPU_PROVIDER

    @property
    def ort_device(self) -> str:
        """Where OrtValues live: onnxruntime's device name for this run's provider."""
        return "cuda" if self.gpu else "cpu"

    @property
    def serve_precision(self) -> str:
        """What a GPU serves (`galmorph export --fp16`); float32 for a CPU rehearsal."""
        return "fp16" if self.gpu else "fp32"

    def precisions(self, model: str) -> tuple[str, ...]:
        """The serving model gets both (parity compares them); sweep models --precisions."""
        if model == self.args.serve_model:
            return tuple(dict.fromkeys(("fp32", "fp16", *self.args.precisions)))
        return tuple(self.args.precisions)

    def models(self) -> list[str]:
        return list(dict.fromkeys([self.args.serve_model, *self.args.models]))

    def artifact(self, model: str, precision: str) -> Path:
        try:
            return self.artifacts[(model, precision)]
        except KeyError:
            raise Skipped(f"no {precision} export of {model} (see part export)") from None

    def real_images(self) -> np.ndarray:
        """The repository's 20 real Galaxy10 images at the model's input size."""
        if self._real is None:
            from galmorph.model.sample_images import load_images

            self._real, _ = load_images(REAL_IMAGES, size=self.args.img_size, count=64)
        return self._real

    def elapsed(self) -> float:
        return time.perf_counter() - self.part_started

    def best_batch(self, model: str, precision: str) -> int:
        series = self.results.get("batch_sweep", {}).get("series", {}).get(f"{model}/{precision}")
        if not series or series.get("best_batch") is None:
            raise Skipped(f"the batch sweep has no best batch size for {model} {precision}")
        return int(series["best_batch"])

    def training_data(self) -> Path:
        """A synthetic Galaxy10-layout file giving `train_steps / 2` steps per epoch, made by
        `galmorph data synth` in its own process (its worker pool forks, this process holds
        CUDA)."""
        if self._training_data is None:
            per_epoch = self.args.train_steps // 2 * self.args.train_batch_size
            # Balanced classes and 80 % for training: a multiple of 10 images per class share.
            count = 10 * math.ceil(per_epoch / 0.8 / 10)
            path = self.work / "train.h5"
            run_galmorph(
                self,
                *("data", "synth", "--out", path, "--n", str(count)),
                *("--size", str(self.args.img_size), "--workers", str(os.cpu_count() or 1)),
                "--quiet",
            )
            self._training_data = path
        return self._training_data


# --- helpers shared by the parts -----------------------------------------------------------


def judge(reference: np.ndarray, candidate: np.ndarray, tolerance: float) -> dict[str, Any]:
    """Probabilities against the reference: passed when max |Δp| <= tolerance.

    Argmax agreement is reported, not required: with random weights the top two classes are
    often within 1e-4 (seen: 3e-5 on the real images), so rounding within tolerance may swap
    them; a swap where the reference's top-2 margin exceeds twice the tolerance is impossible
    while max |Δp| <= tolerance.
    """
    if reference.shape != candidate.shape:
        raise CheckFailed(f"output shape {candidate.shape} differs from {reference.shape}")
    top2 = np.sort(reference, axis=1)[:, -2:]
    near_ties = int(((top2[:, 1] - top2[:, 0]) <= 2 * tolerance).sum())
    worst = float(np.abs(candidate.astype(np.float64) - reference).max())
    return {
        "max_abs_diff": worst,
        "tolerance": tolerance,
        "argmax_agreement": float((candidate.argmax(1) == reference.argmax(1)).mean()),
        "near_ties": near_ties,
        "images": len(reference),
        "passed": bool(worst <= tolerance),
    }


def best_of_sweep(points: dict[str, dict[str, Any]]) -> tuple[int | None, float | None]:
    """(batch, images/s): the smallest batch within KNEE_FRACTION of the best host-array rate."""
    rates = {
        int(batch): float(point["host_arrays"]["items_per_s"])
        for batch, point in points.items()
        if "host_arrays" in point
    }
    if not rates:
        return None, None
    top = max(rates.values())
    batch = min(b for b, rate in rates.items() if rate >= KNEE_FRACTION * top)
    return batch, rates[batch]


def gpus_for_catalog(images_per_s: float) -> int:
    """GPUs that score CATALOG_GALAXIES in NIGHT_HOURS at this per-GPU rate."""
    return math.ceil(CATALOG_GALAXIES / (images_per_s * NIGHT_HOURS * 3600))


def is_out_of_memory(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(marker in text for marker in OOM_MARKERS)


def tiled(images: np.ndarray, batch: int) -> np.ndarray:
    """`batch` images cycling through the given ones."""
    return np.ascontiguousarray(images[np.arange(batch) % len(images)])


def tail(text: str, limit: int = 2000) -> str:
    return text[-limit:]


def child_env() -> dict[str, str]:
    """The environment of galmorph child processes: this checkout importable, no settings
    inherited from a GALMORPH_ environment (a stray GALMORPH_PROVIDERS would change what runs)."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("GALMORPH_")}
    environment["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])
    )
    return environment


def run_galmorph(
    check: Check, *args: str | Path, launcher: Sequence[str] = (sys.executable,)
) -> subprocess.CompletedProcess[str]:
    """A `galmorph` command in a child process (under `launcher`, e.g. torchrun); a non-zero
    exit fails the part with the command's stderr."""
    command = [*launcher, "-m", "galmorph", *map(str, args)]
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=check.part_budget_s * HARD_STOP_FACTOR,
        env=child_env(),
        check=False,
    )
    if done.returncode != 0:
        raise CheckFailed(
            f"`galmorph {args[0]}` exited with {done.returncode}", {"stderr": tail(done.stderr)}
        )
    return done


def open_model(check: Check, path: Path) -> OnnxModel:
    """The serving engine on this run's provider, failing if that provider is not active."""
    from galmorph.core.modelfile.engine import OnnxModel

    model = OnnxModel(path, providers=[check.provider])
    if model.providers[:1] != [check.provider]:
        raise CheckFailed(
            f"{path.name}: asked for {check.provider}, session runs on {model.providers}"
        )
    return model


@contextmanager
def exact_fp32_torch() -> Iterator[None]:
    """PyTorch without TF32 (cuDNN convolutions use it by default): the fp32 reference."""
    import torch

    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def torch_reference(run_dir: Path, images: np.ndarray, device: str) -> np.ndarray:
    """Probabilities of the exported module (model.export.ImageClassifierGraph), fp32."""
    import torch

    from benchmarks.bench_models import torch_graph

    graph = torch_graph(run_dir).to(device)
    with exact_fp32_torch(), torch.inference_mode():
        probabilities = graph(torch.from_numpy(images).to(device))[0].float().cpu().numpy()
    del graph
    if device == "cuda":
        torch.cuda.empty_cache()
    return np.asarray(probabilities)


def run_training(
    check: Check,
    out: Path,
    launcher: Sequence[str] = (sys.executable,),
    precision: str = "bf16",
) -> tuple[subprocess.CompletedProcess[str], list[dict[str, Any]]]:
    """`galmorph train` on the synthetic file for two epochs; the process and its metrics."""
    args = check.args
    settings = {
        "img_size": args.img_size,
        "batch_size": args.train_batch_size,
        "epochs": 2,
        "warmup_epochs": 0.5,
        "device": "cuda" if check.gpu else "cpu",
        "precision": precision,
        "num_workers": min(4, os.cpu_count() or 1),
        "progress": False,
        "log_every_steps": 1,
    }
    overrides = [item for k, v in settings.items() for item in ("--set", f"{k}={json.dumps(v)}")]
    data = check.training_data()
    done = run_galmorph(
        check,
        *("train", "--data", data, "--model", args.serve_model, "--out", out, *overrides),
        launcher=launcher,
    )
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return done, records


# --- the parts -----------------------------------------------------------------------------------


def part_export(check: Check) -> dict[str, Any]:
    from benchmarks.bench_models import SEED, make_checkpoint, timed_export

    threads = os.cpu_count() or 1
    exported: dict[str, Any] = {}
    for model in check.models():
        run_dir = make_checkpoint(model, check.args.img_size, check.work / model / "run")
        check.run_dirs[model] = run_dir
        for precision in check.precisions(model):
            path, seconds = timed_export(
                run_dir, check.work / model / f"{precision}.onnx", threads, precision=precision
            )
            check.artifacts[(model, precision)] = path
            exported[f"{model}/{precision}"] = {
                "seconds": round(seconds, 1),
                "megabytes": round(path.stat().st_size / 1e6, 1),
            }
    return {
        "summary": ", ".join(f"{name} {e['seconds']} s" for name, e in exported.items()),
        "img_size": check.args.img_size,
        "weights": f"random initialisation (torch.manual_seed({SEED})): speed and parity do "
        "not depend on trained values",
        "artifacts": exported,
    }


def part_cuda_provider(check: Check) -> dict[str, Any]:
    import onnxruntime as ort

    from galmorph.core.modelfile.contract import INPUT_NAME, OUTPUT_NAME
    from galmorph.core.modelfile.engine import OnnxModel
    from galmorph.model.export import PARITY_TOLERANCE

    path = check.artifact(check.args.serve_model, "fp32")
    # No providers given on a GPU host: the default that serve and score use.
    model = OnnxModel(path, providers=None if check.gpu else [CPU_PROVIDER])
    result: dict[str, Any] = {
        "requested_providers": model.requested_providers,
        "active_providers": model.providers,
        "provider_options": model.session.get_provider_options().get(check.provider, {}),
    }
    if model.providers[:1] != [check.provider]:
        raise CheckFailed(
            f"{check.provider} was requested but the session runs on {model.providers}: "
            f"{model.placement.cpu_reason()}. A torch build for the CUDA that onnxruntime was "
            "built for carries the libraries (benchmarks/README.md, GPU readiness)",
            result,
        )
    images = check.real_images()[:4]
    device_input = ort.OrtValue.ortvalue_from_numpy(images, check.ort_device, 0)
    binding = model.session.io_binding()
    binding.bind_ortvalue_input(INPUT_NAME, device_input)
    binding.bind_output(OUTPUT_NAME, check.ort_device, 0)
    model.session.run_with_iobinding(binding)
    device_output = binding.get_outputs()[0]
    result["ortvalue_devices"] = {
        "input": device_input.device_name(),
        "output": device_output.device_name(),
    }
    result["io_binding_vs_predict_max_abs_diff"] = float(
        np.abs(device_output.numpy() - model.predict(images)).max()
    )
    if {name.lower() for name in result["ortvalue_devices"].values()} != {check.ort_device}:
        raise CheckFailed(f"OrtValues are not on {check.ort_device}", result)
    if result["io_binding_vs_predict_max_abs_diff"] > PARITY_TOLERANCE["fp32"]:
        raise CheckFailed("IO-bound output differs from predict() on the same session", result)
    result["torch_tensor"] = torch_tensor_on_device(check)
    return {
        "summary": f"session providers {model.providers}; OrtValues on "
        f"{result['ortvalue_devices']['output']}; torch: {result['torch_tensor']}",
        **result,
    }


def torch_tensor_on_device(check: Check) -> str:
    problem = condition_problem("torch_cuda", check.env, check.args.cpu_rehearsal)
    if problem or not check.gpu:
        return f"not checked: {problem or 'CPU rehearsal'}"
    import torch

    tensor = torch.arange(1024, device="cuda", dtype=torch.float32)
    total = float((tensor * 2).sum().item())
    if total != 1023 * 1024:
        raise CheckFailed(f"a sum on {tensor.device} gave {total}, not {1023 * 1024}")
    return f"computes on {tensor.device} ({torch.cuda.get_device_name(tensor.device)})"


def part_cuda_without_torch(check: Check) -> dict[str, Any]:
    path = check.artifact(check.args.serve_model, check.serve_precision)
    done = subprocess.run(
        [sys.executable, "-c", TORCH_FREE_PROBE, str(path), *([] if check.gpu else [CPU_PROVIDER])],
        capture_output=True,
        text=True,
        timeout=check.part_budget_s * HARD_STOP_FACTOR,
        env=child_env(),
        check=False,
    )
    if done.returncode != 0:
        raise CheckFailed(f"the probe exited with {done.returncode}", {"stderr": tail(done.stderr)})
    probe = json.loads(done.stdout.strip().splitlines()[-1])
    if probe["torch_imported"]:
        raise CheckFailed("the probe imported torch: it no longer tests a torch-free process")
    if probe["providers"][:1] != [check.provider]:
        raise CheckFailed(
            f"a process without torch runs on {probe['providers']} ({probe['cpu_reason']}), so "
            "`galmorph serve` and `galmorph score` would not run on the GPU here: onnxruntime "
            "does not find the CUDA and cuDNN libraries by itself. Install the versions it was "
            "built for (environment.onnxruntime.built_for_cuda) system-wide, or use the "
            "serving image (docker/serve.Dockerfile)",
            {"providers": probe["providers"], "stderr": tail(done.stderr)},
        )
    return {"summary": f"providers {probe['providers']}", "providers": probe["providers"]}


def part_parity(check: Check) -> dict[str, Any]:
    import onnxruntime as ort

    from galmorph.core.modelfile.contract import INPUT_NAME, OUTPUT_NAME
    from galmorph.model.export import PARITY_TOLERANCE

    torch_cuda = condition_problem("torch_cuda", check.env, check.args.cpu_rehearsal) is None
    device = "cuda" if check.gpu and torch_cuda else "cpu"
    images = check.real_images()
    cases: dict[str, Any] = {}
    for model_name in check.models():
        reference = torch_reference(check.run_dirs[model_name], images, device)
        for precision in check.precisions(model_name):
            path = check.artifact(model_name, precision)
            served = open_model(check, path)
            options = served.session.get_provider_options().get(check.provider, {})
            tf32 = precision == "fp32" and options.get("use_tf32") == "1"
            # TF32 keeps 10 mantissa bits, as fp16 does: fp16's tolerance applies.
            tolerance = PARITY_TOLERANCE["fp16" if tf32 else precision]
            cases[f"{model_name}/{precision}"] = {
                "session": f"as served (OnnxModel), use_tf32={options.get('use_tf32', 'n/a')}",
                **judge(reference, served.predict(images), tolerance),
            }
            del served
            if precision == "fp32" and check.gpu:
                strict = ort.InferenceSession(
                    str(path), providers=[(CUDA_PROVIDER, {"use_tf32": "0"})]
                )
                probabilities = strict.run([OUTPUT_NAME], {INPUT_NAME: images})[0]
                cases[f"{model_name}/fp32_no_tf32"] = {
                    "session": "onnxruntime CUDA with use_tf32=0",
                    **judge(reference, probabilities, PARITY_TOLERANCE["fp32"]),
                }
                del strict
    result = {
        "reference": f"PyTorch fp32 on {device}, TF32 off ({len(images)} real Galaxy10 images "
        f"from {REAL_IMAGES.relative_to(REPO_ROOT)})",
        "cases": cases,
    }
    failed = [name for name, case in cases.items() if not case["passed"]]
    if failed:
        raise CheckFailed(f"outside tolerance: {', '.join(failed)}", result)
    worst = {name: f"{case['max_abs_diff']:.1e}" for name, case in cases.items()}
    return {"summary": f"max |Δp| {worst}", **result}


class CudaGraphSession:
    """A session that captures its run as a CUDA graph and replays it: the batch dimension is
    fixed by a free-dimension override, input and outputs live at fixed device addresses."""

    def __init__(self, path: Path, images: np.ndarray, num_classes: int, batch_dim: str) -> None:
        import onnxruntime as ort

        from galmorph.core.modelfile.contract import INPUT_NAME

        options = ort.SessionOptions()
        options.add_free_dimension_override_by_name(batch_dim, len(images))
        self.session = ort.InferenceSession(
            str(path), options, providers=[(CUDA_PROVIDER, {"enable_cuda_graph": "1"})]
        )
        self.input = ort.OrtValue.ortvalue_from_numpy(images, "cuda", 0)
        self.outputs = {
            node.name: ort.OrtValue.ortvalue_from_shape_and_type(
                [len(images), num_classes], np.float32, "cuda", 0
            )
            for node in self.session.get_outputs()
        }
        self.binding = self.session.io_binding()
        self.binding.bind_ortvalue_input(INPUT_NAME, self.input)
        for name, value in self.outputs.items():
            self.binding.bind_ortvalue_output(name, value)

    def replay(self) -> None:
        self.session.run_with_iobinding(self.binding)
        self.binding.synchronize_outputs()

    def probabilities(self) -> np.ndarray:
        from galmorph.core.modelfile.contract import OUTPUT_NAME

        return np.asarray(self.outputs[OUTPUT_NAME].numpy())

    def update(self, images: np.ndarray) -> None:
        self.input.update_inplace(images)


def part_io_binding_cuda_graph(check: Check) -> dict[str, Any]:
    from benchmarks.bench_models import _io_bound_call, _timed_rounds, predict_call
    from galmorph.model.export import PARITY_TOLERANCE

    path = check.artifact(check.args.serve_model, "fp16")
    served = open_model(check, path)
    batch_dim = served.session.get_inputs()[0].shape[0]
    real = check.real_images()
    tolerance = PARITY_TOLERANCE["fp16"]
    per_batch: dict[str, Any] = {}
    for batch in check.args.graph_batch_sizes:
        first, second = tiled(real, batch), tiled(real[::-1], batch)
        expected_first, expected_second = served.predict(first), served.predict(second)
        contenders: dict[str, Callable[[], object]] = {
            "host_arrays": predict_call(served, first),
            "io_binding": _io_bound_call(served, first),
        }
        figures: dict[str, Any] = {}
        graph: CudaGraphSession | None = None
        try:
            graph = CudaGraphSession(path, first, expected_first.shape[1], str(batch_dim))
            # onnxruntime runs such a session normally at first, then captures the graph;
            # every run after that is a replay.
            for _ in range(3):
                graph.replay()
        except Exception as exc:  # onnxruntime's own exception types: any refusal
            graph = None
            figures["cuda_graph"] = {
                "supported": False,
                "reason": f"{type(exc).__name__}: {exc}"[:800],
            }
        if graph is not None:
            first_check = judge(expected_first, graph.probabilities(), tolerance)
            graph.update(second)
            graph.replay()
            second_check = judge(expected_second, graph.probabilities(), tolerance)
            figures["cuda_graph"] = {
                "supported": True,
                "parity_captured_input": first_check,
                "parity_after_inplace_update": second_check,
            }
            if not (first_check["passed"] and second_check["passed"]):
                raise CheckFailed(
                    f"CUDA graph replay at batch {batch} differs from predict()",
                    {"batches": {**per_batch, str(batch): figures}},
                )
            graph.update(first)
            contenders["cuda_graph"] = graph.replay
        timings = _timed_rounds(
            contenders, warmup=3, min_repeats=10, max_repeats=200, seconds=2.0, settle_s=0.0
        )
        for name, timing in timings.items():
            figures.setdefault(name, {}).update(timing.to_dict(items_per_call=batch))
        per_batch[str(batch)] = figures
        del graph
    headline = {
        batch: {
            name: round(f[name]["items_per_s"])
            for name in ("host_arrays", "io_binding", "cuda_graph")
            if "items_per_s" in f.get(name, {})
        }
        for batch, f in per_batch.items()
    }
    return {
        "summary": f"images/s by batch {headline}",
        "model": f"{check.args.serve_model} fp16",
        "batches": per_batch,
    }


def part_batch_sweep(check: Check) -> dict[str, Any]:
    from benchmarks.bench_models import _io_bound_call, _timed_rounds, predict_call, random_images

    args = check.args
    series_list = [(m, p) for m in args.models for p in check.precisions(m)]
    share = check.part_budget_s / len(series_list)
    all_series: dict[str, Any] = {}
    for model_name, precision in series_list:
        baseline = gpu_memory_used_mib() if check.gpu else None
        model = open_model(check, check.artifact(model_name, precision))
        started = time.perf_counter()
        points: dict[str, dict[str, Any]] = {}
        for batch in args.batch_sizes:
            if points and time.perf_counter() - started > share:
                points[str(batch)] = {
                    "status": "not run: this series' share of the budget is spent"
                }
                continue
            images = random_images(batch, args.img_size)
            contenders: dict[str, Callable[[], object]] = {
                "host_arrays": predict_call(model, images)
            }
            if check.gpu:
                contenders["io_binding"] = _io_bound_call(model, images)
            try:
                timings = _timed_rounds(
                    contenders,
                    warmup=2,
                    min_repeats=3,
                    max_repeats=30,
                    seconds=args.seconds_per_point,
                    settle_s=0.0,
                )
            except Exception as exc:  # onnxruntime raises untyped errors; only OOM ends a series
                if not is_out_of_memory(exc):
                    raise
                points[str(batch)] = {"status": "out of GPU memory", "error": str(exc)[:400]}
                break
            point: dict[str, Any] = {
                name: timing.to_dict(items_per_call=batch) for name, timing in timings.items()
            }
            used = gpu_memory_used_mib() if check.gpu else None
            if used is not None and baseline is not None:
                point["device_memory_mib"] = round(used - baseline, 1)
            points[str(batch)] = point
            print(
                f"  {model_name} {precision} batch {batch}: "
                + ", ".join(
                    f"{n} {t.to_dict(batch)['items_per_s']:.0f}/s" for n, t in timings.items()
                )
                + (f", {point['device_memory_mib']} MiB" if "device_memory_mib" in point else ""),
                flush=True,
            )
        best, rate = best_of_sweep(points)
        all_series[f"{model_name}/{precision}"] = {
            "providers": model.providers,
            "best_batch": best,
            "best_images_per_s": rate,
            "points": points,
        }
        del model
        gc.collect()
    return {
        "summary": ", ".join(
            f"{name} best batch {s['best_batch']} at {s['best_images_per_s'] or 0:.0f} images/s"
            for name, s in all_series.items()
        ),
        "best_batch_rule": f"smallest batch within {KNEE_FRACTION:.0%} of the best host-array rate",
        "memory": "nvidia-smi memory.used on the device minus before the session: onnxruntime's "
        "arena keeps its high-water mark, so it is the most any batch so far needed"
        if check.gpu
        else "not measured (CPU rehearsal)",
        "series": all_series,
    }


def part_service(check: Check) -> dict[str, Any]:
    import asyncio

    from benchmarks.bench_service import load, time_raw
    from tests.support.server_process import serve

    model_name, precision = check.args.serve_model, check.serve_precision
    batch = check.best_batch(model_name, precision)
    path = check.artifact(model_name, precision)
    uploads = [p.read_bytes() for p in sorted(REAL_IMAGES.glob("*.jpg"))]
    requests = max(check.args.service_requests, 8 * batch)
    raw_model = open_model(check, path)
    flags = ["--providers", check.provider, "--max-batch-size", str(batch), "--max-delay-ms", "2"]
    flags += ["--max-queue", str(max(1024, 4 * batch)), "--log-level", "warning"]
    if check.gpu:
        flags.append("--require-gpu")
    # The load is one client address with `batch` connections: allow it as many.
    env = {"GALMORPH_MAX_CONNECTIONS_PER_CLIENT": str(max(batch, 32))}
    with serve(path, check.work, *flags, env=env) as server:
        try:
            before = time_raw(raw_model, batch, requests)
            figures = asyncio.run(load(server.port, uploads, batch, requests, server.process.pid))
            after = time_raw(raw_model, batch, requests)
        except Exception as exc:  # the server's own log says what went wrong on its side
            message = f"{type(exc).__name__}: {exc}"
            raise CheckFailed(message, {"server_log": tail(server.log())}) from exc
    raw_rate = (before["images_per_s"] + after["images_per_s"]) / 2
    fraction = figures["requests_per_s"] / raw_rate
    return {
        "summary": f"{figures['requests_per_s']:.0f} requests/s at concurrency {batch} = "
        f"{fraction:.2f} of raw predict() ({raw_rate:.0f} images/s at batch {batch})",
        "model": f"{model_name} {precision}",
        "batch_size": batch,
        "concurrency": batch,
        "upload": f"real Galaxy10 JPEGs from {REAL_IMAGES.relative_to(REPO_ROOT)}",
        "service": figures,
        "raw_before": before,
        "raw_after": after,
        "fraction_of_raw": round(fraction, 3),
    }


def part_scorer(check: Check) -> dict[str, Any]:
    from benchmarks.bench_score import make_catalog
    from benchmarks.bench_service import time_raw

    model_name, precision = check.args.serve_model, check.serve_precision
    batch = check.best_batch(model_name, precision)
    path = check.artifact(model_name, precision)
    rows = check.args.score_rows
    catalog = make_catalog(check.work, "fits", rows)
    # docs/scoring.md: on a GPU node decode is the bottleneck, so it gets all cores but one.
    workers = max(1, (os.cpu_count() or 2) - 1)
    raw_model = open_model(check, path)
    before = time_raw(raw_model, batch, rows)
    done = run_galmorph(
        check,
        *("score", catalog, "--model", path, "--out", check.work / "scores"),
        *("--batch-size", str(batch), "--workers", str(workers)),
        *("--providers", check.provider, "--quiet", "--no-merge"),
    )
    after = time_raw(raw_model, batch, rows)
    if "was requested but the session runs on" in done.stderr:
        raise CheckFailed(
            "the scorer did not run on the requested provider", {"stderr": tail(done.stderr)}
        )
    summary = json.loads(done.stdout)
    if summary["errors"] or summary["rows_scored"] != rows:
        raise CheckFailed(f"scored {summary['rows_scored']} of {rows} rows", {"scorer": summary})
    raw_rate = (before["images_per_s"] + after["images_per_s"]) / 2
    fraction = summary["images_per_second"] / raw_rate
    return {
        "summary": f"{summary['images_per_second']:.0f} images/s = {fraction:.2f} of raw "
        f"predict() ({raw_rate:.0f} images/s at batch {batch}), {workers} decode workers",
        "model": f"{model_name} {precision}",
        "catalog": f"{rows} rows of 256x256 grz Legacy-Survey-style FITS cutouts "
        "(benchmarks.bench_score.make_catalog)",
        "batch_size": batch,
        "decode_workers": workers,
        "scorer": summary,
        "raw_before": before,
        "raw_after": after,
        "fraction_of_raw": round(fraction, 3),
    }


# What the trainer's log says it computed in, for each `precision` this part runs.
TRAINING_PRECISION_LOG = {"fp32": "precision: fp32", "bf16": "precision: bf16 autocast"}


def part_training(check: Check) -> dict[str, Any]:
    """fp32, then bf16 (the default on a GPU with bf16): the same steps, one after the other
    on an otherwise idle GPU. The top-level figures are bf16's (the DDP part compares them)."""
    args = check.args
    check.training_data()  # made before the memory baseline is taken
    runs = {precision: one_training(check, precision) for precision in TRAINING_PRECISION_LOG}
    fp32, bf16 = runs["fp32"], runs["bf16"]
    speedup = (
        bf16["images_per_s_by_epoch"][-1] / fp32["images_per_s_by_epoch"][-1]
        if fp32["images_per_s_by_epoch"] and bf16["images_per_s_by_epoch"]
        else None
    )
    peak = bf16["peak_gpu_memory_mib"]
    return {
        "summary": f"{bf16['steps']} steps, bf16 loss {bf16['first_loss']:.3f} -> "
        f"{bf16['last_loss']:.3f}; last epoch {fp32['images_per_s_by_epoch'][-1]:.0f} images/s "
        f"fp32, {bf16['images_per_s_by_epoch'][-1]:.0f} bf16"
        + (f" ({speedup:.2f}x)" if speedup else "")
        + (f", peak GPU memory {peak} MiB" if peak is not None else ""),
        "model": args.serve_model,
        "img_size": args.img_size,
        "batch_size": args.train_batch_size,
        "bf16_speedup": round(speedup, 2) if speedup else None,
        "numerics": "bf16 autocast, loss in fp32, no GradScaler (bf16 keeps fp32's exponent "
        "range), fp32 weights and checkpoints",
        **bf16,
        "by_precision": runs,
    }


def one_training(check: Check, precision: str) -> dict[str, Any]:
    """Two epochs at `precision`: its steps, losses, images/s per epoch and memory."""
    args = check.args
    with MemoryPeak() as memory:
        done, records = run_training(check, check.work / f"train_{precision}", precision=precision)
    steps = [r for r in records if r["kind"] == "step"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    losses = [float(r["loss"]) for r in steps]
    device = "cuda" if check.gpu else "cpu"
    result = {
        "steps": len(steps),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "images_per_s_by_epoch": [round(float(e["images_per_s"]), 1) for e in epochs],
        "peak_gpu_memory_mib": memory.above_baseline_mib(),
    }
    if len(steps) < args.train_steps:
        raise CheckFailed(f"{precision}: {len(steps)} steps ran, not {args.train_steps}", result)
    if not all(math.isfinite(loss) for loss in losses):
        raise CheckFailed(f"{precision}: a training loss is not finite", result)
    for expected in (f" on {device}", TRAINING_PRECISION_LOG[precision]):
        if expected not in done.stderr:
            raise CheckFailed(
                f"the trainer's log does not say {expected.strip()!r}",
                {"stderr": tail(done.stderr)},
            )
    return result


def part_ddp(check: Check) -> dict[str, Any]:
    nproc = int(check.env["torch"]["device_count"])
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone")
    done, records = run_training(
        check, check.work / "ddp_run", (*launcher, f"--nproc_per_node={nproc}")
    )
    stderr = done.stderr
    if "joined the nccl process group" not in stderr or f"x {nproc} process(es)" not in stderr:
        raise CheckFailed(f"the log does not show {nproc} NCCL ranks", {"stderr": tail(stderr)})
    epochs = [r for r in records if r["kind"] == "epoch"]
    rate = float(epochs[-1]["images_per_s"]) if epochs else 0.0
    single = check.results.get("training", {}).get("images_per_s_by_epoch") or [None]
    efficiency = rate / (nproc * single[-1]) if single[-1] else None
    return {
        "summary": f"{nproc} ranks over NCCL, {rate:.0f} images/s"
        + (f", {efficiency:.2f} of {nproc}x one GPU" if efficiency else ""),
        "ranks": nproc,
        "steps": sum(1 for r in records if r["kind"] == "step"),
        "images_per_s": rate,
        "scaling_efficiency": efficiency,
    }


PARTS = (
    Part(
        "export",
        90,
        "astroformer exports (fp32, fp16) at the check's image size",
        part_export,
        ("ort_cuda",),
    ),
    Part(
        "cuda_provider",
        20,
        "session providers, OrtValues on the GPU, a torch tensor",
        part_cuda_provider,
        ("ort_cuda", "export"),
    ),
    Part(
        "cuda_without_torch",
        20,
        "the CUDA provider in a torch-free process (serve, score)",
        part_cuda_without_torch,
        ("ort_cuda", "export"),
    ),
    Part(
        "parity",
        40,
        "fp32/fp16 onnxruntime vs PyTorch on real images",
        part_parity,
        ("ort_cuda", "export", "cuda_provider"),
    ),
    Part(
        "io_binding_cuda_graph",
        30,
        "host arrays vs IO binding vs CUDA graph replay",
        part_io_binding_cuda_graph,
        ("gpu_only", "export", "cuda_provider"),
    ),
    Part(
        "batch_sweep",
        130,
        "images/s and GPU memory at each batch size",
        part_batch_sweep,
        ("ort_cuda", "export", "cuda_provider"),
    ),
    Part(
        "service",
        40,
        "HTTP service at the best batch size vs raw predict()",
        part_service,
        ("ort_cuda", "export", "cuda_without_torch", "batch_sweep"),
    ),
    Part(
        "scorer",
        40,
        "batch scorer at the best batch size vs raw predict()",
        part_scorer,
        ("ort_cuda", "export", "cuda_without_torch", "batch_sweep"),
    ),
    Part(
        "training",
        130,
        "training steps of `galmorph train` on the GPU, fp32 then bf16",
        part_training,
        ("torch_cuda",),
    ),
    Part(
        "ddp",
        75,
        "torchrun DDP over NCCL on every visible GPU",
        part_ddp,
        ("torch_cuda", "two_gpus"),
    ),
)
PART_NAMES = tuple(part.name for part in PARTS)


# --- running the parts ---------------------------------------------------------------------


@contextmanager
def hard_stop(seconds: float) -> Iterator[None]:
    """Raise PartTimeout in the main thread after `seconds` (waits on subprocesses included).

    A timer thread signals the main thread with SIGUSR1, leaving SIGALRM to others (pytest-timeout).
    """

    def stop(signum: int, frame: FrameType | None) -> None:
        raise PartTimeout(f"stopped after {seconds:.0f} s ({HARD_STOP_FACTOR}x its budget)")

    previous = signal.signal(signal.SIGUSR1, stop)
    main_thread = threading.main_thread().ident
    assert main_thread is not None
    timer = threading.Timer(seconds, signal.pthread_kill, (main_thread, signal.SIGUSR1))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        timer.join()
        signal.signal(signal.SIGUSR1, previous)


def unmet_need(check: Check, part: Part) -> str | None:
    for need in part.needs:
        if need in PART_NAMES:
            earlier = check.results.get(need)
            if earlier is None:
                return f"needs part {need}, which was not selected"
            if earlier["status"] != "ok":
                why = earlier.get("reason") or earlier.get("error", "")
                return f"needs part {need}, which {earlier['status']}: {why}"
        elif problem := condition_problem(need, check.env, check.args.cpu_rehearsal):
            return problem
    return None


def run_part(check: Check, part: Part, index: int, total: int) -> dict[str, Any]:
    budget = part.budget_s
    print(
        f"[gpu-check] ({index}/{total}) {part.name}: budget {budget} s, stopped at "
        f"{budget * HARD_STOP_FACTOR} s -- {part.what}",
        flush=True,
    )
    reason = unmet_need(check, part)
    if reason is not None:
        record: dict[str, Any] = {"status": "skipped", "reason": reason, "budget_s": budget}
        print(f"[gpu-check] {part.name}: skipped -- {reason}", flush=True)
        return record
    check.part_started, check.part_budget_s = time.perf_counter(), budget
    try:
        with hard_stop(budget * HARD_STOP_FACTOR):
            record = {"status": "ok", **part.run(check)}
    except Skipped as exc:
        record = {"status": "skipped", "reason": str(exc)}
    except Exception as exc:  # any failure is recorded and the next part runs
        record = {
            "status": "failed",
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc(limit=6)[-3000:],
            **(exc.details if isinstance(exc, CheckFailed) else {}),
        }
    seconds = check.elapsed()
    record.update(seconds=round(seconds, 1), budget_s=budget, over_budget=seconds > budget)
    line = record.get("summary") or record.get("reason") or record.get("error")
    print(f"[gpu-check] {part.name}: {record['status']} in {seconds:.1f} s -- {line}", flush=True)
    return record


def selected_parts(only: Sequence[str] | None) -> list[Part]:
    """The parts asked for with every part they need, in the canonical order."""
    if not only:
        return list(PARTS)
    wanted, pending = set(), list(only)
    by_name = {part.name: part for part in PARTS}
    while pending:
        name = pending.pop()
        if name not in wanted:
            wanted.add(name)
            pending += [need for need in by_name[name].needs if need in by_name]
    return [part for part in PARTS if part.name in wanted]


def run_parts(check: Check, parts: Sequence[Part]) -> dict[str, dict[str, Any]]:
    for index, part in enumerate(parts, 1):
        check.results[part.name] = run_part(check, part, index, len(parts))
    return check.results


# --- reporting ---------------------------------------------------------------------------------


def plan_lines(env: dict[str, Any], parts: Sequence[Part], rehearsal: bool) -> list[str]:
    lines = ["part                    budget  hard stop  conditions"]
    for part in parts:
        problems = [
            problem
            for need in part.needs
            if need not in PART_NAMES and (problem := condition_problem(need, env, rehearsal))
        ]
        note = f"will skip: {problems[0]}" if problems else "will run"
        lines.append(
            f"{part.name:<22} {part.budget_s:>5} s  {part.budget_s * HARD_STOP_FACTOR:>7} s  {note}"
        )
    runnable = sum(
        part.budget_s
        for part in parts
        if not any(
            condition_problem(need, env, rehearsal) for need in part.needs if need not in PART_NAMES
        )
    )
    lines.append(f"budget of the parts that can run here: {runnable} s ({runnable / 60:.1f} min)")
    return lines


def environment_line(env: dict[str, Any]) -> str:
    gpus = env["gpus"]
    gpu_text = (
        ", ".join(
            f"{g['name']} ({g['memory_mib'] / 1024:.0f} GiB, driver {g['driver']})" for g in gpus
        )
        if isinstance(gpus, list) and gpus
        else f"no GPU listed ({gpus if isinstance(gpus, str) else 'none'})"
    )
    ort_facts, torch = env["onnxruntime"], env["torch"]
    return (
        f"GPUs: {gpu_text}; {ort_facts['package']} {ort_facts['version']} (built for CUDA "
        f"{ort_facts['built_for_cuda']}); torch {torch['version']} (CUDA {torch['cuda_build']}, "
        f"available: {torch['cuda_available']})"
    )


def capacity_lines(results: dict[str, dict[str, Any]]) -> list[str]:
    """Measured galaxies per hour and GPUs for the night's catalog (docs/capacity.md). The
    scorer's fraction of raw, measured for the serving model, is applied to every model."""
    series = results.get("batch_sweep", {}).get("series", {})
    scorer = results.get("scorer", {})
    fraction = scorer.get("fraction_of_raw") if scorer.get("status") == "ok" else None
    lines = []
    for name, figures in series.items():
        rate = figures.get("best_images_per_s")
        if not rate:
            continue
        effective = rate * (fraction or 1.0)
        lines.append(
            f"| {name} | {figures['best_batch']} | {rate:.0f} | {effective * 3600 / 1e6:.2f} | "
            f"{gpus_for_catalog(effective)} |"
        )
    if not lines:
        return []
    basis = f"scorer fraction {fraction:.2f} applied" if fraction else "raw rate (no scorer figure)"
    return [
        f"## Capacity from these numbers ({basis}; formula in docs/capacity.md)",
        "",
        "| model | best batch | raw images/s | M galaxies/hour | GPUs for "
        f"{CATALOG_GALAXIES / 1e6:.0f} M in {NIGHT_HOURS:.0f} h |",
        "|---|---|---|---|---|",
        *lines,
    ]


def summary_markdown(payload: dict[str, Any]) -> str:
    mode = ": CPU rehearsal (a harness check, not GPU figures)" if payload["rehearsal"] else ""
    lines = [
        f"# make gpu-check{mode}, {payload['created']}",
        "",
        environment_line(payload["environment"]),
        "",
        "| part | status | seconds (budget) | result |",
        "|---|---|---|---|",
    ]
    for name, record in payload["parts"].items():
        text = record.get("summary") or record.get("reason") or record.get("error", "")
        over = " over budget" if record.get("over_budget") else ""
        seconds = f"{record.get('seconds', '-')}{over}"
        lines.append(
            f"| {name} | {record['status']} | {seconds} ({record['budget_s']}) | "
            f"{str(text).replace('|', '/')[:400]} |"
        )
    capacity = [] if payload["rehearsal"] else capacity_lines(payload["parts"])
    return "\n".join([*lines, "", *capacity, ""] if capacity else [*lines, ""])


# --- main ------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="results JSON (summary beside it)"
    )
    parser.add_argument(
        "--only", nargs="+", choices=PART_NAMES, help="these parts and what they need"
    )
    parser.add_argument(
        "--plan", action="store_true", help="print the parts and budgets, run nothing"
    )
    parser.add_argument(
        "--cpu-rehearsal", action="store_true", help="run on the CPU provider (harness check)"
    )
    parser.add_argument(
        "--models", nargs="+", default=["astroformer_0", "astroformer_4"], help="swept models"
    )
    parser.add_argument(
        "--serve-model",
        default="astroformer_0",
        help="model for parity, graph, service, scorer, training",
    )
    parser.add_argument(
        "--precisions",
        nargs="+",
        choices=("fp32", "fp16"),
        default=["fp16"],
        help="swept precisions",
    )
    parser.add_argument("--img-size", type=int, default=256)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[2**k for k in range(9)])
    parser.add_argument(
        "--seconds-per-point", type=float, default=0.5, help="timing per sweep point"
    )
    parser.add_argument("--graph-batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--service-requests", type=int, default=1024)
    parser.add_argument("--score-rows", type=int, default=4096)
    parser.add_argument("--train-steps", type=int, default=50, help="even: two epochs of half each")
    parser.add_argument(
        "--train-batch-size", type=int, default=64, help="even (mixup pairs images)"
    )
    args = parser.parse_args(argv)
    for name in ("batch_sizes", "graph_batch_sizes"):
        if min(getattr(args, name)) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.train_steps < 2 or args.train_steps % 2 or args.train_batch_size % 2:
        parser.error("--train-steps (>= 2) and --train-batch-size must be even")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    env = environment()
    parts = selected_parts(args.only)
    print(f"[gpu-check] {environment_line(env)}", flush=True)
    for line in plan_lines(env, parts, args.cpu_rehearsal):
        print(f"[gpu-check] {line}", flush=True)
    if args.plan:
        return 0
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="galmorph-gpu-check-") as tmp:
        check = Check(args, Path(tmp), env)
        results = run_parts(check, parts)
    failed = [name for name, record in results.items() if record["status"] == "failed"]
    payload: dict[str, Any] = {
        "check": "make gpu-check (benchmarks/gpu_check.py)",
        "rehearsal": args.cpu_rehearsal,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "environment": env,
        "seconds": round(time.perf_counter() - started, 1),
        "parts": {
            part.name: results.get(part.name)
            or {"status": "skipped", "reason": "not selected (--only)", "budget_s": part.budget_s}
            for part in PARTS
        },
        "failed": failed,
    }
    write_results(args.out, payload)
    document = json.loads(args.out.read_text())
    summary = summary_markdown(document)
    summary_path = args.out.with_name(f"{args.out.stem}_summary.md")
    summary_path.write_text(summary)
    print(summary)
    print(
        f"[gpu-check] wrote {args.out} and {summary_path}; failed: {failed or 'none'}", flush=True
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
