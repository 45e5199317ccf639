"""Export a trained checkpoint to the self-describing ONNX file the service and scorer use.

Graph contract (galmorph/core/modelfile/contract.py): input `images` uint8 [N, H, W, 3]; the
/255, mean/std and NHWC->NCHW steps run inside the graph
(galmorph.model.preprocess.ImagePreprocess, the module training itself uses); outputs
`probabilities` float32 [N, K] (softmax of the logits divided by the calibrated temperature),
`logits`, `embeddings` [N, D] (the input of the last Linear layer) and, when the export had
labelled training images, `ood_score` [N]. N is dynamic, H and W are fixed (the relative
position tables are sized for them).

With labelled images (`FitImages`), the export fits what needs data before it traces the graph:
the temperature on held-out rows (galmorph.core.modelfile.calibration; kept at 1 when it would
raise the ECE there), and the out-of-distribution score's class statistics on the run's training
rows with its threshold on the held-out rows (galmorph.core.modelfile.ood). The held-out rows
are the run's validation split or, for a run trained on every row, every row of a separate
labelled file of the same classes (`load_held_out_fit_images`). Both go into the graph and the
card (`calibration`, `ood`).

Models whose weights exceed protobuf's 2 GiB limit are written as a folder (model.onnx + the
weights as ONNX external data, galmorph.core.modelfile.artifact) that every consumer loads like a
file.

Exporter choice, measured on this kind of machine: the dynamo exporter at opset 20 emits
ONNX's native Gelu op, which onnxruntime runs as one kernel; at opset 18 GELU decomposes into
Div/Erf/Add/Mul chains that ORT does not fuse back (1.3-1.7x slower on
gm_astroformer_tiny/small and astroformer_0, batch 8, one thread; issue 3 reports 1.6-2.8x).
Attention is written as matmul + softmax in model/attention.py, so no SDPA kernel choice is
involved in tracing.

Every export is checked before it is moved into place: onnxruntime against PyTorch on random
uint8 batches (batch 1 and 5) and on real images when given; fp32 must agree to
max |Δp| <= 1e-4 with identical argmax, or the export fails and leaves no file behind.

`export_model` runs these as stages, each a function here that can be called alone, in file
order: resolve (load the checkpoint, check every input) -> fit (temperature, OOD statistics) ->
card -> trace (torch.onnx, ONNX checker) -> quantize (int8 only) -> check (onnxruntime parity)
-> write (atomic; a folder over 2 GiB; with labelled images, SAMPLE_IMAGES of the held-out ones
as the file's sample images, `pick_samples`).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from torch import nn

from galmorph.core.data.splits import Split
from galmorph.core.files import atomic_write
from galmorph.core.modelfile import ood
from galmorph.core.modelfile.artifact import GRAPH_FILE_NAME, WEIGHTS_FILE_NAME, artifact_size
from galmorph.core.modelfile.calibration import ece, fit_temperature, nll, softmax
from galmorph.core.modelfile.contract import (
    EMBEDDINGS_NAME,
    INPUT_NAME,
    LOGITS_NAME,
    METADATA_PREFIX,
    OOD_SCORE_NAME,
    OUTPUT_NAME,
    SAMPLE_IMAGES,
    SAMPLE_IMAGES_KEY,
    ModelCard,
    encode_sample_images,
)
from galmorph.core.version import __version__
from galmorph.model.checkpoint import CheckpointError, ModelSpec, load_model
from galmorph.model.ensemble import load_ensemble
from galmorph.model.head import PreLogitsModel
from galmorph.model.preprocess import ImagePreprocess

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")
# One run folder, or several exported as one seed ensemble.
RunDirs = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]
# Tolerance on probabilities for the export to pass. fp16 rounds activations to 11 bits;
# int8 is judged by the accuracy change on held-out images instead (recorded, not enforced).
PARITY_TOLERANCE = {"fp32": 1e-4, "fp16": 5e-3}
PARITY_KEY = METADATA_PREFIX + "export_parity"
# protobuf cannot serialise a single file above 2 GiB: larger weights go to external data.
MAX_SINGLE_FILE_BYTES = 2**31 - 2**24
RANDOM_BATCH_SIZES = (1, 5)
# Images per PyTorch forward pass while embeddings and logits are collected for fitting.
FIT_BATCH_SIZE = 64


class ExportError(RuntimeError):
    """The export could not be produced or did not reproduce the PyTorch model."""


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


def export_onnx(run_dir: RunDirs, out_path: str | os.PathLike[str], **options: Any) -> Path:
    """Export a run folder's checkpoint to ONNX and return the file; options as `export_model`."""
    return export_model(run_dir, out_path, **options).path


