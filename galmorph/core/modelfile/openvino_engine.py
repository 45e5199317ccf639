"""OpenVINO's CPU runtime on the same ONNX file, in bf16 on CPUs with bf16 units.

onnxruntime's x86 CPU provider computes in fp32 only. On a CPU whose flags list avx512_bf16 or
amx_bf16, OpenVINO compiling the very file with INFERENCE_PRECISION_HINT=bf16 runs the
convolutions and matmuls on those units (astroformer_0, batch 32, 2 threads: 1.8-1.9x
onnxruntime fp32 here, benchmarks/results/*_cpu_engines.json, docs/scoring.md). It reads the
ONNX file itself, so no second artifact exists, and the `openvino` package does not clash with
onnxruntime-gpu (onnxruntime's OpenVINO execution provider would: it ships its own
`onnxruntime` module).

Measured and not chosen (issue #30): onnxruntime-openvino 1.24.1's execution provider refuses
`precision=BF16` on a CPU and falls back to the CPU provider with a warning; with
`load_config` {"CPU": {"INFERENCE_PRECISION_HINT": "bf16"}} bf16 does apply but ran ~25 %
slower than OpenVINO's own runtime on the same file. Static int8 (model/export.py) was slower
than fp32 on onnxruntime and moves probabilities by up to 0.23 (benchmarks/results/models.json
"int8"), outside any parity tolerance the card's answers allow.

The answers stay the card's: at load the fp32 onnxruntime session (kept: it also answers the
graph's input/output specs and the card) and the bf16 compiled model score the file's sample
images (contract.read_sample_images: held-out images the export stored), or PARITY_IMAGES fixed
synthetic images for a file without them; a probability further than PARITY_TOLERANCE from fp32,
or a compiled model with no layer in bf16, refuses this engine (EngineUnavailable). `open_model`
in engine_choice.py then falls back to onnxruntime with one log line under `auto`, or fails when
openvino was asked for.

The parity run is most of this engine's load (astroformer_0, 256 px, one thread: 2.0 of 2.5 s,
against 0.35 s for onnxruntime alone), so its result is cached per (file sha256, openvino
version, CPU flags) in parity_cache_dir(); the tolerance is applied to the cached difference.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import threading
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from galmorph.core.cpu import CPU_BF16_FLAGS, cpu_bf16_flags, cpu_flags
from galmorph.core.files import atomic_write_text, user_cache_dir
from galmorph.core.modelfile.contract import INPUT_NAME, OUTPUT_NAME, SAMPLE_IMAGES_KEY
from galmorph.core.modelfile.engine import (
    CPU_PROVIDER,
    CUDA_PROVIDER,
    ModelLoadError,
    OnnxModel,
    nvidia_driver_present,
)

logger = logging.getLogger(__name__)

# /proc/cpuinfo flags of the units that compute bf16 natively (AVX512-BF16 dot products, AMX);
# training/precision.py reads the same flags for bf16 autocast.
# Largest |p_bf16 - p_fp32| allowed on any class probability of any parity image: one point
# of probability, below what a reader of a class probability acts on. It also keeps the top-1
# class of every image whose fp32 top-two margin exceeds 2 * PARITY_TOLERANCE (neither
# probability can cross the other), so only near ties may flip. Measured (docs/scoring.md,
# "CPU-only hosts"): random-weight astroformer_0 moves by 5e-4; gm_astroformer_small trained on
# real SDSS galaxies by at most ~0.011 on 84 real images (median 4e-4): accepted on its own
# samples; the demo's gm_astroformer_tiny (temperature 0.44 sharpens its logits 2.3x) by 0.08:
# refused. A wider tolerance would pass a model whose real answers move by several points.
PARITY_TOLERANCE = 0.01
PARITY_IMAGES = 8
PARITY_SEED = 30
# Where parity results are kept ("off": nowhere, every load checks); bump the layout when the
# parity images or how they are scored change, so older results are not reused.
PARITY_CACHE_ENV = "GALMORPH_PARITY_CACHE"
PARITY_CACHE_LAYOUT = "v1"
# The layers that do the arithmetic; bf16 on none of them means the hint did not apply.
COMPUTE_LAYERS = ("Convolution", "FullyConnected", "MatMul", "Gemm")


class EngineUnavailable(ModelLoadError):
    """The openvino engine cannot run this model here: why is the message (one line)."""


def openvino_installed() -> bool:
    return importlib.util.find_spec("openvino") is not None


def openvino_refusal(providers: Sequence[str] | None) -> str | None:
    """Why the openvino engine may not run here, or None when it may: it needs the package,
    bf16 units, and a host or a providers choice that does not mean CUDA."""
    if providers and CUDA_PROVIDER in providers:
        return "the providers name CUDAExecutionProvider and the openvino engine runs on the CPU"
    if not providers and nvidia_driver_present():
        return "an NVIDIA driver is present: the GPU path (onnxruntime CUDA) comes first"
    if not openvino_installed():
        return "the openvino package is not installed (pip install 'galmorph[cpu]')"
    if not cpu_bf16_flags():
        return f"this CPU has none of {', '.join(CPU_BF16_FLAGS)} (bf16 would be emulated)"
    return None


def parity_cache_dir() -> Path | None:
    """$GALMORPH_PARITY_CACHE (None when it is "off"), else $XDG_CACHE_HOME/galmorph/
    openvino-parity, else ~/.cache/galmorph/openvino-parity."""
    explicit = os.environ.get(PARITY_CACHE_ENV)
    if explicit == "off":
        return None
    if explicit:
        return Path(explicit).expanduser()
    return user_cache_dir("openvino-parity")


class ParityCache:
    """One file per (model file, openvino version, CPU flags): the largest probability
    difference measured there and on which images. A missing, unreadable or unwritable entry
    means the check runs again; it never stops a load."""

    def __init__(self, folder: Path, model_sha256: str, openvino_version: str) -> None:
        self.key = {
            "layout": PARITY_CACHE_LAYOUT,
            "model_sha256": model_sha256,
            "openvino": openvino_version,
            "cpu_flags": " ".join(sorted(cpu_flags())),
        }
        digest = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()
        self.path = folder / f"{digest}.json"

    def read(self) -> tuple[float, str] | None:
        """(max |dp|, the images it was measured on) when this key was checked before."""
        try:
            entry = json.loads(self.path.read_text(encoding="utf-8"))
            if entry["key"] == self.key:
                return float(entry["max_abs_diff"]), str(entry["parity_images"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return None

    def write(self, max_abs_diff: float, images: str) -> None:
        entry = {"key": self.key, "max_abs_diff": max_abs_diff, "parity_images": images}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, json.dumps(entry, indent=1))
        except OSError as exc:  # a read-only home: the check simply runs at every load
            logger.info("openvino parity result not cached at %s: %s", self.path, exc)


def parity_images(height: int, width: int) -> np.ndarray:
    """PARITY_IMAGES fixed uint8 images: half smooth galaxy-like ellipses of varied size,
    shape and colour over sky noise (what the model sees), half uniform noise (activations
    far from the usual, where low precision shows first)."""
    rng = np.random.default_rng(PARITY_SEED)
    y, x = np.mgrid[-1 : 1 : height * 1j, -1 : 1 : width * 1j]
    images = []
    for index in range(PARITY_IMAGES):
        if index % 2:
            images.append(rng.integers(0, 256, (height, width, 3)))
            continue
        angle, axis_ratio, radius = (
            rng.uniform(0, np.pi),
            rng.uniform(0.3, 1),
            rng.uniform(0.1, 0.5),
        )
        u = x * np.cos(angle) + y * np.sin(angle)
        v = (-x * np.sin(angle) + y * np.cos(angle)) / axis_ratio
        light = np.exp(-np.sqrt(u**2 + v**2) / radius)
        colour = rng.uniform(0.5, 1.0, 3)
        sky = rng.normal(0.0, 0.03, (height, width, 3))
        images.append(np.clip((light[..., None] * colour + sky) * 255, 0, 255))
    return np.stack(images).astype(np.uint8)


@functools.cache
def _core() -> Any:
    """One OpenVINO Core for the process: each Core loads its own plugins and thread pools,
    and a process that made one per model load (the test suite) crashed later (SIGSEGV)."""
    import openvino as ov

    return ov.Core()


class OpenVinoModel(OnnxModel):
    """The model compiled by OpenVINO for the CPU in bf16: OnnxModel's interface (run,
    predict, card, output_names), checked against onnxruntime fp32 at load."""

    def __init__(
        self,
        path: str | Path,
        *,
        providers: Sequence[str] | None = None,
        intra_op_threads: int | None = None,
        inter_op_threads: int | None = None,
    ) -> None:
        if providers and CUDA_PROVIDER in providers:
            raise EngineUnavailable(
                "engine openvino runs on the CPU but the providers name CUDAExecutionProvider"
            )
        # The fp32 reference: it checks the contract, reads the card and answers parity.
        super().__init__(
            path,
            providers=list(providers or [CPU_PROVIDER]),
            intra_op_threads=intra_op_threads,
            inter_op_threads=inter_op_threads,
        )
        if self.card.precision != "fp32":  # --fp16 (GPUs) and --int8 files: not measured here
            raise EngineUnavailable(
                f"engine openvino runs fp32 files in bf16; {self.path} is {self.card.precision}"
            )
        try:
            import openvino as ov
        except ImportError as exc:
            raise EngineUnavailable(
                f"engine openvino needs the openvino package (pip install 'galmorph[cpu]'): {exc}"
            ) from exc
        self.openvino_version = str(ov.__version__).split("-")[0]
        config: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": "bf16",
            # One stream: a batch uses every thread, as onnxruntime's session does.
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": intra_op_threads or 0,
        }
        try:
            self.compiled = _core().compile_model(str(self.graph_file), "CPU", config)
        except RuntimeError as exc:
            raise EngineUnavailable(
                f"openvino cannot compile {self.path}: {' '.join(str(exc).split())[:300]}"
            ) from exc
        self.bf16_layers, self.compute_layers = self._bf16_layers()
        if self.bf16_layers == 0:
            raise EngineUnavailable(
                f"openvino {self.openvino_version} ran none of the {self.compute_layers} "
                "convolution/matmul layers in bf16 (the hint did not apply on this CPU)"
            )
        # InferRequests are not thread-safe; the server runs batches from several threads.
        self._requests = threading.local()
        self.parity_cached = False
        self.parity_max_abs_diff, self.parity_source = self._parity()
        self.engine_reason = "openvino asked for"
        logger.info(
            "model %s on openvino %s CPU bf16 (%d of %d convolution/matmul layers), "
            "parity with onnxruntime fp32 %.2g <= %g on %s",
            self.path,
            self.openvino_version,
            self.bf16_layers,
            self.compute_layers,
            self.parity_max_abs_diff,
            PARITY_TOLERANCE,
            self.parity_source,
        )

    @property
    def engine(self) -> str:
        return "openvino"

    def engine_report(self) -> dict[str, Any]:
        return {
            "engine": self.engine,
            "version": self.openvino_version,
            "device": "CPU",
            "precision": "bf16",
            "bf16_layers": f"{self.bf16_layers} of {self.compute_layers} convolution/matmul",
            "parity_max_abs_diff": round(self.parity_max_abs_diff, 6),
            "parity_tolerance": PARITY_TOLERANCE,
            "parity_images": self.parity_source,
            "parity_cached": self.parity_cached,
            "chosen": self.engine_reason,
        }

    def _bf16_layers(self) -> tuple[int, int]:
        """(compute layers running in bf16, compute layers) from the compiled execution graph:
        what the CPU plugin really runs, not the hint it was given."""
        counts: Counter[str] = Counter()
        for op in self.compiled.get_runtime_model().get_ordered_ops():
            info = op.get_rt_info()
            if info["layerType"].astype(str) in COMPUTE_LAYERS:
                counts[info["runtimePrecision"].astype(str)] += 1
        return counts["bf16"], sum(counts.values())

    def _parity_images(self) -> tuple[np.ndarray, str]:
        """(the images parity is checked on, which they are in words): the card's samples,
        else the synthetic ones."""
        if self.sample_images is not None:
            return self.sample_images, f"{len(self.sample_images)} card samples"
        metadata = self.session.get_modelmeta().custom_metadata_map
        malformed = SAMPLE_IMAGES_KEY in metadata
        why = "its samples are malformed" if malformed else "the file has no samples"
        return parity_images(*self.input_size), f"{PARITY_IMAGES} synthetic: {why}"

    def _parity(self) -> tuple[float, str]:
        """(max |p_bf16 - p_fp32|, the images it was measured on), measured or cached;
        EngineUnavailable beyond PARITY_TOLERANCE."""
        folder = parity_cache_dir()
        cache = None if folder is None else ParityCache(folder, self.sha256, self.openvino_version)
        known = None if cache is None else cache.read()
        if known is not None:
            self.parity_cached = True
            diff, source = known
        else:
            images, source = self._parity_images()
            diff = self._max_abs_diff(images)
            if cache is not None:
                cache.write(diff, source)
        if not diff <= PARITY_TOLERANCE:  # NaN fails too
            cached = f" (cached in {cache.path})" if known is not None and cache is not None else ""
            raise EngineUnavailable(
                f"openvino bf16 probabilities differ from onnxruntime fp32 by {diff:.4f} "
                f"(> {PARITY_TOLERANCE}) on {source}{cached}"
            )
        return diff, source

    def _max_abs_diff(self, images: np.ndarray) -> float:
        # A batch-of-one graph takes the images one at a time.
        batches = [images] if self.max_batch_size is None else np.split(images, len(images))
        reference = np.concatenate([OnnxModel._infer(self, [OUTPUT_NAME], b)[0] for b in batches])
        answer = np.concatenate([self._infer([OUTPUT_NAME], b)[0] for b in batches])
        return float(np.abs(answer - reference).max())

    def _infer(self, names: list[str], images: np.ndarray) -> list[np.ndarray]:
        request = getattr(self._requests, "request", None)
        if request is None:
            request = self._requests.request = self.compiled.create_infer_request()
        results = request.infer({INPUT_NAME: images})
        # The request reuses its output buffers on the next batch: copy what we hand out.
        return [np.array(results[self.compiled.output(name)]) for name in names]
