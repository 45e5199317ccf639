"""Probability calibration: expected calibration error and temperature scaling (numpy only).

Temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks") divides the
logits by one scalar T fitted on held-out images by minimising the negative log-likelihood; the
top class never changes, only how confident the probabilities are. The export fits T on the
run's validation split, stores it in the graph and the card, and records the ECE before and
after (`galmorph.model.export`); evaluation reports the ECE of any model the same way.
"""

from __future__ import annotations

import numpy as np

ECE_BINS = 15
# The temperature is searched as beta = 1/T within these bounds: T from 0.01 to 100 covers
# any model worth serving, and keeps a degenerate split (all correct, or all wrong) finite.
_BETA_RANGE = (0.01, 100.0)


def calibration_bins(
    probabilities: np.ndarray, labels: np.ndarray, num_bins: int = ECE_BINS
) -> dict[str, np.ndarray]:
    """Equal-width confidence bins: mean confidence, accuracy and count per bin."""
    confidence = probabilities.max(1)
    correct = (probabilities.argmax(1) == labels).astype(np.float64)
    # Bin b holds confidences in (b/B, (b+1)/B]; confidence is never 0 for a softmax.
    index = np.clip(np.ceil(confidence * num_bins).astype(np.int64) - 1, 0, num_bins - 1)
    count = np.bincount(index, minlength=num_bins)
    safe = np.maximum(count, 1)
    return {
        "confidence": np.bincount(index, weights=confidence, minlength=num_bins) / safe,
        "accuracy": np.bincount(index, weights=correct, minlength=num_bins) / safe,
        "count": count,
    }


def expected_calibration_error(bins: dict[str, np.ndarray]) -> float:
    weights = bins["count"] / max(int(bins["count"].sum()), 1)
    return float(np.sum(weights * np.abs(bins["accuracy"] - bins["confidence"])))


def ece(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Expected calibration error over ECE_BINS equal-width confidence bins."""
    return expected_calibration_error(calibration_bins(probabilities, labels))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    scaled = np.asarray(logits, np.float64) / temperature
    scaled -= scaled.max(axis=1, keepdims=True)
    exp = np.exp(scaled)
    return exp / exp.sum(axis=1, keepdims=True)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the labels under softmax(logits / temperature)."""
    scaled = np.asarray(logits, np.float64) / temperature
    top = scaled.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(scaled - top).sum(axis=1)) + top[:, 0]
    return float(np.mean(log_norm - scaled[np.arange(len(labels)), labels]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T minimising the NLL of softmax(logits / T) on these labelled images.

    The NLL is convex in beta = 1/T (a log-sum-exp of functions linear in beta, minus one),
    so Newton's method on beta with step halving finds the minimum in a few iterations.
    """
    z = np.asarray(logits, np.float64)
    labels = np.asarray(labels, np.int64)
    if z.ndim != 2 or labels.shape != (len(z),) or len(z) == 0:
        raise ValueError(f"need logits (N, K) and N labels, got {z.shape} and {labels.shape}")
    picked = z[np.arange(len(z)), labels]

    def objective(beta: float) -> float:
        return nll(z, labels, 1.0 / beta)

    beta = 1.0
    for _ in range(100):
        p = softmax(z * beta)
        expected = (p * z).sum(axis=1)
        gradient = float(np.mean(expected - picked))
        curvature = float(np.mean((p * z * z).sum(axis=1) - expected**2))
        if abs(gradient) < 1e-10 or curvature <= 1e-12:
            break
        current, step = objective(beta), gradient / curvature
        candidate = float(np.clip(beta - step, *_BETA_RANGE))
        while objective(candidate) > current and abs(step) > 1e-12:
            step /= 2
            candidate = float(np.clip(beta - step, *_BETA_RANGE))
        if candidate == beta or objective(candidate) > current:
            break
        beta = candidate
    return 1.0 / beta