def export_model(
    run_dir: RunDirs,
    out_path: str | os.PathLike[str],
    *,
    opset: int = 20,
    parity_images: np.ndarray | None = None,
    metrics: dict[str, Any] | None = None,
    precision: str = "fp32",
    calib_images: np.ndarray | None = None,
    eval_images: np.ndarray | None = None,
    eval_labels: np.ndarray | None = None,
    fit_images: FitImages | None = None,
    calibrate: bool = True,
    ood_fpr: float | None = ood.DEFAULT_FPR,
    intra_op_threads: int | None = None,
    seed: int = 0,
) -> ExportReport:
    """Checkpoint (model.safetensors + model.json) -> verified ONNX model at out_path (a file,
    or a folder when the weights exceed 2 GiB). Several run folders: one file answering with
    the mean of their probabilities (a seed ensemble, galmorph.model.ensemble).

    parity_images: real uint8 NHWC images at the model's input size, checked in addition to
    random ones. int8 needs calib_images (static QDQ calibration) and eval_images/eval_labels
    (held-out images on which the accuracy change is measured and stored in the metadata).
    fit_images: the run's labelled train/val images; with them the probabilities are
    temperature-scaled (unless calibrate is False) and, unless ood_fpr is None, the graph gets
    an `ood_score` output whose threshold flags that fraction of the validation images.

    Nothing reaches out_path unless the check stage passed (stages: the module docstring).
    """
    int8 = _int8_images(precision, calib_images, eval_images, eval_labels)
    started = time.perf_counter()
    images = {"parity": parity_images, "calibration": calib_images, "evaluation": eval_images}
    source = resolve(run_dir, precision, images=images, fit_images=fit_images, ood_fpr=ood_fpr)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    with _timed(seconds, "fit"):
        fitted = fit(source, fit_images, calibrate=calibrate, ood_fpr=ood_fpr)
        card = make_card(source, fitted, precision, metrics)
    reference, traced = build_graphs(source, fitted, precision)
    with tempfile.TemporaryDirectory(prefix=".export-", dir=out.parent) as work_dir:
        work = Path(work_dir)
        with _timed(seconds, "export"):
            candidate = trace(traced, card, work, opset=opset, external=source.external)
        batches = parity_batches(source.spec.img_size, parity_images, seed)
        with _timed(seconds, "parity"):
            if int8 is not None:
                candidate, card = quantize(
                    candidate, reference, batches, card, int8, work, seconds, intra_op_threads
                )
            parity = check(candidate, reference, batches, precision, intra_op_threads)
        samples = None if fit_images is None else pick_samples(fit_images, seed)
        write(candidate, out, card, parity, external=source.external, samples=samples)
    seconds["total"] = time.perf_counter() - started
    report = ExportReport(out, card, parity, seconds, artifact_size(out))
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


@contextmanager
def _timed(seconds: dict[str, float], stage: str) -> Iterator[None]:
    tick = time.perf_counter()
    try:
        yield
    finally:
        seconds[stage] = time.perf_counter() - tick


