"""Export a trained checkpoint to the self-describing ONNX file the service and scorer use.

Graph contract (galmorph/core/contract.py): input `images` uint8 [N, H, W, 3]; the /255, mean/std
and NHWC->NCHW steps run inside the graph (galmorph.model.preprocess.ImagePreprocess, the module
training itself uses); outputs `probabilities` float32 [N, K] (softmax) and `logits`. N is
dynamic, H and W are fixed (the relative position tables are sized for them).

Exporter choice, measured on this kind of machine: the dynamo exporter at opset 20 emits
ONNX's native Gelu op, which onnxruntime runs as one kernel; at opset 18 GELU decomposes into
Div/Erf/Add/Mul chains that ORT does not fuse back (1.3-1.7x slower on
gm_astroformer_tiny/small and astroformer_0, batch 8, one thread; issue 3 reports 1.6-2.8x).
Attention is written as matmul + softmax in model/attention.py, so no SDPA kernel choice is
involved in tracing.

Every export is checked before it is moved into place: onnxruntime against PyTorch on random
uint8 batches (batch 1 and 5) and on real images when given; fp32 must agree to
max |Δp| <= 1e-4 with identical argmax, or the export fails and leaves no file behind.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from galmorph.model.checkpoint import ModelSpec, load_model
from galmorph.model.preprocess import ImagePreprocess
from torch import nn

from galmorph import __version__
from galmorph.core.contract import INPUT_NAME, LOGITS_NAME, METADATA_PREFIX, OUTPUT_NAME, ModelCard
from galmorph.core.files import atomic_write

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")
# Tolerance on probabilities for the export to pass. fp16 rounds activations to 11 bits;
# int8 is judged by the accuracy change on held-out images instead (recorded, not enforced).
PARITY_TOLERANCE = {"fp32": 1e-4, "fp16": 5e-3}
PARITY_KEY = METADATA_PREFIX + "export_parity"
# protobuf cannot serialise a single file above 2 GiB; the graph holds fp32 weights.
MAX_SINGLE_FILE_BYTES = 2**31 - 2**24
RANDOM_BATCH_SIZES = (1, 5)


class ExportError(RuntimeError):
    """The export could not be produced or did not reproduce the PyTorch model."""


class ImageClassifierGraph(nn.Module):
    """uint8 NHWC images -> (probabilities, logits): what the ONNX graph computes."""

    def __init__(
        self,
        model: nn.Module,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        compute_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.preprocess = ImagePreprocess(mean, std)
        self.model = model.to(compute_dtype)
        self.compute_dtype = compute_dtype

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.preprocess(images).to(self.compute_dtype)
        logits = self.model(x).float()
        return logits.softmax(dim=-1), logits


@dataclass(frozen=True)
class ParityReport:
    """onnxruntime vs PyTorch (fp32) on the same uint8 images."""

    max_abs_diff: float  # max |Δp| over all probabilities
    argmax_agreement: float  # fraction of images with the same top class
    num_images: int
    num_real_images: int
    tolerance: float | None  # None: recorded, not enforced

    @property
    def passed(self) -> bool:
        if self.tolerance is None:
            return True
        return self.max_abs_diff <= self.tolerance and self.argmax_agreement == 1.0


@dataclass
class ExportReport:
    path: Path
    card: ModelCard
    parity: ParityReport
    seconds: dict[str, float] = field(default_factory=dict)  # export, parity, quantize, total
    size_bytes: int = 0


def build_card(
    spec: ModelSpec,
    *,
    precision: str = "fp32",
    metrics: dict[str, Any] | None = None,
) -> ModelCard:
    """The ModelCard (ONNX metadata) of a checkpoint; explicit metrics override the spec's."""
    return ModelCard(
        model_name=spec.name,
        class_names=spec.class_names,
        input_size=(spec.img_size, spec.img_size),
        mean=spec.mean,
        std=spec.std,
        stretch=spec.stretch,
        bands=dict(spec.bands),
        pixel_scale=spec.pixel_scale,
        interpolation=spec.interpolation,
        precision=precision,
        model_config={
            "name": spec.name,
            "num_classes": spec.num_classes,
            "img_size": spec.img_size,
            "drop_rate": spec.drop_rate,
            "drop_path_rate": spec.drop_path_rate,
        },
        training_data=dict(spec.training_data),
        metrics={**spec.metrics, **(metrics or {})},
        package_version=__version__,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )


def export_onnx(
    run_dir: str | os.PathLike[str], out_path: str | os.PathLike[str], **options: Any
) -> Path:
    """Export a run folder's checkpoint to ONNX and return the file; options as `export_model`."""
    return export_model(run_dir, out_path, **options).path


