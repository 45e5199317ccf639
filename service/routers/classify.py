"""POST /classify and POST /classify/batch."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from service.batching import Prediction
from service.decode import CutoutError, DecodedCutout, DecodeLimits, decode_cutout
from service.dependencies import (
    MetricsDep,
    ReadyModel,
    ReadyModelDep,
    SettingsDep,
    require_api_key,
)
from service.results import build_result, png_base64
from service.schemas import (
    BatchItem,
    BatchItemError,
    BatchResponse,
    ClassificationResult,
    ErrorResponse,
)
from service.settings import Settings
from service.uploads import (
    PayloadTooLargeError,
    Upload,
    UploadError,
    is_multipart,
    read_multipart_files,
    read_single_upload,
    to_upload,
)

router = APIRouter(tags=["classify"], dependencies=[Depends(require_api_key)])

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "API key required and missing or wrong"},
    413: {"model": ErrorResponse, "description": "body or declared image size over the limit"},
    415: {"model": ErrorResponse, "description": "not FITS, PNG or JPEG"},
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


def decode_limits(settings: Settings) -> DecodeLimits:
    return DecodeLimits(
        max_bytes=settings.max_body_bytes,
        max_pixels=settings.max_pixels,
        max_side=settings.max_side,
    )


async def decode_upload(
    upload: Upload, ready: ReadyModel, settings: Settings, options: ClassifyOptions
) -> tuple[DecodedCutout, float]:
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
        limits=decode_limits(settings),
    )
    return decoded, time.perf_counter() - started


async def finish(
    ready: ReadyModel,
    upload: Upload,
    decoded: DecodedCutout,
    decode_s: float,
    prediction: Prediction,
    options: ClassifyOptions,
    settings: Settings,
    started: float,
) -> ClassificationResult:
    image_png = await run_in_threadpool(png_base64, decoded.image) if options.return_image else None
    top_k = min(options.top_k or settings.default_top_k, ready.model.card.num_classes)
    return build_result(
        model=ready.model,
        filename=upload.filename,
        decoded=decoded,
        prediction=prediction,
        top_k=top_k,
        decode_s=decode_s,
        total_s=time.perf_counter() - started,
        image_png=image_png,
    )


@router.post(
    "/classify",
    response_model=ClassificationResult,
    responses=ERRORS,
    openapi_extra=SINGLE_BODY,
    summary="Classify one cutout (FITS, PNG or JPEG)",
)
async def classify(
    request: Request,
    ready: ReadyModelDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    options: OptionsDep,
) -> ClassificationResult:
    started = time.perf_counter()
    try:
        upload = await read_single_upload(request, settings.max_body_bytes)
        decoded, decode_s = await decode_upload(upload, ready, settings, options)
    except CutoutError as exc:
        metrics.cutouts.labels(str(exc.status_code)).inc()
        raise
    prediction = await ready.batcher.submit(decoded.image)
    metrics.queue_time.observe(prediction.queue_s)
    metrics.cutouts.labels("ok").inc()
    return await finish(ready, upload, decoded, decode_s, prediction, options, settings, started)


async def _decode_item(
    file_upload: UploadFile, ready: ReadyModel, settings: Settings, options: ClassifyOptions
) -> tuple[Upload, DecodedCutout, float] | BatchItem:
    filename = file_upload.filename
    try:
        upload = await to_upload(file_upload, settings.max_body_bytes)
        decoded, decode_s = await decode_upload(upload, ready, settings, options)
    except CutoutError as exc:
        return BatchItem(
            filename=filename, error=BatchItemError(status=exc.status_code, detail=exc.message)
        )
    except PayloadTooLargeError as exc:
        return BatchItem(filename=filename, error=BatchItemError(status=413, detail=str(exc)))
    except UploadError as exc:
        return BatchItem(filename=filename, error=BatchItemError(status=422, detail=str(exc)))
    return upload, decoded, decode_s


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
    decoded = await asyncio.gather(
        *(_decode_item(file, ready, settings, options) for _, file in files)
    )
    good = [item for item in decoded if isinstance(item, tuple)]
    predictions = iter(await ready.batcher.submit_many([d.image for _, d, _ in good]))
    items: list[BatchItem] = []
    for item in decoded:
        if isinstance(item, BatchItem):
            assert item.error is not None
            metrics.cutouts.labels(str(item.error.status)).inc()
            items.append(item)
            continue
        upload, cutout, decode_s = item
        prediction = next(predictions)
        metrics.queue_time.observe(prediction.queue_s)
        metrics.cutouts.labels("ok").inc()
        result = await finish(
            ready, upload, cutout, decode_s, prediction, options, settings, started
        )
        items.append(BatchItem(filename=upload.filename, result=result))
    failed = sum(item.error is not None for item in items)
    return BatchResponse(items=items, succeeded=len(items) - failed, failed=failed)