def _int8_images(
    precision: str,
    calib_images: np.ndarray | None,
    eval_images: np.ndarray | None,
    eval_labels: np.ndarray | None,
) -> Int8Images | None:
    """The images int8 quantisation needs, or None for the float precisions."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "int8":
        return None
    if calib_images is None or eval_images is None or eval_labels is None:
        raise ValueError("int8 export needs calibration images and labelled evaluation images")
    return Int8Images(calib_images, eval_images, eval_labels)


# --- Stage: resolve ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """The checkpoint being exported, loaded, with what the later stages need to know of it."""

    model: nn.Module
    spec: ModelSpec
    targets: str  # what the run was trained on: "labels" or "votes" (its config.json)
    external: bool  # weights over protobuf's 2 GiB limit: the model is written as a folder
    members: int = 1  # runs averaged (galmorph.model.ensemble); 1: a single run


def resolve(
    run_dir: RunDirs,
    precision: str = "fp32",
    *,
    images: Mapping[str, np.ndarray | None] | None = None,
    fit_images: FitImages | None = None,
    ood_fpr: float | None = ood.DEFAULT_FPR,
) -> Source:
    """The checkpoint loaded (CheckpointError when missing or damaged) and every input checked
    against it before anything is traced or written; `images`: uint8 image sets by what they
    are for (parity, calibration, evaluation), None where not given. Several run folders
    are exported as one seed ensemble (galmorph.model.ensemble.load_ensemble)."""
    run_dirs = _run_dirs(run_dir)
    if len(run_dirs) == 1:
        model, spec = load_model(run_dirs[0])
    else:
        model, spec = load_ensemble(run_dirs)
    targets = {_run_targets(Path(d)) for d in run_dirs}
    if len(targets) > 1:
        raise CheckpointError(f"the runs were trained on different targets: {sorted(targets)}")
    for what, given in (images or {}).items():
        if given is not None:
            _check_images(given, spec.img_size, what)
    if fit_images is not None:
        _check_fit_images(fit_images, spec.img_size, spec.num_classes)
        if ood_fpr is not None and fit_images.train_images is None:
            raise ValueError("the OOD score needs the run's training images (or ood_fpr=None)")
    external = _needs_external_data(model, precision)
    if external and precision == "int8":
        raise ExportError("int8 export of a model over 2 GiB is not supported; use fp16")
    return Source(model, spec, targets.pop(), external, len(run_dirs))


def _run_dirs(run_dir: RunDirs) -> list[str | os.PathLike[str]]:
    if isinstance(run_dir, str | os.PathLike):
        return [run_dir]
    return list(run_dir)


def _check_images(images: np.ndarray, size: int, what: str) -> None:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (size, size, 3):
        raise ValueError(
            f"{what} images must be uint8 (N, {size}, {size}, 3), "
            f"got {images.dtype} {tuple(images.shape)}"
        )
    if len(images) == 0:
        raise ValueError(f"{what} images are empty")


def _check_fit_images(fit: FitImages, size: int, num_classes: int) -> None:
    for what, images, labels in (
        ("training", fit.train_images, fit.train_labels),
        ("validation", fit.val_images, fit.val_labels),
    ):
        if images is None or labels is None:
            if images is not labels:
                raise ValueError(f"{what} images and labels must be given together")
            continue
        _check_images(images, size, what)
        labels = np.asarray(labels)
        if labels.shape != (len(images),):
            raise ValueError(f"{len(labels)} {what} labels for {len(images)} {what} images")
        if labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(f"{what} labels must be class indices 0..{num_classes - 1}")


def _run_targets(run_dir: Path) -> str:
    """What the run was trained on ("labels" or "votes"), from its config.json."""
    config = run_dir / "config.json"
    if not config.is_file():
        return "labels"
    return str(json.loads(config.read_text()).get("targets", "labels"))


def weight_bytes(model: nn.Module, precision: str = "fp32") -> int:
    """Bytes the graph's weights take (works on the meta device: only shapes count)."""
    itemsize = 2 if precision == "fp16" else 4
    return sum(t.numel() * itemsize for t in model.state_dict().values())


def _needs_external_data(model: nn.Module, precision: str) -> bool:
    return weight_bytes(model, precision) > MAX_SINGLE_FILE_BYTES


# --- Stages: calibrate and fit OOD ------------------------------------------------------------


@dataclass(frozen=True)
class Fitted:
    """What the export fitted on labelled images: the temperature and the OOD class statistics
    go into the graph, the two records into the card."""

    temperature: float
    gaussians: ood.ClassGaussians | None  # None: the graph has no `ood_score` output
    calibration: dict[str, Any]
    ood: dict[str, Any]