def export_model(
    run_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    opset: int = 20,
    parity_images: np.ndarray | None = None,
    metrics: dict[str, Any] | None = None,
    precision: str = "fp32",
    calib_images: np.ndarray | None = None,
    eval_images: np.ndarray | None = None,
    eval_labels: np.ndarray | None = None,
    intra_op_threads: int | None = None,
    seed: int = 0,
) -> ExportReport:
    """Checkpoint (model.safetensors + model.json) -> verified ONNX file at out_path.

    parity_images: real uint8 NHWC images at the model's input size, checked in addition to
    random ones. int8 needs calib_images (static QDQ calibration) and eval_images/eval_labels
    (held-out images on which the accuracy change is measured and stored in the metadata).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "int8" and (calib_images is None or eval_images is None or eval_labels is None):
        raise ValueError("int8 export needs calibration images and labelled evaluation images")
    started = time.perf_counter()
    model, spec = load_model(run_dir)
    size = spec.img_size
    for what, images in (("parity", parity_images), ("calibration", calib_images)):
        if images is not None:
            _check_images(images, size, what)
    if eval_images is not None:
        _check_images(eval_images, size, "evaluation")
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    card = build_card(spec, precision=precision, metrics=metrics)
    reference = ImageClassifierGraph(model, spec.mean, spec.std).eval()
    _check_single_file_size(model)
    seconds: dict[str, float] = {}

    with tempfile.TemporaryDirectory(prefix=".export-", dir=out.parent) as work_dir:
        work = Path(work_dir)
        tick = time.perf_counter()
        graph_dtype = torch.float16 if precision == "fp16" else torch.float32
        graph_module = (
            reference
            if graph_dtype == torch.float32
            else ImageClassifierGraph(
                _copy_model(spec, model), spec.mean, spec.std, compute_dtype=graph_dtype
            ).eval()
        )
        proto = _trace_to_onnx(graph_module, size, opset)
        seconds["export"] = time.perf_counter() - tick
        candidate = work / "model.onnx"
        _save(proto, candidate, card)

        rng = np.random.default_rng(seed)
        random_batches = [
            rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
            for n in RANDOM_BATCH_SIZES
        ]
        real = [] if parity_images is None else list(_chunks(parity_images, 16))
        tick = time.perf_counter()
        if precision == "int8":
            # The float graph must be right before it is quantised.
            _require(
                check_parity(candidate, reference, random_batches, real, "fp32", intra_op_threads),
                "fp32 graph",
            )
            assert calib_images is not None and eval_images is not None
            assert eval_labels is not None
            quantised = work / "model.int8.onnx"
            qtick = time.perf_counter()
            quantize_int8(candidate, quantised, calib_images, work)
            seconds["quantize"] = time.perf_counter() - qtick
            card = replace(
                card,
                metrics={
                    **card.metrics,
                    "int8_eval": int8_accuracy_change(
                        candidate, quantised, eval_images, eval_labels, intra_op_threads
                    ),
                },
            )
            candidate = work / "final.onnx"
            _save(_load(quantised), candidate, card)
        parity = check_parity(
            candidate, reference, random_batches, real, precision, intra_op_threads
        )
        seconds["parity"] = time.perf_counter() - tick
        _require(parity, precision)
        final = _load(candidate)
        _set_metadata(final, card, parity)
        with atomic_write(out) as staged:
            _write_proto(final, staged)
    seconds["total"] = time.perf_counter() - started
    report = ExportReport(out, card, parity, seconds, out.stat().st_size)
    log.info(
        "exported %s (%s, %.1f MB) in %.1fs; parity max|Δp|=%.2e argmax agreement=%.3f",
        out,
        precision,
        report.size_bytes / 1e6,
        seconds["total"],
        parity.max_abs_diff,
        parity.argmax_agreement,
    )
    return report


def _check_images(images: np.ndarray, size: int, what: str) -> None:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (size, size, 3):
        raise ValueError(
            f"{what} images must be uint8 (N, {size}, {size}, 3), "
            f"got {images.dtype} {tuple(images.shape)}"
        )
    if len(images) == 0:
        raise ValueError(f"{what} images are empty")


def _check_single_file_size(model: nn.Module) -> None:
    weight_bytes = sum(t.numel() * 4 for t in model.state_dict().values())
    if weight_bytes > MAX_SINGLE_FILE_BYTES:
        raise ExportError(
            f"{weight_bytes / 2**30:.2f} GiB of fp32 weights exceed the 2 GiB limit of a "
            "single-file ONNX model"
        )


def _copy_model(spec: ModelSpec, model: nn.Module) -> nn.Module:
    """A second instance with the same weights (the fp16 graph must not touch the reference)."""
    twin = spec.build()
    twin.load_state_dict(model.state_dict())
    return twin.eval()


def _trace_to_onnx(graph_module: nn.Module, size: int, opset: int) -> onnx.ModelProto:
    # Batch 2 as the example: torch.export specialises sizes 0 and 1.
    example = torch.zeros(2, size, size, 3, dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=65536)
    with torch.no_grad():
        program = torch.onnx.export(
            graph_module,
            (example,),
            dynamo=True,
            opset_version=opset,
            external_data=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME, LOGITS_NAME],
            dynamic_shapes={"images": {0: batch}},
            verbose=False,
        )
    if program is None:
        raise ExportError("torch.onnx.export returned no program")
    proto = program.model_proto
    got = {entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx")}
    if got != {opset}:
        # The exporter silently raises too-old opsets (17 -> 18); say so instead.
        raise ExportError(f"asked for opset {opset}, the exporter produced {sorted(got)}")
    return proto


def _set_metadata(proto: onnx.ModelProto, card: ModelCard, parity: ParityReport | None) -> None:
    import json

    props = card.to_metadata()
    if parity is not None:
        props[PARITY_KEY] = json.dumps(asdict(parity))
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "galmorph"
    proto.producer_version = __version__
    proto.doc_string = f"galmorph {card.model_name} ({card.precision}): uint8 NHWC -> probabilities"


def _save(proto: onnx.ModelProto, path: Path, card: ModelCard) -> None:
    _set_metadata(proto, card, None)
    _write_proto(proto, path)


def _write_proto(proto: onnx.ModelProto, path: Path) -> None:
    import onnx

    onnx.checker.check_model(proto)
    onnx.save_model(proto, str(path))


def _load(path: Path) -> onnx.ModelProto:
    import onnx

    return onnx.load_model(str(path))


def _chunks(images: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(images), size):
        yield images[start : start + size]


def _session(path: Path, intra_op_threads: int | None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if intra_op_threads is not None:
        options.intra_op_num_threads = intra_op_threads
    # Parity is a CPU check: the same numbers on every host, GPU or not.
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def check_parity(
    onnx_path: Path,
    reference: nn.Module,
    random_batches: Sequence[np.ndarray],
    real_batches: Sequence[np.ndarray],
    precision: str,
    intra_op_threads: int | None = None,
) -> ParityReport:
    """Run both on the same batches; the reference is the fp32 PyTorch graph module."""
    session = _session(onnx_path, intra_op_threads)
    worst = 0.0
    agree = total = 0
    for batch in [*random_batches, *real_batches]:
        onnx_probs = session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]
        with torch.no_grad():
            torch_probs = reference(torch.from_numpy(batch))[0].numpy()
        if onnx_probs.shape != torch_probs.shape or onnx_probs.dtype != np.float32:
            raise ExportError(
                f"ONNX output is {onnx_probs.dtype} {onnx_probs.shape}, "
                f"expected float32 {torch_probs.shape}"
            )
        worst = max(worst, float(np.abs(onnx_probs - torch_probs).max()))
        agree += int((onnx_probs.argmax(1) == torch_probs.argmax(1)).sum())
        total += len(batch)
    return ParityReport(
        max_abs_diff=worst,
        argmax_agreement=agree / total,
        num_images=total,
        num_real_images=sum(len(b) for b in real_batches),
        tolerance=PARITY_TOLERANCE.get(precision),
    )


def _require(parity: ParityReport, what: str) -> None:
    if not parity.passed:
        raise ExportError(
            f"{what} ONNX does not reproduce PyTorch: max |Δp| = {parity.max_abs_diff:.3e} "
            f"(tolerance {parity.tolerance}), argmax agreement {parity.argmax_agreement:.4f} "
            f"on {parity.num_images} images; nothing was written"
        )


def quantize_int8(
    fp32_path: Path, out_path: Path, calib_images: np.ndarray, work_dir: Path
) -> None:
    """Static QDQ quantisation (int8 weights per channel, uint8 activations) calibrated on
    real images; onnxruntime fuses the QDQ pairs into integer kernels on CPU."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = _chunks(calib_images, 8)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {INPUT_NAME: batch}

    prepared = work_dir / "prepared.onnx"
    quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
    quantize_static(
        str(prepared),
        str(out_path),
        _Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )


def int8_accuracy_change(
    fp32_path: Path,
    int8_path: Path,
    images: np.ndarray,
    labels: np.ndarray,
    intra_op_threads: int | None = None,
) -> dict[str, Any]:
    """Top-1 accuracy of both graphs on the same held-out images, and how often they agree."""
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (len(images),):
        raise ValueError(f"{len(labels)} labels for {len(images)} evaluation images")

    def predict(path: Path) -> np.ndarray:
        session = _session(path, intra_op_threads)
        return np.concatenate(
            [session.run([OUTPUT_NAME], {INPUT_NAME: b})[0].argmax(1) for b in _chunks(images, 32)]
        )

    fp32_pred, int8_pred = predict(fp32_path), predict(int8_path)
    fp32_acc = float((fp32_pred == labels).mean())
    int8_acc = float((int8_pred == labels).mean())
    return {
        "num_images": len(images),
        "fp32_accuracy": fp32_acc,
        "int8_accuracy": int8_acc,
        "accuracy_change": int8_acc - fp32_acc,
        "prediction_agreement": float((fp32_pred == int8_pred).mean()),
    }
