"""Evaluate a trained model (a run folder or an exported .onnx) on a Galaxy10-layout file.

On the file the model was trained on (its card's training-data fingerprint) the rows are a
split of the run's split.json, test by default; any other file is evaluated whole. A file
naming no classes is read with the model's names; the same names in another order are
mapped; other class sets are refused (EvaluationError).

Both kinds of model are driven through the same `predict(uint8 NHWC) -> probabilities`
interface: a run folder through `TorchPredictor` (also used for validation during training),
an ONNX file through galmorph.core.modelfile.engine.OnnxModel, the serving code itself. Images are
resized as a whole to the model's input size (no crop), which is what the service feeds the model.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from galmorph.core import allocator
from galmorph.core.cutouts.resample import resize_images
from galmorph.core.data.galaxy10 import Galaxy10File
from galmorph.core.data.splits import SPLIT_NAMES, Split, SplitError
from galmorph.core.files import atomic_write_text
from galmorph.core.inputspec import InputSpec
from galmorph.model.preprocess import ImagePreprocess
from galmorph.model.sample_images import labels_in_classes
from galmorph.training.augment import dihedral_views
from galmorph.training.metrics import classification_report, vote_fraction_error
from galmorph.training.plots import confusion_matrix_figure, reliability_diagram
from galmorph.training.precision import Precision, resolve_precision

logger = logging.getLogger(__name__)

SPLIT_FILE_NAME = "split.json"
EVALUATION_FILE_NAME = "evaluation.json"


class EvaluationError(ValueError):
    """The model and the data cannot be evaluated together; the message says why."""


class Predictor(Protocol):
    class_names: tuple[str, ...]
    input_size: int
    interpolation: str  # the card's: how rendered images are resized to input_size
    max_batch_size: int | None

    def predict(self, images: np.ndarray) -> np.ndarray: ...


class TorchPredictor:
    """A PyTorch model behind the ONNX model's interface (uint8 NHWC in, probabilities out)."""

    max_batch_size: int | None = None

    def __init__(
        self,
        model: nn.Module,
        *,
        class_names: tuple[str, ...],
        input_spec: InputSpec,
        device: torch.device,
        precision: Precision,
    ) -> None:
        self.model = model
        self.class_names = class_names
        self.input_size = input_spec.input_size[0]  # square (a checkpoint's img_size)
        self.interpolation = input_spec.interpolation
        self.device = device
        self.precision = precision
        self.preprocess = ImagePreprocess.of(input_spec).to(device)

    @torch.no_grad()
    def predict(self, images: np.ndarray) -> np.ndarray:
        was_training = self.model.training
        self.model.eval()
        try:
            x = self.precision.to_memory_format(
                self.preprocess(torch.from_numpy(images).to(self.device))
            )
            with self.precision.autocast():
                logits = self.model(x)
            return torch.softmax(logits.float(), dim=-1).cpu().numpy()
        finally:
            self.model.train(was_training)


