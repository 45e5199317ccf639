"""PNG figures for runs and evaluations (matplotlib, headless Agg backend)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from galmorph.core.files import atomic_write


def _figure(width: float, height: float) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    # A bare Figure (no pyplot) keeps no global state and is safe outside the main thread.
    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _save(figure: Any, path: Path) -> Path:
    with atomic_write(path) as tmp:
        figure.savefig(tmp, format="png")
    return path


def training_curves(records: Sequence[dict[str, Any]], path: Path) -> Path:
    """Loss, accuracy and learning rate per epoch from metrics.jsonl epoch records."""
    epochs = [r for r in records if r.get("kind") == "epoch"]
    figure = _figure(11, 3.4)
    loss_ax, acc_ax, lr_ax = figure.subplots(1, 3)
    x = [r["epoch"] for r in epochs]
    for key, label in (("train_loss", "train"), ("val_loss", "val")):
        loss_ax.plot(x, [r.get(key, np.nan) for r in epochs], marker=".", label=label)
    for key, label in (("train_acc", "train (mixed targets)"), ("val_top1", "val top-1")):
        acc_ax.plot(x, [r.get(key, np.nan) for r in epochs], marker=".", label=label)
    acc_ax.plot(x, [r.get("val_macro_f1", np.nan) for r in epochs], marker=".", label="val F1")
    lr_ax.plot(x, [r.get("lr", np.nan) for r in epochs], marker=".")
    for ax, title in ((loss_ax, "loss"), (acc_ax, "accuracy"), (lr_ax, "learning rate")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    loss_ax.legend()
    acc_ax.legend()
    acc_ax.set_ylim(0, 1)
    return _save(figure, path)


def confusion_matrix_figure(
    matrix: np.ndarray, class_names: Sequence[str], path: Path, title: str = ""
) -> Path:
    """Row-normalised colours (recall per class) with the raw counts written in each cell."""
    matrix = np.asarray(matrix)
    k = len(class_names)
    rows = matrix.sum(1, keepdims=True)
    normalised = np.divide(matrix, rows, out=np.zeros(matrix.shape), where=rows > 0)
    figure = _figure(1.6 + 0.62 * k, 1.2 + 0.55 * k)
    ax = figure.subplots()
    image = ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            colour = "white" if normalised[i, j] > 0.5 else "black"
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=7, color=colour)
    ax.set_xticks(range(k), class_names, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(k), class_names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix (colour: fraction of the true class)")
    figure.colorbar(image, ax=ax, fraction=0.046)
    return _save(figure, path)


def reliability_diagram(calibration: dict[str, Sequence[float]], ece: float, path: Path) -> Path:
    """Accuracy against confidence per bin, with the bin populations underneath."""
    confidence = np.asarray(calibration["confidence"])
    accuracy = np.asarray(calibration["accuracy"])
    count = np.asarray(calibration["count"])
    num_bins = len(count)
    centres = (np.arange(num_bins) + 0.5) / num_bins
    figure = _figure(4.8, 5.4)
    top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    filled = count > 0
    top.bar(centres[filled], accuracy[filled], width=1 / num_bins, edgecolor="k", label="accuracy")
    top.plot(confidence[filled], confidence[filled], "r.", label="mean confidence")
    top.plot([0, 1], [0, 1], "k--", lw=1)
    top.set_ylabel("accuracy")
    top.set_ylim(0, 1)
    top.set_title(f"reliability (ECE = {ece:.4f})")
    top.legend(loc="upper left")
    bottom.bar(centres, count, width=1 / num_bins, edgecolor="k", color="grey")
    bottom.set_xlabel("confidence")
    bottom.set_ylabel("images")
    bottom.set_xlim(0, 1)
    return _save(figure, path)
