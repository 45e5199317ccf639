"""Evaluation: metric definitions, report files, TTA, and the ONNX path through the engine."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from galmorph.training.evaluate import EvaluationRequest, evaluate
from galmorph.training.metrics import (
    calibration_bins,
    classification_report,
    confusion_matrix,
    expected_calibration_error,
    per_class_scores,
)
from galmorph.training.train import train
from tests.support.training_helpers import make_synthetic, run_galmorph, tiny_config

torch.set_num_threads(1)


def test_confusion_matrix_and_per_class_scores_by_hand() -> None:
    labels = np.array([0, 0, 0, 1, 1, 2])
    predicted = np.array([0, 0, 1, 1, 2, 2])
    matrix = confusion_matrix(labels, predicted, 3)
    assert matrix.tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    scores = per_class_scores(matrix)
    assert scores["precision"] == pytest.approx([1.0, 0.5, 0.5])
    assert scores["recall"] == pytest.approx([2 / 3, 0.5, 1.0])
    assert scores["f1"] == pytest.approx([0.8, 0.5, 2 / 3])


def test_ece_of_overconfident_predictions() -> None:
    # Always 90 % sure, right half the time: ECE = |0.5 - 0.9| = 0.4.
    probabilities = np.tile([0.9, 0.1], (10, 1))
    labels = np.array([0, 1] * 5)
    bins = calibration_bins(probabilities, labels)
    assert expected_calibration_error(bins) == pytest.approx(0.4)
    assert int(bins["count"].sum()) == 10 and int(bins["count"][13]) == 10  # (0.867, 0.933]


def test_macro_f1_ignores_classes_absent_from_labels_and_predictions() -> None:
    probabilities = np.eye(3)[[0, 1, 1, 0]]
    report = classification_report(probabilities, np.array([0, 1, 1, 0]), ["a", "b", "c"])
    assert report["macro_f1"] == 1.0 and report["top1"] == 1.0
    with pytest.raises(ValueError, match="outputs 3 classes but the data has 2"):
        classification_report(probabilities, np.zeros(4, np.int64), ["a", "b"])


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("evaluate")
    data = make_synthetic(root / "synth.h5", n=200)
    run_dir = train(tiny_config(data, root / "run", epochs=1, mixup={"mixup_alpha": 0.0}))
    return run_dir, data


@pytest.mark.slow
def test_evaluate_cli_writes_confusion_matrix_calibration_and_report(
    trained_run: tuple[Path, Path], tmp_path: Path
) -> None:
    run_dir, data = trained_run
    out = tmp_path / "eval"
    result = run_galmorph(
        "evaluate", run_dir, data, "--split", "test", "--tta", "--out", out, "--no-progress"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout)
    report = json.loads((out / "evaluation.json").read_text())
    assert summary["top1"] == report["top1"] and report["tta"] is True
    assert report["num_images"] == 20 == sum(map(sum, report["confusion_matrix"]))
    assert set(report["per_class"]) == set(report["class_names"])
    matrix = json.loads((out / "confusion_matrix.json").read_text())
    assert matrix["matrix"] == report["confusion_matrix"]
    for figure in ("confusion_matrix.png", "reliability.png"):
        assert (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert 0.0 <= report["ece"] <= 1.0 and report["backend"] == "pytorch"


@pytest.mark.slow
def test_onnx_evaluation_matches_pytorch(trained_run: tuple[Path, Path], tmp_path: Path) -> None:
    from galmorph.model.export import export_onnx

    run_dir, data = trained_run
    onnx_path = export_onnx(run_dir, tmp_path / "model.onnx", intra_op_threads=1)
    torch_report = evaluate(  # in fp32, as the .onnx computes
        EvaluationRequest(
            model=run_dir, data=data, split="val", out_dir=tmp_path / "pt", precision="fp32"
        )
    )
    # The .onnx has no split.json beside it: point at the run's.
    onnx_report = evaluate(
        EvaluationRequest(
            model=onnx_path,
            data=data,
            split="val",
            split_file=run_dir / "split.json",
            threads=1,
            progress=False,
        )
    )
    assert onnx_report["backend"] == "onnxruntime"
    assert (tmp_path / "evaluation.json").is_file()  # written beside the .onnx
    assert onnx_report["confusion_matrix"] == torch_report["confusion_matrix"]
    assert onnx_report["nll"] == pytest.approx(torch_report["nll"], abs=1e-4)


def test_evaluate_without_a_split_file_says_what_to_do(
    trained_run: tuple[Path, Path], tmp_path: Path
) -> None:
    run_dir, data = trained_run
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("model.safetensors", "model.json"):
        (bare / name).write_bytes((run_dir / name).read_bytes())
    with pytest.raises(ValueError, match="pass --split-file, or --split all"):
        evaluate(EvaluationRequest(model=bare, data=data, split="test", progress=False))
    report = evaluate(EvaluationRequest(model=bare, data=data, split="all", progress=False))
    assert report["num_images"] == 200