class OnnxPredictor:
    """galmorph.core.modelfile.engine.OnnxModel with the evaluation interface."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        from galmorph.core.modelfile.engine import OnnxModel

        self.engine = OnnxModel(path, intra_op_threads=threads, inter_op_threads=1)
        height, width = self.engine.input_size
        if height != width:
            raise ValueError(f"{path}: only square inputs are supported, got {height}x{width}")
        self.input_size = int(height)
        self.interpolation = self.engine.card.interpolation
        self.class_names = tuple(self.engine.card.class_names)
        self.max_batch_size = self.engine.max_batch_size

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.engine.predict(images)


def predict_split(
    predictor: Predictor,
    data: Galaxy10File,
    indices: np.ndarray,
    *,
    batch_size: int = 64,
    tta: bool = False,
    progress: bool = True,
) -> np.ndarray:
    """Probabilities (len(indices), K) for the given rows; TTA averages the 8 dihedral views."""
    if predictor.max_batch_size is not None:
        batch_size = min(batch_size, predictor.max_batch_size)
    outputs = []
    starts = range(0, len(indices), batch_size)
    for start in tqdm(starts, desc="evaluate", unit="batch", disable=not progress, leave=False):
        batch = resize_images(
            data.images(indices[start : start + batch_size]),
            predictor.input_size,
            predictor.interpolation,
        )
        views = dihedral_views(batch) if tta else [batch]
        outputs.append(np.mean([predictor.predict(view) for view in views], axis=0))
    num_classes = len(predictor.class_names)
    return np.concatenate(outputs) if outputs else np.zeros((0, num_classes), np.float32)


@dataclass(frozen=True)
class EvaluationRequest:
    model: Path  # a run folder (model.safetensors + model.json) or a .onnx file
    data: Path
    # train | val | test | all; None: test of the training file, all rows of another file
    split: str | None = None
    split_file: Path | None = None  # default: split.json beside the model
    class_names: tuple[str, ...] | None = None  # for a data file that names none
    tta: bool = False
    batch_size: int = 64
    out_dir: Path | None = None  # default: the run folder, or the .onnx file's folder
    device: str = "auto"
    # A run folder's PyTorch model: fp32 by default, so reported metrics are the exported
    # fp32 model's (bf16 moved probabilities by ~2e-4); training/precision.py for the others.
    precision: str = "fp32"
    threads: int | None = None
    progress: bool = True


def evaluate(request: EvaluationRequest) -> dict[str, Any]:
    """Run the evaluation, write evaluation.json and figures, return the report.

    On the file the model was trained on, `split` picks rows of the run's split (test by
    default). On any other file every row is evaluated: its rows belong to no split.
    """
    predictor, backend, model_dir, training_digest = _open_model(request)
    data = _open_data(request, predictor.class_names)
    labels = _labels_in_model_order(data, predictor.class_names)
    split, indices = _rows(request, data, model_dir, training_digest)
    probabilities = predict_split(
        predictor,
        data,
        indices,
        batch_size=request.batch_size,
        tta=request.tta,
        progress=request.progress,
    )
    report = classification_report(probabilities, labels[indices], predictor.class_names)
    if data.votes is not None:
        votes = _votes_in_model_order(data.votes, data.class_names, predictor.class_names)
        report["vote_fraction_error"] = vote_fraction_error(probabilities, votes[indices])
        logger.info(
            "mean absolute error of the predicted vote fractions: %.4f",
            report["vote_fraction_error"],
        )
    report.update(
        {
            "split": split,
            "tta": request.tta,
            "backend": backend,
            "precision": (
                predictor.precision.describe() if isinstance(predictor, TorchPredictor) else None
            ),
            "model": str(request.model),
            "input_size": predictor.input_size,
            "data": {"path": str(request.data), "fingerprint": data.fingerprint()},
        }
    )
    out_dir = request.out_dir or model_dir
    write_report(report, out_dir)
    logger.info(
        "%s: top-1 %.4f, macro-F1 %.4f, ECE %.4f on %d images (%s%s); results in %s",
        f"{split} split" if split != "all" else "all rows",
        report["top1"],
        report["macro_f1"],
        report["ece"],
        report["num_images"],
        backend,
        ", 8-fold TTA" if request.tta else "",
        out_dir,
    )
    return report


def _open_data(request: EvaluationRequest, model_names: tuple[str, ...]) -> Galaxy10File:
    """The data file; one that names no classes is read with the model's names (and says so)."""
    data = Galaxy10File(request.data, class_names=request.class_names)
    if data.class_names_named:
        return data
    data = Galaxy10File(request.data, class_names=model_names)
    logger.info(
        "%s names no classes: reading its labels 0..%d as the model's classes (%s)",
        request.data,
        len(model_names) - 1,
        ", ".join(model_names),
    )
    return data


def _labels_in_model_order(data: Galaxy10File, model_names: tuple[str, ...]) -> np.ndarray:
    """The data's labels as indices of the model's classes; refuse other class sets."""
    try:
        labels = labels_in_classes(data, model_names)
    except ValueError as exc:
        raise EvaluationError(str(exc)) from None
    if tuple(data.class_names) != tuple(model_names):
        logger.info("%s lists the model's classes in another order: labels mapped", data.path)
    return labels


