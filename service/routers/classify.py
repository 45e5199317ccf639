"""POST /classify and POST /classify/batch."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from galmorph.service.batching import Prediction
from galmorph.service.dependencies import (
    MetricsDep,
    ReadyModel,
    ReadyModelDep,
    SettingsDep,
    require_api_key,
)
from galmorph.service.errors import cutout_status
from galmorph.service.results import build_result, png_base64
from galmorph.service.schemas import (
    BatchItem,
    BatchItemError,
    BatchResponse,
    ClassificationResult,
    ErrorResponse,
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
from galmorph.core.decode import CutoutError, DecodedCutout, decode_cutout

router = APIRouter(tags=["classify"], dependencies=[Depends(require_api_key)])

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "API key required and missing or wrong"},
    413: {"model": ErrorResponse, "description": "body or declared image size over the limit"},
    415: {"model": ErrorResponse, "description": f"not {formats.format_labels()}"},
    422: {"model": ErrorResponse, "description": "corrupt, truncated or unusable input"},
    503: {"model": ErrorResponse, "description": "not ready, queue full or timed out"},
}
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
                        "files": {"type": "array", "items": {"type": "string", "format": "binary"}}
                    },
                }
            }
        },
    }
}


@dataclass(frozen=True)
class ClassifyOptions:
    stretch: str | None
    fit: str | None
    top_k: int | None
    return_image: bool


def classify_options(
    stretch: Annotated[
        str | None,
        Query(description="FITS flux stretch (default: the model's, as in training)"),
    ] = None,
    fit: Annotated[
        str | None,
        Query(description="crop_pad (keep the pixel scale) or resize (default: by format)"),
    ] = None,
    top_k: Annotated[int | None, Query(ge=1, description="classes in top_k")] = None,
    return_image: Annotated[
        bool, Query(description="include the model's input image as a base64 PNG")
    ] = False,
) -> ClassifyOptions:
    return ClassifyOptions(stretch, fit, top_k, return_image)


OptionsDep = Annotated[ClassifyOptions, Depends(classify_options)]


@dataclass(frozen=True)
class DecodedUpload:
    upload: Upload
    cutout: DecodedCutout
    decode_s: float


async def decode_upload(
    upload: Upload, ready: ReadyModel, settings: Settings, options: ClassifyOptions
) -> DecodedUpload:
    if not upload.data:
        raise UploadError("empty upload: send the cutout as the body or as multipart 'file'")
    started = time.perf_counter()
    decoded = await run_in_threadpool(
        decode_cutout,
        upload.data,
        card=ready.model.card,
        filename=upload.filename,
        content_type=upload.content_type,
        stretch=options.stretch,
        fit=options.fit,
        limits=settings.decode_limits,
    )
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
    )


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
    filename: Annotated[str | None, Query(description="file name hint for a raw body")] = None,
) -> ClassificationResult:
    started = time.perf_counter()
    try:
        upload = await read_single_upload(request, settings.max_body_bytes, filename)
        item = await decode_upload(upload, ready, settings, options)
    except CutoutError as exc:
        metrics.cutouts.labels(str(cutout_status(exc))).inc()
        raise
    prediction = await ready.batcher.submit(item.cutout.image)
    metrics.queue_time.observe(prediction.queue_s)
    metrics.cutouts.labels("ok").inc()
    return await finish(
        item, prediction, ready=ready, options=options, settings=settings, started=started
    )


async def _decode_item(
    file: UploadFile, ready: ReadyModel, settings: Settings, options: ClassifyOptions
) -> DecodedUpload | BatchItemError:
    try:
        upload = await to_upload(file, settings.max_body_bytes)
        return await decode_upload(upload, ready, settings, options)
    except CutoutError as exc:
        return BatchItemError(status=cutout_status(exc), detail=exc.message)
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
) -> BatchResponse:
    started = time.perf_counter()
    if not is_multipart(request):
        raise HTTPException(415, "send the cutouts as multipart/form-data file parts ('files')")
    files = await read_multipart_files(
        request, total_limit=settings.max_batch_body_bytes, max_files=settings.max_batch_files
    )
    if not files:
        raise UploadError("multipart body has no file parts (send each cutout as 'files')")
    outcomes = await asyncio.gather(
        *(_decode_item(file, ready, settings, options) for _, file in files)
    )
    decoded = [outcome for outcome in outcomes if isinstance(outcome, DecodedUpload)]
    # All good images are queued together (or refused together when the queue is full).
    predictions = iter(await ready.batcher.submit_many([d.cutout.image for d in decoded]))
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
