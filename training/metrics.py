"""Classification metrics from predicted probabilities (numpy only, so ONNX runs share them)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from galmorph.core.modelfile.calibration import calibration_bins, expected_calibration_error


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows are true classes, columns predicted classes."""
    flat = labels.astype(np.int64) * num_classes + predictions.astype(np.int64)
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, -1)


def per_class_scores(matrix: np.ndarray) -> dict[str, np.ndarray]:
    """Precision, recall, F1 and support per class; 0 where a ratio is undefined."""
    true_positive = np.diag(matrix).astype(np.float64)
    predicted = matrix.sum(0).astype(np.float64)
    support = matrix.sum(1).astype(np.float64)
    precision = np.divide(
        true_positive, predicted, out=np.zeros_like(predicted), where=predicted > 0
    )
    recall = np.divide(true_positive, support, out=np.zeros_like(support), where=support > 0)
    denominator = precision + recall
    f1 = np.divide(
        2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0
    )
    return {"precision": precision, "recall": recall, "f1": f1, "support": support.astype(np.int64)}


def classification_report(
    probabilities: np.ndarray, labels: np.ndarray, class_names: Sequence[str]
) -> dict[str, Any]:
    """Everything evaluate reports, as JSON-ready values."""
    if probabilities.ndim != 2 or probabilities.shape[0] != labels.shape[0]:
        raise ValueError(f"probabilities {probabilities.shape} do not match labels {labels.shape}")
    num_classes = len(class_names)
    if probabilities.shape[1] != num_classes:
        raise ValueError(
            f"model outputs {probabilities.shape[1]} classes but the data has {num_classes}"
        )
    predictions = probabilities.argmax(1)
    matrix = confusion_matrix(labels, predictions, num_classes)
    scores = per_class_scores(matrix)
    bins = calibration_bins(probabilities, labels)
    eps = 1e-12
    picked = probabilities[np.arange(len(labels)), labels]
    return {
        "num_images": len(labels),
        "top1": float((predictions == labels).mean()) if len(labels) else 0.0,
        # As scikit-learn: classes absent from both labels and predictions do not count.
        "macro_f1": float(scores["f1"][(matrix.sum(0) + matrix.sum(1)) > 0].mean()),
        "nll": float(-np.log(np.maximum(picked, eps)).mean()),
        "ece": expected_calibration_error(bins),
        "per_class": {
            name: {
                "precision": float(scores["precision"][k]),
                "recall": float(scores["recall"][k]),
                "f1": float(scores["f1"][k]),
                "support": int(scores["support"][k]),
            }
            for k, name in enumerate(class_names)
        },
        "confusion_matrix": matrix.tolist(),
        "calibration": {key: value.tolist() for key, value in bins.items()},
        "class_names": list(class_names),
    }


def vote_fraction_error(probabilities: np.ndarray, votes: np.ndarray) -> float:
    """Mean absolute difference, over galaxies and classes, of predicted and voted fractions.

    `votes`: counts (N, K) in the probabilities' class order, every row with some votes.
    """
    if probabilities.shape != votes.shape:
        raise ValueError(f"probabilities {probabilities.shape} do not match votes {votes.shape}")
    fractions = votes / votes.sum(axis=1, keepdims=True)
    return float(np.abs(probabilities - fractions).mean())