def fit(
    source: Source,
    fit_images: FitImages | None,
    *,
    calibrate: bool = True,
    ood_fpr: float | None = ood.DEFAULT_FPR,
) -> Fitted:
    """The temperature on the held-out rows (`fit_calibration`) and, unless ood_fpr is None,
    the OOD score's class statistics and threshold (`fit_ood`); without labelled images a
    temperature of 1, recorded with the reason, and no OOD score."""
    off_reason = _calibration_off_reason(calibrate, source.targets)
    if fit_images is None:
        reason = off_reason or "no labelled images were given to the export (--data)"
        return Fitted(1.0, None, {"applied": False, "temperature": 1.0, "reason": reason}, {})
    val_logits, val_embeddings, train_embeddings = fit_outputs(
        source, fit_images, with_train=ood_fpr is not None
    )
    held_out = fit_images.held_out_file
    calibration = fit_calibration(
        val_logits, fit_images.val_labels, off_reason=off_reason, held_out_file=held_out
    )
    temperature = float(calibration["temperature"])
    if ood_fpr is None or train_embeddings is None:
        return Fitted(temperature, None, calibration, {})
    assert fit_images.train_labels is not None
    gaussians, ood_record = fit_ood(
        train_embeddings, fit_images.train_labels, val_embeddings, ood_fpr, held_out_file=held_out
    )
    return Fitted(temperature, gaussians, calibration, ood_record)


def _calibration_off_reason(calibrate: bool, targets: str) -> str | None:
    """Why no temperature is fitted, or None to fit one."""
    if not calibrate:
        return NO_CALIBRATE_REASON
    return VOTES_REASON if targets == "votes" else None


