"""A small model really trained on synthetic Galaxy10 images and exported with temperature
scaling and the OOD score: what the calibration, OOD and Python API tests measure.

Built once per test session (`trained_export` in conftest.py): about a minute on one core.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from galmorph.core.data.splits import Split
from galmorph.model.checkpoint import load_spec
from galmorph.model.export import ExportReport, FitImages, export_model, load_fit_images
from galmorph.training.train import train
from tests.support.training_helpers import make_synthetic, tiny_config


@dataclass(frozen=True)
class TrainedExport:
    data: Path  # the synthetic Galaxy10 file (64 px)
    run: Path  # the training run (split.json, model.safetensors)
    model: Path  # the exported .onnx: calibrated, with embeddings and ood_score
    report: ExportReport
    fit: FitImages  # the images the export fitted on (train and val rows of the split)


def train_and_export(root: Path) -> TrainedExport:
    data = make_synthetic(root / "synth.h5", n=600)
    run = train(tiny_config(data, root / "run", epochs=4, mixup={"mixup_alpha": 0.0}))
    split, spec = Split.load(run / "split.json"), load_spec(run)
    fit = load_fit_images(
        data, split, size=spec.img_size, interpolation=spec.interpolation, count=1000
    )
    report = export_model(run, root / "model.onnx", fit_images=fit, intra_op_threads=1)
    return TrainedExport(data, run, report.path, report, fit)
