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

Sample images: an export with labelled images stores SAMPLE_IMAGES of its held-out images under
SAMPLE_IMAGES_KEY (a JSON list of base64 PNGs at the input size), outside the card, so /model and
`model inspect` never print their bytes; the openvino engine checks its bf16 answers on them.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
from collections.abc import Mapping
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
SAMPLE_IMAGES_KEY = METADATA_PREFIX + "sample_images"
# What an export stores, and the most a reader accepts: the file is semi-trusted, and more
# images would only lengthen every load.
SAMPLE_IMAGES = 8
MAX_SAMPLE_IMAGES = 16

logger = logging.getLogger(__name__)


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
            # The samples are no card field, and are read (or ignored) by read_sample_images.
            if key.startswith(METADATA_PREFIX) and key != SAMPLE_IMAGES_KEY:
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


def encode_sample_images(images: np.ndarray) -> str:
    """uint8 RGB images (N, H, W, 3) as SAMPLE_IMAGES_KEY's value: a JSON list of base64 PNGs."""
    from PIL import Image

    encoded = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image, mode="RGB").save(buffer, format="PNG", optimize=True)
        encoded.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return json.dumps(encoded)


def read_sample_images(
    props: Mapping[str, str], input_size: tuple[int, int], source: object = "model file"
) -> np.ndarray | None:
    """The file's sample images, uint8 (N, H, W, 3); None when it has none, or (with one
    warning line naming `source`) when they break a limit: more than MAX_SAMPLE_IMAGES, or any
    entry that is not a PNG of the input size in RGB. Every limit is checked before a pixel is
    decoded."""
    raw = props.get(SAMPLE_IMAGES_KEY)
    if raw is None:
        return None
    try:
        return _decode_samples(raw, input_size)
    except ValueError as exc:
        logger.warning("%s: metadata %s ignored: %s", source, SAMPLE_IMAGES_KEY, exc)
        return None


def _decode_samples(raw: str, input_size: tuple[int, int]) -> np.ndarray:
    height, width = input_size
    # A PNG of noise is barely larger than its pixels; base64 adds a third.
    max_chars = 2 * height * width * 3 + 4096
    if len(raw) > MAX_SAMPLE_IMAGES * (max_chars + 4):
        raise ValueError(f"{len(raw)} characters, more than {MAX_SAMPLE_IMAGES} images can take")
    try:
        entries = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError("not valid JSON") from exc
    if not isinstance(entries, list) or not entries:
        raise ValueError("not a non-empty JSON list")
    if len(entries) > MAX_SAMPLE_IMAGES:
        raise ValueError(f"{len(entries)} images, more than {MAX_SAMPLE_IMAGES}")
    images = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, str) or len(entry) > max_chars:
            raise ValueError(f"entry {index} is not a base64 string under {max_chars} characters")
        try:
            data = base64.b64decode(entry, validate=True)
        except binascii.Error as exc:
            raise ValueError(f"entry {index} is not base64 ({exc})") from exc
        images.append(_decode_png(data, index, height, width))
    return np.stack(images)


def _decode_png(data: bytes, index: int, height: int, width: int) -> np.ndarray:
    from PIL import Image

    try:
        # A semi-trusted file: whatever the decoder raises on damaged bytes (OSError,
        # SyntaxError, zlib.error, ...) drops the samples, never the model.
        image = Image.open(io.BytesIO(data))
    except Exception as exc:
        raise ValueError(f"entry {index} is not a readable PNG ({_short(exc)})") from exc
    with image:
        # Image.open read the header only: size and mode are checked before any decoding.
        if image.format != "PNG" or image.size != (width, height) or image.mode != "RGB":
            raise ValueError(
                f"entry {index} is {image.format} {image.mode} {image.size[0]}x{image.size[1]}, "
                f"not PNG RGB {width}x{height}"
            )
        try:
            return np.asarray(image, dtype=np.uint8)
        except Exception as exc:
            raise ValueError(f"entry {index} is not a readable PNG ({_short(exc)})") from exc


def _short(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:120]
