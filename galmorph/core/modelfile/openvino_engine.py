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
graph's input/output specs and the card) and the bf16 compiled model score PARITY_IMAGES
fixed images; a probability further than PARITY_TOLERANCE from fp32, or a compiled model with no
layer in bf16, refuses this engine (EngineUnavailable). `open_model` in engine.py then falls
back to onnxruntime with one log line under `auto`, or fails when openvino was asked for.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from galmorph.core.cpu import CPU_BF16_FLAGS, cpu_bf16_flags
from galmorph.core.modelfile.contract import INPUT_NAME, OUTPUT_NAME
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
# Largest |p_bf16 - p_fp32| allowed on any class probability of the parity images: one point
# of probability, below what a reader of a class probability acts on. Random-weight
# astroformer_0 moved by 5e-4 (runs in bf16); the demo's trained gm_astroformer_tiny by 0.057
# (refused: on the 20 real Galaxy10 images bf16 moved it by 0.073 and flipped a near tie).
PARITY_TOLERANCE = 0.01
PARITY_IMAGES = 8
PARITY_SEED = 30
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
            self.compiled = ov.Core().compile_model(str(self.graph_file), "CPU", config)
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
        self.parity_max_abs_diff = self._parity()
        self.engine_reason = "openvino asked for"
        logger.info(
            "model %s on openvino %s CPU bf16 (%d of %d convolution/matmul layers), "
            "parity with onnxruntime fp32 %.2g <= %g",
            self.path,
            self.openvino_version,
            self.bf16_layers,
            self.compute_layers,
            self.parity_max_abs_diff,
            PARITY_TOLERANCE,
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

    def _parity(self) -> float:
        images = parity_images(*self.input_size)
        # A batch-of-one graph takes the images one at a time.
        batches = [images] if self.max_batch_size is None else np.split(images, len(images))
        reference = np.concatenate([OnnxModel._infer(self, [OUTPUT_NAME], b)[0] for b in batches])
        answer = np.concatenate([self._infer([OUTPUT_NAME], b)[0] for b in batches])
        diff = float(np.abs(answer - reference).max())
        if not diff <= PARITY_TOLERANCE:  # NaN fails too
            raise EngineUnavailable(
                f"openvino bf16 probabilities differ from onnxruntime fp32 by {diff:.4f} "
                f"(> {PARITY_TOLERANCE}) on the parity images"
            )
        return diff

    def _infer(self, names: list[str], images: np.ndarray) -> list[np.ndarray]:
        request = getattr(self._requests, "request", None)
        if request is None:
            request = self._requests.request = self.compiled.create_infer_request()
        results = request.infer({INPUT_NAME: images})
        # The request reuses its output buffers on the next batch: copy what we hand out.
        return [np.array(results[self.compiled.output(name)]) for name in names]
