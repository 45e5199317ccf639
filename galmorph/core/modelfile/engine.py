"""onnxruntime inference for galmorph models: one session, the contract checked at load time.

Used by the server, the batch scorer, evaluation and benchmarks, so the model is opened,
validated and run in exactly one way. Providers: CUDA first when this onnxruntime build offers
it and an NVIDIA driver is installed, then CPU. `get_available_providers()` lists CUDA even
when its libraries cannot load, so what we report is `session.get_providers()` after the
session exists — the providers the model really runs on — and, when CUDA is missing from them,
the reason (`Placement.cpu_reason`).

`engine_choice.open_model` picks the engine (`auto`, `onnxruntime`, `openvino`): this OnnxModel,
or OpenVINO in bf16 on CPU-only hosts with bf16 units (openvino_engine), which keeps OnnxModel's
interface and its fp32 session as the reference its answers are checked on.

`GpuPolicy` decides whether a CPU session may run at all: never with require_gpu; on a host
with an NVIDIA driver only with allow_cpu_fallback (or when the caller chose CPU providers
itself); always on a host without one. `galmorph serve` and `galmorph score` check it with
`probe_placement` before they start, the server again when its model is loaded.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import io
import logging
import multiprocessing
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from galmorph.core.modelfile.artifact import artifact_sha256, graph_file
from galmorph.core.modelfile.contract import (
    EMBEDDINGS_NAME,
    INPUT_NAME,
    OOD_SCORE_NAME,
    OUTPUT_NAME,
    ModelCard,
    ModelOutputs,
    read_sample_images,
)

logger = logging.getLogger(__name__)

CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"
PREFERRED_PROVIDERS = (CUDA_PROVIDER, CPU_PROVIDER)
# onnxruntime's log severities: warning is its default, fatal silences it.
ORT_LOG_WARNING, ORT_LOG_FATAL = 2, 4

# File name of an onnxruntime provider library ("cuda", "shared"), beside its Python module.
PROVIDER_LIBRARY = (
    "onnxruntime_providers_{}.dll" if sys.platform == "win32" else "libonnxruntime_providers_{}.so"
)
# y = Relu(x) on one float, the smallest graph a CUDA session can be tried on (probe_placement):
# onnx.helper.make_model(make_graph([make_node("Relu", ["x"], ["y"])], "probe", [x], [y]),
# opset 13, ir_version 8), x and y float [1], serialised. The serving install has no `onnx`;
# tests/service/test_gpu_fallback.py checks these bytes with it.
PROBE_MODEL = (
    b'\x08\x08\x12\x00:7\n\x0c\n\x01x\x12\x01y"\x04Relu\x12\x05probeZ\x0f\n\x01x\x12\n\n'
    b"\x08\x08\x01\x12\x04\n\x02\x08\x01b\x0f\n\x01y\x12\n\n"
    b"\x08\x08\x01\x12\x04\n\x02\x08\x01B\x04\n\x00\x10\r"
)


class ModelLoadError(ValueError):
    """The file is missing, is not ONNX, or does not follow the galmorph model contract."""


class CpuFallbackError(RuntimeError):
    """The session would run on the CPU where the GPU policy demands CUDA (GpuPolicy)."""


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


def cuda_library_error() -> str | None:
    """The loader's error for onnxruntime's CUDA provider library (a missing CUDA or cuDNN
    library, by name), or None when it loads.

    onnxruntime only logs this failure and carries on without CUDA; loading the same file
    again is how the reason reaches our own error message.
    """
    capi = Path(ort.__file__).parent / "capi"
    try:
        # The CUDA library takes Provider_GetHost from the shared one; onnxruntime loads them
        # in this order too.
        ctypes.CDLL(str(capi / PROVIDER_LIBRARY.format("shared")), mode=ctypes.RTLD_GLOBAL)
        ctypes.CDLL(str(capi / PROVIDER_LIBRARY.format("cuda")))
    except OSError as exc:
        return str(exc)
    return None


def _one_line(text: str) -> str:
    return " ".join(text.split())


@dataclass(frozen=True)
class Placement:
    """Which providers a session was asked for and which it really runs on."""

    requested: tuple[str, ...]
    active: tuple[str, ...]
    chosen: bool  # the caller named the providers; False: default_providers()
    cuda_error: str | None = None  # onnxruntime's exception when CUDA failed at session start

    @property
    def cuda_active(self) -> bool:
        return CUDA_PROVIDER in self.active

    def cpu_reason(self) -> str:
        """Why CUDA is not among the active providers, as precisely as this host can tell."""
        if self.chosen and CUDA_PROVIDER not in self.requested:
            return (
                f"CUDAExecutionProvider was not asked for (providers: {', '.join(self.requested)})"
            )
        if not nvidia_driver_present():
            return (
                "no NVIDIA driver (libcuda.so.1 does not load: no GPU, or none passed to this "
                "container)"
            )
        if CUDA_PROVIDER not in ort.get_available_providers():
            return (
                f"this onnxruntime build ({ort.__version__}) has no CUDAExecutionProvider: "
                "install onnxruntime-gpu instead of onnxruntime"
            )
        if self.cuda_error is not None:
            return f"CUDAExecutionProvider failed to start: {self.cuda_error}"
        if (load_error := cuda_library_error()) is not None:
            return f"CUDAExecutionProvider failed to load: {_one_line(load_error)}"
        return (
            "CUDAExecutionProvider did not start although its library loads "
            "(onnxruntime's log above says why: no visible GPU, or a driver too old for its CUDA)"
        )


@dataclass(frozen=True)
class GpuPolicy:
    """When a session may run on the CPU. One rule for the server and the scorer:

    - require_gpu: never; CUDA must be active.
    - allow_cpu_fallback: always (a warning says why CUDA is not used).
    - neither: on a host without an NVIDIA driver, and where the caller chose providers
      without CUDA; refused where a driver is present and CUDA was meant to run but did not.
    """

    require_gpu: bool = False
    allow_cpu_fallback: bool = False
    # How the user of this command allows the fallback, named in the refusal.
    allow_hint: str = "--allow-cpu-fallback"

    def __post_init__(self) -> None:
        if self.require_gpu and self.allow_cpu_fallback:
            raise ValueError(
                "require_gpu and allow_cpu_fallback contradict each other: set at most one"
            )

    def refusal(self, placement: Placement) -> str | None:
        """The one-line reason this placement may not run, or None when it may."""
        if placement.cuda_active:
            return None
        if self.require_gpu:
            return f"require_gpu is set but the session runs on the CPU: {placement.cpu_reason()}"
        if self.allow_cpu_fallback or not nvidia_driver_present():
            return None
        if placement.chosen and CUDA_PROVIDER not in placement.requested:
            return None
        return (
            "an NVIDIA driver is present but the session would run on the CPU: "
            f"{placement.cpu_reason()}; fix CUDA, or allow the CPU with {self.allow_hint}"
        )

    def check(self, placement: Placement) -> None:
        """Raise CpuFallbackError when the placement may not run (OnnxModel itself warns when
        CUDA was asked for and is not active)."""
        if (reason := self.refusal(placement)) is not None:
            raise CpuFallbackError(reason)


def _requested(providers: Sequence[str] | None) -> list[str]:
    """The providers to ask for: these, checked by name, or default_providers()."""
    requested = list(providers) if providers else default_providers()
    unknown = [name for name in requested if name not in ort.get_all_providers()]
    if unknown:
        # onnxruntime only warns about a misspelt provider and silently runs on another one.
        raise ModelLoadError(
            f"unknown onnxruntime provider(s) {', '.join(unknown)}; this build offers "
            f"{', '.join(ort.get_available_providers())}"
        )
    return requested


@cache
def _preload_cuda_libraries() -> None:
    """Load CUDA and cuDNN from the nvidia-* pip packages when that is where they are.

    Without torch imported first (the server and the scorer never import it), onnxruntime does
    not look there, and a pip-only GPU host would fall back to the CPU. Where the libraries are
    system-wide (the CUDA base image) or absent, this changes nothing; what onnxruntime prints
    about missing ones is dropped, since the session's own failure names them.
    """
    preload = getattr(ort, "preload_dlls", None)
    if preload is None or not nvidia_driver_present():
        return
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            preload()
        except Exception as exc:  # best effort: the session start reports what is missing
            logger.debug("onnxruntime.preload_dlls failed: %s", exc)


def _start_session(
    source: str | bytes, options: ort.SessionOptions, providers: list[str]
) -> tuple[ort.InferenceSession, str | None]:
    """The session, and onnxruntime's error if CUDA failed while the session was made.

    onnxruntime's own wrapper catches that error, prints it and retries on the CPU, so the
    reason would only be on stdout; the retry is done here instead (enable_fallback=0) to keep
    it. A model that cannot load fails the CPU retry too, with its own error.
    """
    if CUDA_PROVIDER in providers:
        _preload_cuda_libraries()
    try:
        session = ort.InferenceSession(
            source, sess_options=options, providers=providers, enable_fallback=0
        )
        return session, None
    except Exception as exc:  # onnxruntime raises its own untyped exception classes
        if CUDA_PROVIDER not in providers:
            raise
        without_cuda = [name for name in providers if name != CUDA_PROVIDER] or [CPU_PROVIDER]
        session = ort.InferenceSession(source, sess_options=options, providers=without_cuda)
        return session, _one_line(str(exc))


def probe_placement(providers: Sequence[str] | None = None) -> Placement:
    """Where a model would run with these providers (None: default_providers()), found by
    starting a session on a one-node graph: no model file needed, so a command can refuse
    before it reads a catalog or opens a port. A misspelt provider raises ModelLoadError.

    A CUDA probe runs in a child process: the CUDA context it creates (hundreds of MB of GPU
    memory) would otherwise stay with the caller, e.g. a server's parent process whose workers
    each load the model themselves."""
    requested = _requested(providers)
    if CUDA_PROVIDER in requested:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
            return pool.submit(_probe_here, requested, bool(providers)).result()
    return _probe_here(requested, bool(providers))


def _probe_here(requested: list[str], chosen: bool) -> Placement:
    # onnxruntime would log its CUDA failure in several lines of its own; the reason is in
    # Placement.cpu_reason, so the caller's one-line refusal says it alone.
    ort.set_default_logger_severity(ORT_LOG_FATAL)
    try:
        session, cuda_error = _start_session(PROBE_MODEL, ort.SessionOptions(), requested)
    finally:
        ort.set_default_logger_severity(ORT_LOG_WARNING)
    return Placement(tuple(requested), tuple(session.get_providers()), chosen, cuda_error)


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
        # Models over 2 GiB are folders: the graph file with its weights beside it.
        self.graph_file = graph_file(self.path)
        if not self.graph_file.is_file():
            raise ModelLoadError(f"model file not found: {self.graph_file}")
        self.sha256 = artifact_sha256(self.path)
        self.requested_providers = _requested(providers)

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
            self.session, cuda_error = _start_session(
                str(self.graph_file), options, self.requested_providers
            )
        except Exception as exc:  # onnxruntime raises its own untyped exception classes
            raise ModelLoadError(f"onnxruntime cannot load {self.path}: {exc}") from exc
        self.providers: list[str] = list(self.session.get_providers())
        self.placement = Placement(
            tuple(self.requested_providers), tuple(self.providers), bool(providers), cuda_error
        )
        self.intra_op_threads = intra_op_threads
        self.inter_op_threads = inter_op_threads
        # Why this engine runs the model; engine_choice.open_model says how `auto` decided.
        self.engine_reason = "onnxruntime asked for"

        metadata = self.session.get_modelmeta().custom_metadata_map
        try:
            self.card = ModelCard.from_metadata(metadata)
        except ValueError as exc:
            raise ModelLoadError(f"{self.path}: {exc}") from exc
        self.input_size: tuple[int, int] = (
            int(self.card.input_size[0]),
            int(self.card.input_size[1]),
        )
        # None when the file has none, or bad ones (a warning says why; the model still loads).
        self.sample_images = read_sample_images(metadata, self.input_size, self.path)
        self.max_batch_size = self._check_graph()
        self.output_names = self._output_names()

        logger.info(
            "model %s (sha256 %s…) providers requested %s, active %s",
            self.path,
            self.sha256[:12],
            self.requested_providers,
            self.providers,
        )
        if CUDA_PROVIDER in self.requested_providers and not self.cuda_active:
            logger.warning(
                "CUDAExecutionProvider was requested but the session runs on %s: %s",
                self.providers,
                self.placement.cpu_reason(),
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

    def _output_names(self) -> list[str]:
        """probabilities, then the optional outputs this file has (older files lack them)."""
        present = {node.name for node in self.session.get_outputs()}
        if OOD_SCORE_NAME in present and self.card.ood_threshold is None:
            raise ModelLoadError(
                f"{self.path}: output {OOD_SCORE_NAME!r} but no threshold in the metadata "
                "(galmorph.ood)"
            )
        optional = [name for name in (EMBEDDINGS_NAME, OOD_SCORE_NAME) if name in present]
        return [OUTPUT_NAME, *optional]

    @property
    def has_embeddings(self) -> bool:
        return EMBEDDINGS_NAME in self.output_names

    @property
    def has_ood(self) -> bool:
        return OOD_SCORE_NAME in self.output_names

    @property
    def embedding_size(self) -> int | None:
        """D of the embeddings output [N, D]; None when the file has none."""
        for node in self.session.get_outputs():
            if node.name == EMBEDDINGS_NAME and isinstance(node.shape[-1], int):
                return int(node.shape[-1])
        return None

    @property
    def cuda_active(self) -> bool:
        return self.placement.cuda_active

    @property
    def ort_version(self) -> str:
        return str(ort.__version__)

    def _check_images(self, images: np.ndarray) -> None:
        height, width = self.input_size
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (height, width, 3):
            raise ValueError(
                f"expected uint8 images of shape (N, {height}, {width}, 3), "
                f"got {images.dtype} {images.shape}"
            )

    @property
    def engine(self) -> str:
        """Which runtime runs the batches (engine_choice.ENGINES); openvino_engine overrides it."""
        return "onnxruntime"

    def engine_report(self) -> dict[str, Any]:
        """What runs the model, for GET /model, the scorer's manifest and `model inspect`."""
        return {
            "engine": self.engine,
            "version": self.ort_version,
            "providers": self.providers,
            "precision": self.card.precision,  # the file's own: fp32, fp16 or int8
            "chosen": self.engine_reason,
        }

    def _infer(self, names: list[str], images: np.ndarray) -> list[np.ndarray]:
        """The named outputs for checked images: the one place a batch reaches the runtime."""
        return list(self.session.run(names, {INPUT_NAME: images}))

    def predict(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, 3) -> float32 (N, K) class probabilities."""
        self._check_images(images)
        (probabilities,) = self._infer([OUTPUT_NAME], images)
        return np.asarray(probabilities, dtype=np.float32)

    def run(self, images: np.ndarray) -> ModelOutputs:
        """uint8 (N, H, W, 3) -> probabilities and the optional outputs this file has
        (embeddings, OOD score and the in-distribution flag from the card's threshold)."""
        self._check_images(images)
        results = self._infer(self.output_names, images)
        values = dict(zip(self.output_names, results, strict=True))
        embeddings = values.get(EMBEDDINGS_NAME)
        score = values.get(OOD_SCORE_NAME)
        threshold = self.card.ood_threshold
        return ModelOutputs(
            probabilities=np.asarray(values[OUTPUT_NAME], dtype=np.float32),
            embeddings=None if embeddings is None else np.asarray(embeddings, dtype=np.float32),
            ood_score=None if score is None else np.asarray(score, dtype=np.float32),
            in_distribution=None if score is None or threshold is None else score <= threshold,
        )

    def warm_up(self, batch_sizes: Sequence[int] = (1,)) -> None:
        """Run blank batches so the first real request does not pay for allocation/tuning."""
        height, width = self.input_size
        for size in batch_sizes:
            size = min(size, self.max_batch_size or size)
            self.predict(np.zeros((size, height, width, 3), np.uint8))
