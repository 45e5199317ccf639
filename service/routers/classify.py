"""POST /classify and POST /classify/batch."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from starlette.datastructures import UploadFile

from galmorph.core.cutouts import formats
from galmorph.core.cutouts.decode import CutoutError
from galmorph.core.cutouts.limits import Reserve
from galmorph.service.data_plane import (
    ClassifyOptions,
    DecodedUpload,
    DecoderDep,
    Job,
    OptionsDep,
    admit,
    classify_decoded,
    decode_upload,
    finish,
    start_job,
)
from galmorph.service.decoding import DecodeBusyError, Decoder, within_deadline
from galmorph.service.dependencies import (
    MetricsDep,
    ReadyModel,
    ReadyModelDep,
    SettingsDep,
    require_api_key,
)
from galmorph.service.errors import cutout_status
from galmorph.service.metrics import ServiceMetrics
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
    UploadError,
    is_multipart,
    read_multipart_files,
    read_single_upload,
    to_upload,
)

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