def fit_outputs(
    source: Source, fit_images: FitImages, *, with_train: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(validation logits, validation embeddings, training embeddings or None) of the
    untempered graph."""
    # The export's only bulk forward passes: on the GPU when there is one (then back, for
    # the CPU parity check).
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    plain = ImageClassifierGraph(source.model, source.spec.mean, source.spec.std).eval().to(device)
    try:
        val_logits, val_embeddings = graph_outputs(plain, fit_images.val_images)
        train_embeddings = None
        if with_train and fit_images.train_images is not None:
            _, train_embeddings = graph_outputs(plain, fit_images.train_images)
    finally:
        plain.to("cpu")
    return val_logits, val_embeddings, train_embeddings


@dataclass(frozen=True)
class FitImages:
    """Labelled images for what the export fits, labels as indices of the model's classes: the
    held-out rows (`val_*`, never trained on) set the temperature and the OOD threshold, the
    training rows the OOD score's class statistics (None: no OOD score can be fitted)."""

    train_images: np.ndarray | None
    train_labels: np.ndarray | None
    val_images: np.ndarray
    val_labels: np.ndarray
    # None: the held-out rows are the run's validation split; else the name of the separate
    # file whose every row they are.
    held_out_file: str | None = None


def load_fit_images(
    data: str | os.PathLike[str],
    split: Split,
    *,
    size: int,
    interpolation: str,
    count: int,
    class_names: Sequence[str] | None = None,
) -> FitImages:
    """At most `count` training and `count` validation images of a run's split (seeded),
    resized as evaluation and serving resize them; `class_names`: the model's (a file naming
    none is read with them, as training read it)."""
    options = {"size": size, "interpolation": interpolation, "count": count}
    val_images, val_labels = _labelled(
        data, seed=1, indices=split.val, class_names=class_names, **options
    )
    train_images, train_labels = _labelled(
        data, indices=split.train, class_names=class_names, **options
    )
    return FitImages(train_images, train_labels, val_images, val_labels)


def load_held_out_fit_images(
    held_out: str | os.PathLike[str],
    *,
    train_data: str | os.PathLike[str] | None,
    split: Split | None,
    size: int,
    interpolation: str,
    count: int,
    class_names: Sequence[str],
) -> FitImages:
    """At most `count` rows of a labelled file the run never trained on, as the held-out rows,
    and at most `count` of the run's training rows (`split.train` of `train_data`; none when
    either is None: then no OOD score can be fitted)."""
    options = {"size": size, "interpolation": interpolation, "count": count}
    val_images, val_labels = _labelled(held_out, seed=1, class_names=class_names, **options)
    train_images = train_labels = None
    if train_data is not None and split is not None:
        train_images, train_labels = _labelled(
            train_data, indices=split.train, class_names=class_names, **options
        )
    return FitImages(train_images, train_labels, val_images, val_labels, Path(held_out).name)


def _labelled(data: str | os.PathLike[str], **options: Any) -> tuple[np.ndarray, np.ndarray]:
    from galmorph.model.sample_images import load_images

    images, labels = load_images(data, **options)
    if labels is None:
        raise ValueError(f"{data} has no labels: temperature and OOD fits need labelled images")
    return images, labels


NO_CALIBRATE_REASON = "calibration was switched off (--no-calibrate)"


VOTES_REASON = (
    "the run was trained on vote counts (targets=votes): its probabilities are the expected "
    "vote fractions, which a temperature fitted to the labels would change"
)


def graph_outputs(graph: ImageClassifierGraph, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(logits, embeddings) of the PyTorch graph for uint8 NHWC images, in batches."""
    device = graph.inverse_temperature.device
    logits, embeddings = [], []
    with torch.no_grad():
        for batch in _chunks(images, FIT_BATCH_SIZE):
            outputs = graph(torch.from_numpy(batch).to(device))
            logits.append(outputs[1].cpu().numpy())
            embeddings.append(outputs[2].cpu().numpy())
    return np.concatenate(logits), np.concatenate(embeddings)


def fit_calibration(
    logits: np.ndarray,
    labels: np.ndarray,
    *,
    off_reason: str | None = None,
    held_out_file: str | None = None,
) -> dict[str, Any]:
    """Temperature scaling on held-out images, as the card's `calibration` record (with
    `off_reason`, the ECE and NLL are recorded and the temperature stays 1). The images are
    the run's validation split, or every row of `held_out_file`.

    The temperature minimises the NLL; it is applied only when it does not raise the ECE on the
    same images (with few images the two can disagree), so a calibrated file is never worse
    calibrated than it was on the split it was measured on.
    """
    before = {"ece": ece(softmax(logits), labels), "nll": nll(logits, labels)}
    record: dict[str, Any] = {
        "method": "temperature scaling",
        **_held_out_record(held_out_file),
        "num_images": len(labels),
        "ece_before": before["ece"],
        "nll_before": before["nll"],
    }
    if off_reason is not None:
        return {
            **record,
            "applied": False,
            "temperature": 1.0,
            "reason": off_reason,
            "ece_after": before["ece"],
            "nll_after": before["nll"],
        }
    temperature = fit_temperature(logits, labels)
    after = {
        "ece": ece(softmax(logits, temperature), labels),
        "nll": nll(logits, labels, temperature),
    }
    if after["ece"] > before["ece"]:
        reason = (
            f"the NLL-optimal temperature {temperature:.4g} would raise the ECE from "
            f"{before['ece']:.4f} to {after['ece']:.4f}"
        )
        log.warning("not calibrated: %s", reason)
        return {
            **record,
            "applied": False,
            "temperature": 1.0,
            "reason": reason,
            "fitted_temperature": temperature,
            "ece_after": before["ece"],
            "nll_after": before["nll"],
        }
    log.info(
        "temperature %.4g: ECE %.4f -> %.4f, NLL %.4f -> %.4f on %d held-out images (%s)",
        temperature,
        before["ece"],
        after["ece"],
        before["nll"],
        after["nll"],
        len(labels),
        held_out_file or "validation split",
    )
    return {
        **record,
        "applied": True,
        "temperature": temperature,
        "ece_after": after["ece"],
        "nll_after": after["nll"],
    }


def fit_ood(
    train_embeddings: np.ndarray,
    train_labels: np.ndarray,
    val_embeddings: np.ndarray,
    fpr: float,
    *,
    held_out_file: str | None = None,
) -> tuple[ood.ClassGaussians, dict[str, Any]]:
    """The OOD score's class statistics (training rows) and the card's `ood` record with its
    threshold (held-out rows: the validation split, or every row of `held_out_file`)."""
    gaussians = ood.fit_class_gaussians(train_embeddings, train_labels)
    val_scores = ood.mahalanobis_score(val_embeddings, gaussians)
    threshold = ood.threshold_at_fpr(val_scores, fpr)
    record = {
        "method": ood.METHOD,
        "score": "squared Mahalanobis distance of the embeddings to the nearest training-class "
        "mean (shared covariance), divided by the embedding width",
        "threshold": threshold,
        "in_distribution_fpr": fpr,
        "shrinkage": ood.SHRINKAGE,
        "fit": {"split": "train", "num_images": len(train_labels), "classes": len(gaussians.means)},
        "threshold_fit": {
            **_held_out_record(held_out_file),
            "num_images": len(val_scores),
            "score_median": float(np.median(val_scores)),
        },
    }
    log.info(
        "OOD threshold %.4g (%.0f%% of %d held-out images above, %s)",
        threshold,
        100 * fpr,
        len(val_scores),
        held_out_file or "validation split",
    )
    return gaussians, record


def _held_out_record(held_out_file: str | None) -> dict[str, Any]:
    return {"split": "val"} if held_out_file is None else {"split": "all", "data": held_out_file}


# --- Stage: card -----------------------------------------------------------------------------


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
        **spec.input_spec.values(),
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


def make_card(
    source: Source, fitted: Fitted, precision: str, metrics: dict[str, Any] | None = None
) -> ModelCard:
    """The exported file's card: the checkpoint's, with what the run was trained on and what the
    export fitted; explicit metrics override the spec's."""
    card = build_card(source.spec, precision=precision, metrics=metrics)
    model_config = card.model_config
    if source.members > 1:
        model_config = {**model_config, "ensemble_members": source.members}
    return replace(
        card,
        targets=source.targets,
        calibration=fitted.calibration,
        ood=fitted.ood,
        model_config=model_config,
    )


def pick_samples(fit_images: FitImages, seed: int = 0) -> np.ndarray:
    """SAMPLE_IMAGES held-out images for the file (the openvino engine checks its bf16 answers
    on them), seeded and spread over the classes: one of each class in a seeded order, then
    round again."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(fit_images.val_labels)
    classes = rng.permutation(np.unique(labels))
    by_class = [rng.permutation(np.flatnonzero(labels == label)) for label in classes]
    rounds = range(max(len(rows) for rows in by_class))
    order = [rows[rank] for rank in rounds for rows in by_class if rank < len(rows)]
    return fit_images.val_images[np.sort(order[:SAMPLE_IMAGES])]


# --- Stage: trace ----------------------------------------------------------------------------


class ImageClassifierGraph(nn.Module):
    """uint8 NHWC images -> (probabilities, logits, embeddings[, ood_score]): what the ONNX
    graph computes. Probabilities are softmax(logits / temperature); the OOD score is
    galmorph.core.modelfile.ood.mahalanobis_score of the embeddings, for the given class
    statistics."""

    inverse_temperature: torch.Tensor
    ood_origin: torch.Tensor
    ood_whitener: torch.Tensor
    ood_centres: torch.Tensor
    ood_centre_norms: torch.Tensor

    def __init__(
        self,
        model: nn.Module,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        compute_dtype: torch.dtype = torch.float32,
        temperature: float = 1.0,
        gaussians: ood.ClassGaussians | None = None,
    ) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.preprocess = ImagePreprocess(mean, std)
        self.model = model.to(compute_dtype)
        self.compute_dtype = compute_dtype
        self.register_buffer("inverse_temperature", torch.tensor(1.0 / temperature))
        self.has_ood = gaussians is not None
        if gaussians is not None:
            # The score as matrix products: |z - m_c|^2 = |z|^2 - 2 z.m_c + |m_c|^2,
            # z = (e - origin) W.
            origin, whitener, centres = gaussians.mahalanobis_terms()
            self.register_buffer("ood_origin", torch.from_numpy(origin).float())
            self.register_buffer("ood_whitener", torch.from_numpy(whitener).float())
            self.register_buffer("ood_centres", torch.from_numpy(centres.T.copy()).float())
            self.register_buffer("ood_centre_norms", torch.from_numpy((centres**2).sum(1)).float())

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.preprocess(images).to(self.compute_dtype)
        model = cast(PreLogitsModel, self.model)
        pre_logits = model.forward_pre_logits(x)
        logits = model.classifier(pre_logits).float()
        embeddings = pre_logits.float()
        probabilities = (logits * self.inverse_temperature).softmax(dim=-1)
        if not self.has_ood:
            return probabilities, logits, embeddings
        z = (embeddings - self.ood_origin) @ self.ood_whitener
        distances = (z * z).sum(1, keepdim=True) - 2 * (z @ self.ood_centres)
        distances = distances + self.ood_centre_norms
        score = distances.min(dim=1).values.clamp_min(0.0) / z.shape[1]
        return probabilities, logits, embeddings, score


def build_graphs(
    source: Source, fitted: Fitted, precision: str
) -> tuple[ImageClassifierGraph, ImageClassifierGraph]:
    """(the fp32 reference the check compares against, the graph to trace): the same module,
    or for fp16 a half-precision twin (the reference must stay fp32)."""
    spec = source.spec
    graph = partial(
        ImageClassifierGraph, temperature=fitted.temperature, gaussians=fitted.gaussians
    )
    reference = graph(source.model, spec.mean, spec.std).eval()
    if precision != "fp16":
        return reference, reference
    twin = _copy_model(source.model)
    return reference, graph(twin, spec.mean, spec.std, compute_dtype=torch.float16).eval()


def trace(
    graph: ImageClassifierGraph, card: ModelCard, work: Path, *, opset: int, external: bool
) -> Path:
    """The graph traced to ONNX, checked by the ONNX checker and written with its card as the
    candidate under `work` (in its own folder: external weights go beside the graph)."""
    proto = _trace_to_onnx(graph, card.input_size[0], opset)
    candidate_dir = work / "candidate"
    candidate_dir.mkdir()
    candidate = candidate_dir / GRAPH_FILE_NAME
    _save(proto, candidate, card, external)
    return candidate


def _copy_model(model: nn.Module) -> nn.Module:
    """A second instance with the same weights (the fp16 graph must not touch the reference);
    a copy of the module itself, as a seed ensemble has no one registry entry to rebuild."""
    return copy.deepcopy(model).eval()


def _output_names(graph_module: nn.Module) -> list[str]:
    names = [OUTPUT_NAME, LOGITS_NAME, EMBEDDINGS_NAME]
    return [*names, OOD_SCORE_NAME] if getattr(graph_module, "has_ood", False) else names


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
            output_names=_output_names(graph_module),
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
    _strip_trace_annotations(proto.graph)
    for function in proto.functions:
        del function.metadata_props[:]
        for node in function.node:
            del node.metadata_props[:]
    return proto


def _strip_trace_annotations(graph: onnx.GraphProto) -> None:
    """Drop the exporter's per-node debugging notes (the exporting file's absolute path and line
    numbers, FX node text, class names): with them, two checkouts of one commit export different
    bytes, any edit to a model file changes every export, and each file carries the exporting
    machine's paths. They take ~3 % of a file and nothing reads them."""
    for node in graph.node:
        del node.metadata_props[:]
        for attribute in node.attribute:
            if attribute.HasField("g"):
                _strip_trace_annotations(attribute.g)
            for subgraph in attribute.graphs:
                _strip_trace_annotations(subgraph)


