"""Response models of the HTTP API (they are the OpenAPI schema clients see)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from galmorph.core.cutouts import formats


class ErrorResponse(BaseModel):
    detail: str = Field(description="what was wrong, in words")


# What each error status means on this API; every refusal has the ErrorResponse body.
ERROR_DESCRIPTIONS = {
    401: "API key required and missing or wrong",
    404: "no such model",
    408: "the upload paused for longer than the body timeout",
    413: "body or declared image size over the limit",
    415: f"not {formats.format_labels()}",
    422: "corrupt, truncated or unusable input, or an invalid parameter",
    502: "the cutout service answered with an error, or with a body that is not the cutout",
    503: "not ready, queue full, timed out or shutting down (see Retry-After)",
    504: "the cutout service gave no complete answer in time",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for a route that can answer these error statuses."""
    return {
        status: {"model": ErrorResponse, "description": ERROR_DESCRIPTIONS[status]}
        for status in statuses
    }


def inline_definitions(schema: dict[str, Any]) -> dict[str, Any]:
    """A model's JSON schema with every `$ref` to its own `$defs` replaced by the definition.

    For a schema placed in the OpenAPI document by hand (`openapi_extra`): the document has no
    `$defs` of its own, so those references would point at nothing. The models given are not
    recursive.
    """
    definitions = schema.get("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(definitions[ref.removeprefix("#/$defs/")])
            return {key: resolve(value) for key, value in node.items() if key != "$defs"}
        if isinstance(node, list):
            return [resolve(item) for item in node]
        return node

    resolved: dict[str, Any] = resolve(schema)
    return resolved


class ClassProbability(BaseModel):
    name: str
    probability: float


class ModelRef(BaseModel):
    name: str
    version: str = Field(description="first 12 hex digits of the model file's SHA-256")
    sha256: str


class Preprocessing(BaseModel):
    """What was done to the upload to make the model's input image."""

    model_config = ConfigDict(extra="allow")

    format: str = Field(description="fits, png or jpeg")
    bands_used: list[str] = Field(description="bands or channels the image was made from")
    original_shape: list[int]
    pixel_scale: float | None = Field(
        default=None, description="arcsec/pixel of the input, if known"
    )
    stretch: str | None = Field(default=None, description="flux-to-colour stretch (FITS only)")
    resized_from: list[int] | None = None
    resampled_from_scale: float | None = Field(
        default=None, description="input arcsec/pixel when resampled to the model's pixel scale"
    )
    flipped: bool = Field(default=False, description="rows flipped to put north up (FITS)")
    warnings: list[str] = Field(default_factory=list)
    compression: str | None = Field(default=None, description="gzip or fpack (FITS)")
    fit: str = Field(
        default="crop_pad", description="crop_pad keeps the pixel scale; resize squeezes"
    )
    crop_pad_from: list[int] | None = Field(
        default=None, description="shape before centre crop/pad"
    )


class Timings(BaseModel):
    decode_ms: float
    queue_ms: float = Field(description="wait for the inference batch to start")
    inference_ms: float = Field(description="model run of the whole batch")
    total_ms: float = Field(description="from request start to response")
    batch_size: int = Field(description="images in the model run this one shared")


class ClassificationResult(BaseModel):
    filename: str | None = None
    top_class: str
    top_probability: float
    probabilities: dict[str, float] = Field(description="probability of every class by name")
    top_k: list[ClassProbability]
    model: ModelRef
    preprocessing: Preprocessing
    timings: Timings
    image_png_base64: str | None = Field(
        default=None, description="the model's input image as PNG (when return_image=true)"
    )
    ood_score: float | None = Field(
        default=None,
        description="distance of the image from the training classes (the model card's `ood`); "
        "null when the model file has no OOD score",
    )
    in_distribution: bool | None = Field(
        default=None,
        description="ood_score within the model's threshold: false for stars, blank sky, "
        "artefacts and anything unlike its training galaxies",
    )
    embeddings: list[float] | None = Field(
        default=None, description="the pre-logit representation (when embeddings=true)"
    )


class SkyCutout(BaseModel):
    """The cutout a /classify/sky answer was made from: the request to the cutout service
    (galmorph.core.sky.client.CutoutSpec) and whether it came from the server's cache."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(description="the cutout service request")
    source: Literal["cached", "fetched"]
    ra: float = Field(description="degrees, RA wrapped into [0, 360)")
    dec: float = Field(description="degrees")
    base_url: str
    layer: str
    bands: str
    pixscale: float = Field(description="arcsec/pixel")
    width: int
    height: int
    image_format: str


class SkyClassificationResult(ClassificationResult):
    cutout: SkyCutout


class BatchItemError(BaseModel):
    status: int = Field(description="the HTTP status this item alone would have received")
    detail: str


class BatchItem(BaseModel):
    filename: str | None
    result: ClassificationResult | None = None
    error: BatchItemError | None = None


class BatchResponse(BaseModel):
    items: list[BatchItem]
    succeeded: int
    failed: int


class Liveness(BaseModel):
    status: str = "ok"


class Readiness(BaseModel):
    ready: bool
    reason: str | None = Field(default=None, description="why not ready yet")
    providers: list[str] = Field(default_factory=list, description="active providers")


class TensorSpec(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelInfo(BaseModel):
    name: str
    version: str
    sha256: str
    class_names: list[str]
    input: TensorSpec
    outputs: list[TensorSpec]
    preprocessing: dict[str, Any] = Field(
        description="input size, mean/std (inside the graph), stretch, band mapping, pixel scale"
    )
    providers: list[str] = Field(description="providers the session really runs on")
    requested_providers: list[str]
    onnxruntime_version: str
    engine: dict[str, Any] = Field(
        description="what runs the batches: onnxruntime, or openvino in bf16 with its parity"
    )
    batching: dict[str, Any]
    card: dict[str, Any] = Field(description="every ModelCard field from the ONNX metadata")


class KServeModelMetadata(BaseModel):
    """KServe/Triton v2 model metadata."""

    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
