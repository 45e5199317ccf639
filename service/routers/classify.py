"""POST /classify and POST /classify/batch."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from galmorph.service.batching import MicroBatcher, Prediction, QueueFullError
from galmorph.service.decoding import DecodeBusyError, Decoder, DecodeRequest, within_deadline
from galmorph.service.dependencies import (
    MetricsDep,
    ReadyModel,
    ReadyModelDep,
    SettingsDep,
    require_api_key,
)
from galmorph.service.errors import cutout_status
from galmorph.service.metrics import ServiceMetrics
from galmorph.service.results import build_result, png_base64
from galmorph.service.schemas import (
    BatchItem,
    BatchItemError,
    BatchResponse,
    ClassificationResult,
    error_responses,
)
from galmorph.service.settings import Settings
from galmorph.service.uploads import (
    PayloadTooLargeError,
    Upload,
    UploadError,
    is_multipart,
    read_multipart_files,
    read_single_upload,
    to_upload,
)
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from galmorph.core import formats
from galmorph.core.cutout_limits import Reserve
from galmorph.core.decode import FIT_MODES, CutoutError, DecodedCutout
from galmorph.core.imaging import STRETCHES

router = APIRouter(tags=["classify"], dependencies=[Depends(require_api_key)])

ERRORS = error_responses(401, 408, 413, 415, 422, 503)
SINGLE_BODY = {
    "requestBody": {
        "required": True,
        "description": "the cutout as the raw body, or as multipart field `file`",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary"}},
                    "required": ["file"],
                    "additionalProperties": False,
                }
            },
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
BATCH_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "files": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "minItems": 1,
                        }
                    },
                    "required": ["files"],
                    "additionalProperties": False,
                }
            }
        },
    }
}


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


@router.post(
    "/classify",
    response_model=ClassificationResult,
    responses=ERRORS,
    openapi_extra=SINGLE_BODY,
    summary=f"Classify one cutout ({formats.format_labels()})",
)
async def classify(
    request: Request,
    ready: ReadyModelDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    options: OptionsDep,
    decoder: DecoderDep,
    filename: Annotated[str | None, Query(description="file name hint for a raw body")] = None,
) -> ClassificationResult:
    started = time.perf_counter()
    # The body's memory is reserved until the answer is made (the upload is held till then).
    with decoder.budget.claim_body() as body_reserve:
        try:
            upload = await read_single_upload(
                request, settings.max_body_bytes, filename, decoder.budget.claim_body,
                body_reserve,
            )  # fmt: skip
            admit(ready.batcher, 1)
            job = start_job(ready, settings, options, decoder)
            item = await decode_upload(upload, job)
        except CutoutError as exc:
            metrics.cutouts.labels(str(cutout_status(exc))).inc()
            raise
        except DecodeBusyError:
            metrics.cutouts.labels("503").inc()
            raise
        return await classify_decoded(item, job, metrics, started)


async def _decode_item(file: UploadFile, job: Job) -> DecodedUpload | BatchItemError:
    try:
        upload = await to_upload(file, job.settings.max_body_bytes, job.decoder.budget.claim_body)
        return await decode_upload(upload, job)
    except CutoutError as exc:
        return BatchItemError(status=cutout_status(exc), detail=exc.message)
    except DecodeBusyError as exc:
        return BatchItemError(status=503, detail=str(exc))
    except PayloadTooLargeError as exc:
        return BatchItemError(status=413, detail=str(exc))
    except UploadError as exc:
        return BatchItemError(status=422, detail=str(exc))


@router.post(
    "/classify/batch",
    response_model=BatchResponse,
    responses=ERRORS,
    openapi_extra=BATCH_BODY,
    summary="Classify several cutouts; one result or one error per file",
)
async def classify_batch(
    request: Request,
    ready: ReadyModelDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    options: OptionsDep,
    decoder: DecoderDep,
) -> BatchResponse:
    started = time.perf_counter()
    if not is_multipart(request):
        raise HTTPException(415, "send the cutouts as multipart/form-data file parts ('files')")
    # The body's memory (its spooled files, then their bytes) is reserved until the answer.
    with decoder.budget.claim_body() as body_reserve:
        return await _classify_files(
            request, ready, settings, metrics, options, decoder, body_reserve, started
        )


async def _classify_files(
    request: Request,
    ready: ReadyModel,
    settings: Settings,
    metrics: ServiceMetrics,
    options: ClassifyOptions,
    decoder: Decoder,
    body_reserve: Reserve,
    started: float,
) -> BatchResponse:
    files = await read_multipart_files(
        request,
        field="files",
        total_limit=settings.max_batch_body_bytes,
        max_files=settings.max_batch_files,
        reserve=body_reserve,
    )
    if not files:
        raise UploadError("multipart body has no file parts (send each cutout as 'files')")
    admit(ready.batcher, len(files))
    job = start_job(ready, settings, options, decoder)
    # One file at a time: a batch holds one decode's memory at most, not all of its files'.
    outcomes = [await _decode_item(file, job) for _, file in files]
    decoded = [outcome for outcome in outcomes if isinstance(outcome, DecodedUpload)]
    # All good images are queued together (or refused together when the queue is full).
    images = [d.cutout.image for d in decoded]
    predictions = iter(await within_deadline(ready.batcher.submit_many(images), job.deadline))
    items: list[BatchItem] = []
    for (_, file), outcome in zip(files, outcomes, strict=True):
        if isinstance(outcome, BatchItemError):
            metrics.cutouts.labels(str(outcome.status)).inc()
            items.append(BatchItem(filename=file.filename, error=outcome))
            continue
        prediction = next(predictions)
        metrics.queue_time.observe(prediction.queue_s)
        metrics.cutouts.labels("ok").inc()
        result = await finish(
            outcome, prediction, ready=ready, options=options, settings=settings, started=started
        )
        items.append(BatchItem(filename=file.filename, result=result))
    failed = len(outcomes) - len(decoded)
    return BatchResponse(items=items, succeeded=len(decoded), failed=failed)