# --- Stage: check -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ParityBatches:
    """The uint8 NHWC batches ONNX and PyTorch are compared on."""

    random: list[np.ndarray]
    real: list[np.ndarray]


def parity_batches(size: int, images: np.ndarray | None = None, seed: int = 0) -> ParityBatches:
    """Seeded random batches of RANDOM_BATCH_SIZES, and the real images in batches of 16."""
    rng = np.random.default_rng(seed)
    random = [
        rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8) for n in RANDOM_BATCH_SIZES
    ]
    return ParityBatches(random, [] if images is None else list(_chunks(images, 16)))


def check(
    candidate: Path,
    reference: nn.Module,
    batches: ParityBatches,
    precision: str,
    intra_op_threads: int | None = None,
) -> ParityReport:
    """onnxruntime on the candidate against the fp32 PyTorch reference; ExportError when they
    disagree beyond the precision's tolerance (the export then writes nothing)."""
    parity = check_parity(
        candidate, reference, batches.random, batches.real, precision, intra_op_threads
    )
    _require(parity, precision)
    return parity


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


# --- Stage: quantize (int8) -------------------------------------------------------------------


@dataclass(frozen=True)
class Int8Images:
    """What int8 quantisation reads: uint8 images to calibrate on, and labelled held-out images
    on which the accuracy change is measured."""

    calibration: np.ndarray
    evaluation: np.ndarray
    labels: np.ndarray


