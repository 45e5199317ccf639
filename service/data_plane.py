"""The data plane every classifying route shares, whatever its protocol: a request's options
and deadline (`Job`), admission to the queue, decoding an upload within the decode budget, and
queueing a decoded cutout for its prediction. `/classify`, `/classify/batch`, `/classify/sky`
and the Open Inference Protocol routes call it; routers never import each other.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Literal

from fastapi import Depends, HTTPException, Query, Request
from starlette.concurrency import run_in_threadpool

from galmorph.core.cutouts.decode import FIT_MODES, DecodedCutout
from galmorph.core.cutouts.imaging import STRETCHES
from galmorph.service.batching import MicroBatcher, Prediction, QueueFullError
from galmorph.service.decoding import Decoder, DecodeRequest, within_deadline
from galmorph.service.dependencies import (
    ReadyModel,
)
from galmorph.service.metrics import ServiceMetrics
from galmorph.service.results import build_result, png_base64
from galmorph.service.schemas import (
    ClassificationResult,
)
from galmorph.service.settings import Settings
from galmorph.service.uploads import (
    Upload,
    UploadError,
)

if TYPE_CHECKING:
    StretchName = str
    FitMode = str
else:
    # The decoder's closed sets, validated here and listed as enums in the OpenAPI schema.
    StretchName = Literal[tuple(sorted(STRETCHES))]
    FitMode = Literal[FIT_MODES]


@dataclass(frozen=True)
class ClassifyOptions:
    stretch: str | None
    fit: str | None
    top_k: int | None
    return_image: bool
    embeddings: bool = False


def classify_options(
    stretch: Annotated[
        StretchName | None,
        Query(description="FITS flux stretch (default: the model's, as in training)"),
    ] = None,
    fit: Annotated[
        FitMode | None,
        Query(description="crop_pad (keep the pixel scale) or resize (default: by format)"),
    ] = None,
    top_k: Annotated[int | None, Query(ge=1, description="classes in top_k")] = None,
    return_image: Annotated[
        bool, Query(description="include the model's input image as a base64 PNG")
    ] = False,
    embeddings: Annotated[
        bool, Query(description="include the pre-logit representation (the embeddings)")
    ] = False,
) -> ClassifyOptions:
    return ClassifyOptions(stretch, fit, top_k, return_image, embeddings)


OptionsDep = Annotated[ClassifyOptions, Depends(classify_options)]


@dataclass(frozen=True)
class DecodedUpload:
    upload: Upload
    cutout: DecodedCutout
    decode_s: float


def get_decoder(request: Request) -> Decoder:
    decoder: Decoder = request.app.state.decoder
    return decoder


DecoderDep = Annotated[Decoder, Depends(get_decoder)]


@dataclass(frozen=True)
class Job:
    """What every cutout of one request shares: the model, settings, options, decoder and the
    request's deadline (time.monotonic(); decode, queue and inference all count)."""

    ready: ReadyModel
    settings: Settings
    options: ClassifyOptions
    decoder: Decoder
    deadline: float


def start_job(
    ready: ReadyModel, settings: Settings, options: ClassifyOptions, decoder: Decoder
) -> Job:
    """The request's clock starts once its body is read (slow uploads have their own timeout)."""
    if options.embeddings and not ready.model.has_embeddings:
        raise HTTPException(
            422,
            f"embeddings=true but model {ready.model.card.model_name!r} has no embeddings output "
            "(exported before galmorph wrote them): export it again",
        )
    return Job(ready, settings, options, decoder, time.monotonic() + settings.request_timeout_s)


def admit(batcher: MicroBatcher, images: int) -> None:
    """Refuse (503) before decoding anything when the queue could not take `images` now."""
    if batcher.queue_length + images > batcher.config.max_queue:
        raise QueueFullError(batcher.retry_after_s(images))


async def decode_upload(upload: Upload, job: Job) -> DecodedUpload:
    if not upload.data:
        raise UploadError("empty upload: send the cutout as the body or as multipart 'file'")
    started = time.perf_counter()
    request = DecodeRequest(
        upload,
        job.ready.model.card,
        job.options.stretch,
        job.options.fit,
        job.settings.decode_limits,
    )
    decoded = await job.decoder.decode(request, job.deadline)
    return DecodedUpload(upload, decoded, time.perf_counter() - started)


async def finish(
    item: DecodedUpload,
    prediction: Prediction,
    *,
    ready: ReadyModel,
    options: ClassifyOptions,
    settings: Settings,
    started: float,
) -> ClassificationResult:
    image = item.cutout.image
    image_png = await run_in_threadpool(png_base64, image) if options.return_image else None
    top_k = min(options.top_k or settings.default_top_k, ready.model.card.num_classes)
    return build_result(
        model=ready.model,
        filename=item.upload.filename,
        decoded=item.cutout,
        prediction=prediction,
        top_k=top_k,
        decode_s=item.decode_s,
        total_s=time.perf_counter() - started,
        image_png=image_png,
        embeddings=options.embeddings,
    )


async def classify_decoded(
    item: DecodedUpload, job: Job, metrics: ServiceMetrics, started: float
) -> ClassificationResult:
    """Queue one decoded cutout, wait for its prediction within the job's deadline, answer."""
    prediction = await within_deadline(job.ready.batcher.submit(item.cutout.image), job.deadline)
    metrics.queue_time.observe(prediction.queue_s)
    metrics.cutouts.labels("ok").inc()
    return await finish(
        item, prediction, ready=job.ready, options=job.options, settings=job.settings,
        started=started,
    )  # fmt: skip
