"""Out-of-distribution score from a model's own embeddings (numpy only).

The score is the class-conditional Mahalanobis distance of Lee et al. 2018 ("A Simple Unified
Framework for Detecting Out-of-Distribution Samples and Adversarial Attacks"): one Gaussian per
training class over the pre-logit embeddings, sharing one covariance; an image's score is its
squared distance to the nearest class mean, divided by the embedding width D so that typical
training images score about 1 whatever the model. A star, blank sky, an artefact or a photo
lands far from every galaxy class even when its softmax is confident.

At export (galmorph.model.export) the statistics are fitted on the training split, folded into
the ONNX graph as a `ood_score` output (`mahalanobis_terms`: the score is then a matrix
product, a norm and a minimum), and the threshold is the (1 - fpr) quantile of the scores of
the validation split: `fpr` of in-distribution images are flagged. Files hold no copy of the
statistics in their metadata (a 2048-wide model would need 4 M numbers); the card records the
threshold, the rate it was chosen at and the images it was measured on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

METHOD = "mahalanobis"
DEFAULT_FPR = 0.05
# The shared covariance is shrunk this far towards a scaled identity: with fewer training
# images per class than embedding dimensions (any small run, and the rare Galaxy10 classes)
# the sample covariance is singular or nearly so, and its inverse would amplify noise.
SHRINKAGE = 0.1


@dataclass(frozen=True)
class ClassGaussians:
    """Class means and a shared whitening matrix W with W W^T = inverse covariance."""

    means: np.ndarray  # float64 (C, D), the classes seen in training
    whitener: np.ndarray  # float64 (D, D)

    @property
    def dim(self) -> int:
        return int(self.whitener.shape[0])

    def mahalanobis_terms(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(origin o, W, M = (means - o) @ W): the graph computes min_c |(e - o) W - M_c|^2 / D.

        The origin is the mean of the class means: distances are the same from any origin,
        but float32 sums of squares near it lose far less to cancellation."""
        origin = self.means.mean(axis=0)
        return origin, self.whitener, (self.means - origin) @ self.whitener


def fit_class_gaussians(
    embeddings: np.ndarray, labels: np.ndarray, shrinkage: float = SHRINKAGE
) -> ClassGaussians:
    """Class means and the shrunk shared covariance of training embeddings (N, D)."""
    x = np.asarray(embeddings, np.float64)
    labels = np.asarray(labels, np.int64)
    if x.ndim != 2 or labels.shape != (len(x),):
        raise ValueError(f"need embeddings (N, D) and N labels, got {x.shape} and {labels.shape}")
    classes = np.unique(labels)
    if len(x) <= len(classes):
        raise ValueError(f"{len(x)} images cannot describe {len(classes)} classes")
    means = np.stack([x[labels == c].mean(axis=0) for c in classes])
    centred = x - means[np.searchsorted(classes, labels)]
    covariance = centred.T @ centred / (len(x) - len(classes))
    scale = np.trace(covariance) / len(covariance)
    if not scale > 0:
        raise ValueError("embeddings do not vary: no covariance to measure distances with")
    shrunk = (1 - shrinkage) * covariance + shrinkage * scale * np.eye(len(covariance))
    eigenvalues, eigenvectors = np.linalg.eigh(shrunk)
    return ClassGaussians(means, eigenvectors / np.sqrt(eigenvalues))


def mahalanobis_score(embeddings: np.ndarray, gaussians: ClassGaussians) -> np.ndarray:
    """min over classes of the squared Mahalanobis distance, per embedding dimension (N,)."""
    origin, whitener, centres = gaussians.mahalanobis_terms()
    z = (np.asarray(embeddings, np.float64) - origin) @ whitener
    distances = ((z[:, None, :] - centres[None]) ** 2).sum(axis=2)
    return distances.min(axis=1) / gaussians.dim


def threshold_at_fpr(in_distribution_scores: np.ndarray, fpr: float) -> float:
    """The score above which a fraction `fpr` of these in-distribution images lie."""
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"the in-distribution false-positive rate must be in (0, 1), got {fpr}")
    scores = np.asarray(in_distribution_scores, np.float64)
    if scores.size == 0:
        raise ValueError("no in-distribution scores to choose a threshold on")
    return float(np.quantile(scores, 1.0 - fpr, method="higher"))


def energy_score(logits: np.ndarray) -> np.ndarray:
    """Free energy -logsumexp(logits) (Liu et al. 2020): higher is more out of distribution."""
    z = np.asarray(logits, np.float64)
    top = z.max(axis=1)
    return -(top + np.log(np.exp(z - top[:, None]).sum(axis=1)))


def auroc(in_distribution_scores: np.ndarray, out_of_distribution_scores: np.ndarray) -> float:
    """Probability that an OOD image scores above an in-distribution one (ties count half):
    the area under the ROC curve of the score as an OOD detector (Mann-Whitney U)."""
    inside = np.asarray(in_distribution_scores, np.float64)
    outside = np.asarray(out_of_distribution_scores, np.float64)
    if inside.size == 0 or outside.size == 0:
        raise ValueError("AUROC needs scores of both kinds")
    scores = np.concatenate([inside, outside])
    order = scores.argsort(kind="mergesort")
    ranks = np.empty(len(scores), np.float64)
    ranks[order] = np.arange(1, len(scores) + 1)
    # Tied scores share their mean rank.
    unique, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks, minlength=len(unique))
    ranks = (sums / counts)[inverse]
    u = ranks[len(inside) :].sum() - outside.size * (outside.size + 1) / 2
    return float(u / (inside.size * outside.size))
