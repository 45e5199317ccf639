"""onnxruntime inference for galmorph models: one session, the contract checked at load time.

Used by the server, the batch scorer, evaluation and benchmarks, so the model is opened,
validated and run in exactly one way. Providers: CUDA first when this onnxruntime build offers
it and an NVIDIA driver is installed, then CPU. `get_available_providers()` lists CUDA even
when its libraries cannot load, so
what we report is `session.get_providers()` after the session exists — the providers the model
really runs on.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import numpy as np
import onnxruntime as ort

from galmorph.core.contract import INPUT_NAME, OUTPUT_NAME, ModelCard
from galmorph.core.files import sha256_file

logger = logging.getLogger(__name__)

CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"
PREFERRED_PROVIDERS = (CUDA_PROVIDER, CPU_PROVIDER)


class ModelLoadError(ValueError):
    """The file is missing, is not ONNX, or does not follow the galmorph model contract."""


@cache
def nvidia_driver_present() -> bool:
    """Whether the NVIDIA driver library loads: without it no CUDA provider can start."""
    for name in ("libcuda.so.1", "nvcuda.dll"):
        try:
            ctypes.CDLL(name)
        except OSError:
            continue
        return True
    return False


def default_providers() -> list[str]:
    """CUDA then CPU, keeping those this onnxruntime build has; CUDA only with a driver.

    onnxruntime-gpu lists CUDA on any host and, asked for it without a driver, prints a
    failure before falling back: on CPU-only hosts we do not ask.
    """
    available = set(ort.get_available_providers())
    if not nvidia_driver_present():
        available.discard(CUDA_PROVIDER)
    return [name for name in PREFERRED_PROVIDERS if name in available]


class OnnxModel:
    """A galmorph ONNX model: uint8 NHWC images in, class probabilities out."""

    def __init__(
        self,
        path: str | Path,
        *,
        providers: Sequence[str] | None = None,
        intra_op_threads: int | None = None,
        inter_op_threads: int | None = None,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelLoadError(f"model file not found: {self.path}")
        self.sha256 = sha256_file(self.path)
        self.requested_providers = list(providers) if providers else default_providers()
        unknown = [name for name in self.requested_providers if name not in ort.get_all_providers()]
        if unknown:
            # onnxruntime only warns about a misspelt provider and silently runs on another one.
            raise ModelLoadError(
                f"unknown onnxruntime provider(s) {', '.join(unknown)}; this build offers "
                f"{', '.join(ort.get_available_providers())}"
            )

        options = ort.SessionOptions()
        # 0 lets onnxruntime pick (one thread per physical core); callers sharing a machine
        # pass explicit counts.
        options.intra_op_num_threads = intra_op_threads or 0
        options.inter_op_num_threads = inter_op_threads or 0
        # With memory patterns on, the second run at each new batch size allocates a fresh
        # planned block: measured here 1.6 s instead of 0.33 s (gm_astroformer_tiny, batch 32)
        # and 3.5 s instead of 1.3 s (astroformer_0, batch 16), so one warm-up run was not
        # enough. Off, the arena reuses its blocks from the first run on; steady-state speed
        # was equal within 3 % (benchmarks/README.md).
        options.enable_mem_pattern = False
        try:
            self.session = ort.InferenceSession(
                str(self.path), sess_options=options, providers=self.requested_providers
            )
        except Exception as exc:  # onnxruntime raises its own untyped exception classes
            raise ModelLoadError(f"onnxruntime cannot load {self.path}: {exc}") from exc
        self.providers: list[str] = list(self.session.get_providers())
        self.intra_op_threads = intra_op_threads
        self.inter_op_threads = inter_op_threads

        try:
            self.card = ModelCard.from_metadata(self.session.get_modelmeta().custom_metadata_map)
        except ValueError as exc:
            raise ModelLoadError(f"{self.path}: {exc}") from exc
        self.input_size: tuple[int, int] = (
            int(self.card.input_size[0]),
            int(self.card.input_size[1]),
        )
        self.max_batch_size = self._check_graph()

        logger.info(
            "model %s (sha256 %s…) providers requested %s, active %s",
            self.path,
            self.sha256[:12],
            self.requested_providers,
            self.providers,
        )
        if CUDA_PROVIDER in self.requested_providers and not self.cuda_active:
            logger.warning(
                "CUDAExecutionProvider was requested but the session runs on %s "
                "(CUDA/cuDNN libraries missing or no GPU visible)",
                self.providers,
            )

    def _check_graph(self) -> int | None:
        """Check names, dtype and shape; return 1 for a batch-of-one graph, else None."""
        inputs = {node.name: node for node in self.session.get_inputs()}
        outputs = {node.name for node in self.session.get_outputs()}
        if INPUT_NAME not in inputs:
            raise ModelLoadError(f"{self.path}: no input named {INPUT_NAME!r} ({list(inputs)})")
        if OUTPUT_NAME not in outputs:
            raise ModelLoadError(f"{self.path}: no output named {OUTPUT_NAME!r} ({outputs})")
        node = inputs[INPUT_NAME]
        if node.type != "tensor(uint8)":
            raise ModelLoadError(f"{self.path}: input {INPUT_NAME!r} is {node.type}, not uint8")
        shape = list(node.shape)
        height, width = self.input_size
        if len(shape) != 4 or shape[1:] != [height, width, 3]:
            raise ModelLoadError(
                f"{self.path}: input shape {shape} does not match [N, {height}, {width}, 3] "
                "from the model metadata"
            )
        batch = shape[0]
        if isinstance(batch, int) and batch != 1:
            raise ModelLoadError(
                f"{self.path}: batch dimension fixed at {batch}; export with a dynamic batch"
            )
        # A graph exported with N fixed at 1 still works, one image per run.
        return 1 if batch == 1 else None

    @property
    def cuda_active(self) -> bool:
        return CUDA_PROVIDER in self.providers

    @property
    def ort_version(self) -> str:
        return str(ort.__version__)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, 3) -> float32 (N, K) class probabilities."""
        height, width = self.input_size
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (height, width, 3):
            raise ValueError(
                f"expected uint8 images of shape (N, {height}, {width}, 3), "
                f"got {images.dtype} {images.shape}"
            )
        (probabilities,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: images})
        return np.asarray(probabilities, dtype=np.float32)

    def warm_up(self, batch_sizes: Sequence[int] = (1,)) -> None:
        """Run blank batches so the first real request does not pay for allocation/tuning."""
        height, width = self.input_size
        for size in batch_sizes:
            size = min(size, self.max_batch_size or size)
            self.predict(np.zeros((size, height, width, 3), np.uint8))