def _votes_in_model_order(
    votes: np.ndarray, names: tuple[str, ...], model_names: tuple[str, ...]
) -> np.ndarray:
    """Vote columns reordered to the model's classes (the same set: checked with the labels)."""
    return votes[:, [names.index(name) for name in model_names]]


def write_report(report: dict[str, Any], out_dir: Path) -> None:
    """evaluation.json, confusion_matrix.json/.png and reliability.png in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    matrix = {"class_names": report["class_names"], "matrix": report["confusion_matrix"]}
    _write_json(out_dir / "confusion_matrix.json", matrix)
    confusion_matrix_figure(
        np.asarray(report["confusion_matrix"]),
        report["class_names"],
        out_dir / "confusion_matrix.png",
        title=f"{report['split']} split, top-1 {report['top1']:.3f}",
    )
    reliability_diagram(report["calibration"], report["ece"], out_dir / "reliability.png")
    _write_json(out_dir / EVALUATION_FILE_NAME, report)


def _write_json(path: Path, document: Any) -> None:
    atomic_write_text(path, json.dumps(document, indent=1) + "\n")


def _open_model(request: EvaluationRequest) -> tuple[Predictor, str, Path, str | None]:
    """The predictor, its backend, its folder and the digest of the data it was trained on."""
    path = request.model
    if path.is_file() and path.suffix.lower() == ".onnx":
        onnx = OnnxPredictor(path, threads=request.threads)
        digest = _digest(onnx.engine.card.training_data)
        return onnx, "onnxruntime", path.parent, digest
    if path.is_dir():
        from galmorph.model.checkpoint import load_model
        from galmorph.training.distributed import resolve_device

        if request.threads:
            torch.set_num_threads(request.threads)
        device = resolve_device(request.device)
        if device.type == "cpu":
            logger.info("CPU memory: %s", allocator.retain_freed_memory())
        precision = resolve_precision(request.precision, device)
        logger.info("precision: %s", precision.describe())
        model, spec = load_model(path)
        precision.prepare(model, training=False)
        predictor = TorchPredictor(
            model.to(device),
            class_names=tuple(spec.class_names),
            input_spec=spec.input_spec,
            device=device,
            precision=precision,
        )
        return predictor, "pytorch", path, _digest(spec.training_data)
    raise EvaluationError(
        f"{path}: expected a run folder (model.json + model.safetensors) or a .onnx"
    )


def _digest(training_data: dict[str, Any]) -> str | None:
    digest = (training_data.get("fingerprint") or {}).get("digest")
    return str(digest) if digest else None


def _rows(
    request: EvaluationRequest, data: Galaxy10File, model_dir: Path, training_digest: str | None
) -> tuple[str, np.ndarray]:
    """(split name, row indices) to evaluate."""
    if request.split is not None and request.split not in (*SPLIT_NAMES, "all"):
        raise EvaluationError(
            f"unknown split {request.split!r}; use one of {(*SPLIT_NAMES, 'all')}"
        )
    if request.split == "all":
        return "all", np.arange(data.num_images)
    other_file = training_digest is not None and data.fingerprint()["digest"] != training_digest
    if other_file:
        if request.split is not None:
            raise EvaluationError(
                f"{data.path} is not the file the model was trained on, so its rows are in "
                f"no {request.split} split: leave out --split (or use --split all) to "
                "evaluate all of them"
            )
        logger.info(
            "%s is not the file the model was trained on: evaluating all its %d rows",
            data.path,
            data.num_images,
        )
        return "all", np.arange(data.num_images)
    split_name = request.split or "test"
    split_path = request.split_file or model_dir / SPLIT_FILE_NAME
    if not split_path.is_file():
        raise SplitError(
            f"no split file at {split_path}: pass --split-file, or --split all to use every image"
        )
    split = Split.load(split_path)
    split.check_data(data.num_images, data.fingerprint())
    indices = split.indices(split_name)
    if indices.size == 0:
        raise EvaluationError(
            f"the {split_name} split of {split_path} is empty (split fractions "
            f"{'/'.join(f'{f:g}' for f in split.fractions)}): evaluate on a separate file "
            "with --data, or use --split all"
        )
    return split_name, indices