def quantize(
    candidate: Path,
    reference: nn.Module,
    batches: ParityBatches,
    card: ModelCard,
    images: Int8Images,
    work: Path,
    seconds: dict[str, float],
    intra_op_threads: int | None = None,
) -> tuple[Path, ModelCard]:
    """(the int8 candidate, its card with the accuracy change in `metrics.int8_eval`); the
    float candidate is checked first: it must be right before it is quantised."""
    parity = check_parity(
        candidate, reference, batches.random, batches.real, "fp32", intra_op_threads
    )
    _require(parity, "fp32 graph")
    quantised = work / "model.int8.onnx"
    with _timed(seconds, "quantize"):
        quantize_int8(candidate, quantised, images.calibration, work)
    change = int8_accuracy_change(
        candidate, quantised, images.evaluation, images.labels, intra_op_threads
    )
    card = replace(card, metrics={**card.metrics, "int8_eval": change})
    final = work / "final.onnx"
    _save(_load(quantised), final, card, external=False)
    return final, card


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


# --- Stage: write -----------------------------------------------------------------------------


def write(
    candidate: Path,
    out: Path,
    card: ModelCard,
    parity: ParityReport,
    *,
    external: bool,
    samples: np.ndarray | None = None,
) -> None:
    """The checked candidate, with its card, parity record and sample images (uint8 NHWC, when
    given), put at out so that a crash leaves the previous model or the new one whole: one
    file, or a folder when the weights are external data (the candidate's folder, moved)."""
    if external:
        # Only the graph file is rewritten; the weights file stays where it was checked.
        final = _load(candidate, load_external_data=False)
        _set_metadata(final, card, parity, samples)
        onnx_save(final, candidate)
        _replace_folder(candidate.parent, out)
        return
    final = _load(candidate)
    _set_metadata(final, card, parity, samples)
    with atomic_write(out) as staged:
        _write_proto(final, staged, external=False)


