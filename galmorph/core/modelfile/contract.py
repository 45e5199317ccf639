"""The ONNX model contract shared by export (training side) and serving/scoring.

One place for each fact: the exported ONNX file carries class names, input size,
normalisation, stretch, band mapping, pixel scale and provenance in its `metadata_props`.
Everything downstream reads them from the file through `ModelCard`; nothing keeps a copy.

Graph: input `images` uint8 [N, H, W, 3] (the Galaxy10 array layout; /255, mean/std and
NHWC->NCHW happen inside the graph), output `probabilities` float32 [N, K] (softmax inside, of
the logits divided by the card's calibrated temperature), optional outputs `logits` (before the
temperature), `embeddings` float32 [N, D] (the pre-logit representation: the input of the last
Linear layer) and `ood_score` float32 [N] (distance of the embedding to the training classes;
above the card's `ood.threshold` the image is out of distribution). N is dynamic, H and W are
fixed. Files made before embeddings and the OOD score existed lack those outputs: consumers key
these features on what the file has (`ModelOutputs` fields are None).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from galmorph.core.inputspec import DEFAULT_INTERPOLATION, GALAXY10_DECALS, Imaging, InputSpec

INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"
LOGITS_NAME = "logits"
EMBEDDINGS_NAME = "embeddings"
OOD_SCORE_NAME = "ood_score"
METADATA_PREFIX = "galmorph."


# What a model was trained on, and so what its `probabilities` are: one class per galaxy, or
# Galaxy Zoo vote counts (the expected fraction of volunteers choosing each class).
TARGET_MEANINGS = {
    "labels": "class probabilities",
    "votes": "expected Galaxy Zoo vote fractions",
}
TARGETS = tuple(TARGET_MEANINGS)


@dataclass(frozen=True)
class ModelCard:
    """Everything a consumer needs to feed the model and read its answer.

    The input fields are an InputSpec's, stored one by one because each is its own metadata key
    (files made by every earlier version read back); `input_spec` is them as one value.
    """

    model_name: str
    class_names: tuple[str, ...]
    input_size: tuple[int, int]  # (H, W)
    mean: tuple[float, float, float]  # on the 0..1 scale, applied inside the graph
    std: tuple[float, float, float]
    stretch: str = GALAXY10_DECALS.stretch
    bands: dict[str, str] = field(default_factory=lambda: dict(GALAXY10_DECALS.bands))
    pixel_scale: float = GALAXY10_DECALS.pixel_scale  # arcsec/pixel of the model's input
    interpolation: str = DEFAULT_INTERPOLATION  # how rendered images are resized to input_size
    precision: str = "fp32"  # fp32 | fp16 | int8
    targets: str = "labels"  # one of TARGETS: what the probabilities mean
    model_config: dict[str, Any] = field(default_factory=dict)
    training_data: dict[str, Any] = field(default_factory=dict)  # fingerprint of the data
    metrics: dict[str, Any] = field(default_factory=dict)  # evaluation results when known
    # Temperature scaling at export: temperature, ECE/NLL before and after, on which images.
    calibration: dict[str, Any] = field(default_factory=dict)
    # The `ood_score` output: what it measures, the threshold, the in-distribution FPR it was
    # chosen at and on which images; empty when the graph has no such output.
    ood: dict[str, Any] = field(default_factory=dict)
    package_version: str = ""
    created: str = ""  # ISO 8601 UTC

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def ood_threshold(self) -> float | None:
        """`ood_score` above this is out of distribution; None when the model has no score."""
        threshold = self.ood.get("threshold")
        return None if threshold is None else float(threshold)

    @property
    def input_spec(self) -> InputSpec:
        return InputSpec.of(self)

    @property
    def imaging(self) -> Imaging:
        return self.input_spec.imaging

    @property
    def field_of_view(self) -> tuple[float, float]:
        """Arcseconds the input covers, (height, width)."""
        return self.input_spec.field_of_view

    def __post_init__(self) -> None:
        if self.targets not in TARGETS:
            raise ValueError(f"targets {self.targets!r} is not one of {', '.join(TARGETS)}")
        # The input fields obey the InputSpec's rules, checked there; its pixel scale is the
        # canonical one (a float32 training-file 1.0479999780654907 reads as 1.048).
        object.__setattr__(self, "pixel_scale", InputSpec.of(self).pixel_scale)

    def to_metadata(self) -> dict[str, str]:
        """Flatten to ONNX metadata_props: one key per field, JSON-encoded values, plus the
        field of view for readers of the raw metadata (derived, ignored when read back)."""
        props = {METADATA_PREFIX + k: json.dumps(v) for k, v in asdict(self).items()}
        props[METADATA_PREFIX + "field_of_view"] = json.dumps(list(self.field_of_view))
        return props

    @classmethod
    def from_metadata(cls, props: dict[str, str]) -> ModelCard:
        """Rebuild from metadata_props; raises ValueError naming what is missing or wrong."""
        values: dict[str, Any] = {}
        for key, raw in props.items():
            if key.startswith(METADATA_PREFIX):
                try:
                    values[key[len(METADATA_PREFIX) :]] = json.loads(raw)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"model metadata {key!r} is not valid JSON") from exc
        required = ("model_name", "class_names", "input_size", "mean", "std")
        missing = [k for k in required if k not in values]
        if missing:
            raise ValueError(
                "not a galmorph model: ONNX metadata lacks "
                + ", ".join(METADATA_PREFIX + k for k in missing)
            )
        known = {k: v for k, v in values.items() if k in cls.__dataclass_fields__}
        for key in ("class_names", "input_size", "mean", "std"):
            known[key] = tuple(known[key])
        return cls(**known)


@dataclass(frozen=True)
class ModelOutputs:
    """What one model run answers for N images; optional outputs are None when the model file
    lacks them (files exported before they existed)."""

    probabilities: np.ndarray  # float32 (N, K)
    embeddings: np.ndarray | None = None  # float32 (N, D)
    ood_score: np.ndarray | None = None  # float32 (N,)
    in_distribution: np.ndarray | None = None  # bool (N,): ood_score <= the card's threshold

    def __len__(self) -> int:
        return len(self.probabilities)

    def scatter(self, mask: np.ndarray) -> ModelOutputs:
        """These rows placed where mask is True in len(mask) rows; the other rows hold NaN
        (probabilities, embeddings, score) and False (flag): images that were never run."""
        mask = np.asarray(mask, bool)

        def spread(values: np.ndarray | None, fill: float | bool) -> np.ndarray | None:
            if values is None:
                return None
            full = np.full((len(mask), *values.shape[1:]), fill, values.dtype)
            full[mask] = values
            return full

        probabilities = spread(self.probabilities, np.nan)
        assert probabilities is not None
        return ModelOutputs(
            probabilities,
            spread(self.embeddings, np.nan),
            spread(self.ood_score, np.nan),
            spread(self.in_distribution, False),
        )

    def row(self, index: int) -> ModelOutputs:
        """The outputs of one image, each array without its batch axis."""
        return ModelOutputs(
            self.probabilities[index],
            None if self.embeddings is None else self.embeddings[index],
            None if self.ood_score is None else self.ood_score[index],
            None if self.in_distribution is None else self.in_distribution[index],
        )
