"""The answer, built from the engine's outputs in one place: /classify's response model for a
decoded cutout and its prediction, and the output tensors the Open Inference Protocol sends."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

from galmorph.core.cutouts.decode import DecodedCutout
from galmorph.core.modelfile.engine import OnnxModel
from galmorph.service.batching import Prediction
from galmorph.service.schemas import (
    ClassificationResult,
    ClassProbability,
    ModelRef,
    Preprocessing,
    Timings,
)


def model_version(model: OnnxModel) -> str:
    """The served model's one version: the first 12 hex digits of its SHA-256."""
    return model.sha256[:12]


def model_ref(model: OnnxModel) -> ModelRef:
    return ModelRef(name=model.card.model_name, version=model_version(model), sha256=model.sha256)


def png_base64(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def build_result(
    *,
    model: OnnxModel,
    filename: str | None,
    decoded: DecodedCutout,
    prediction: Prediction,
    top_k: int,
    decode_s: float,
    total_s: float,
    image_png: str | None,
    embeddings: bool = False,
) -> ClassificationResult:
    names = model.card.class_names
    outputs = prediction.outputs
    probabilities = [float(p) for p in prediction.probabilities]
    order = np.argsort(-prediction.probabilities, kind="stable")
    top = [ClassProbability(name=names[i], probability=probabilities[i]) for i in order[:top_k]]
    return ClassificationResult(
        filename=filename,
        top_class=top[0].name,
        top_probability=top[0].probability,
        probabilities=dict(zip(names, probabilities, strict=True)),
        top_k=top,
        model=model_ref(model),
        preprocessing=Preprocessing.model_validate(decoded.info.to_dict()),
        timings=Timings(
            decode_ms=decode_s * 1000.0,
            queue_ms=prediction.queue_s * 1000.0,
            inference_ms=prediction.inference_s * 1000.0,
            total_ms=total_s * 1000.0,
            batch_size=prediction.batch_size,
        ),
        image_png_base64=image_png,
        ood_score=None if outputs.ood_score is None else float(outputs.ood_score),
        in_distribution=None if outputs.in_distribution is None else bool(outputs.in_distribution),
        embeddings=outputs.embeddings.tolist()
        if embeddings and outputs.embeddings is not None
        else None,
    )


def output_values(name: str, predictions: list[Prediction]) -> np.ndarray:
    """One output (a ModelOutputs field: probabilities, embeddings, ood_score or
    in_distribution) of every prediction, stacked [N, ...] in their order."""
    return np.stack([np.asarray(getattr(p.outputs, name)) for p in predictions])