def _set_metadata(
    proto: onnx.ModelProto,
    card: ModelCard,
    parity: ParityReport | None,
    samples: np.ndarray | None = None,
) -> None:
    props = card.to_metadata()
    if parity is not None:
        props[PARITY_KEY] = json.dumps(asdict(parity))
    if samples is not None:
        props[SAMPLE_IMAGES_KEY] = encode_sample_images(samples)
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "galmorph"
    proto.producer_version = __version__
    proto.doc_string = f"galmorph {card.model_name} ({card.precision}): uint8 NHWC -> probabilities"


def _save(proto: onnx.ModelProto, path: Path, card: ModelCard, external: bool) -> None:
    _set_metadata(proto, card, None)
    _write_proto(proto, path, external=external)


def _write_proto(proto: onnx.ModelProto, path: Path, *, external: bool) -> None:
    import onnx

    if not external:
        onnx.checker.check_model(proto)
        onnx.save_model(proto, str(path))
        return
    # The weights move out of the message before it is serialised, so it stays under 2 GiB.
    onnx.save_model(
        proto,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=WEIGHTS_FILE_NAME,
    )
    onnx.checker.check_model(str(path))


def onnx_save(proto: onnx.ModelProto, path: Path) -> None:
    """Write a graph whose tensors already point at external data (only the graph changes)."""
    import onnx

    onnx.save_model(proto, str(path))


def _load(path: Path, *, load_external_data: bool = True) -> onnx.ModelProto:
    import onnx

    return onnx.load_model(str(path), load_external_data=load_external_data)


def _replace_folder(staged: Path, target: Path) -> None:
    """Put a finished folder artifact at target; a previous model there goes only after the
    new one is in place, so a crash leaves one of the two whole."""
    for entry in staged.iterdir():
        with open(entry, "rb") as handle:
            os.fsync(handle.fileno())
    previous = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        target.rename(previous)
    os.replace(staged, target)
    folder = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
    if previous.is_dir():
        shutil.rmtree(previous)
    elif previous.exists():
        previous.unlink()


def _chunks(images: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(images), size):
        yield images[start : start + size]
