"""POST /classify and POST /classify/batch."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from starlette.datastructures import UploadFile

from galmorph.core.cutouts import formats
from galmorph.core.cutouts.limits import Reserve
from galmorph.service.data_plane import (
    CUTOUT_REFUSALS,
    ClassifyOptions,
    DataPlane,
    DecodedUpload,
    Job,
    OptionsDep,
    PlaneDep,
    refusal_status,
)
from galmorph.service.dependencies import require_api_key
from galmorph.service.schemas import (
    BatchItem,
    BatchItemError,
    BatchResponse,
    ClassificationResult,
    error_responses,
)
from galmorph.service.uploads import (
    UploadError,
    is_multipart,
    read_multipart_files,
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
    plane: PlaneDep,
    options: OptionsDep,
    filename: Annotated[str | None, Query(description="file name hint for a raw body")] = None,
) -> ClassificationResult:
    async with plane.predict_upload(request, options, filename) as (job, item, prediction):
        return await job.answer(item, prediction)


async def _decode_item(file: UploadFile, job: Job) -> DecodedUpload | BatchItemError:
    plane = job.plane
    try:
        upload = await to_upload(
            file, plane.settings.max_body_bytes, plane.decoder.budget.claim_body
        )
        return await job.decode(upload)
    except CUTOUT_REFUSALS as exc:
        return BatchItemError(status=refusal_status(exc), detail=str(exc))


@router.post(
    "/classify/batch",
    response_model=BatchResponse,
    responses=ERRORS,
    openapi_extra=BATCH_BODY,
    summary="Classify several cutouts; one result or one error per file",
)
async def classify_batch(request: Request, plane: PlaneDep, options: OptionsDep) -> BatchResponse:
    if not is_multipart(request):
        raise HTTPException(415, "send the cutouts as multipart/form-data file parts ('files')")
    # The body's memory (its spooled files, then their bytes) is reserved until the answer.
    with plane.decoder.budget.claim_body() as body_reserve:
        return await _classify_files(request, plane, options, body_reserve)


async def _classify_files(
    request: Request, plane: DataPlane, options: ClassifyOptions, body_reserve: Reserve
) -> BatchResponse:
    settings = plane.settings
    files = await read_multipart_files(
        request,
        field="files",
        total_limit=settings.max_batch_body_bytes,
        max_files=settings.max_batch_files,
        reserve=body_reserve,
    )
    if not files:
        raise UploadError("multipart body has no file parts (send each cutout as 'files')")
    plane.admit(len(files))
    job = plane.start(options)
    # One file at a time: a batch holds one decode's memory at most, not all of its files'.
    outcomes = [await _decode_item(file, job) for _, file in files]
    decoded = [outcome for outcome in outcomes if isinstance(outcome, DecodedUpload)]
    predictions = iter(await job.predict([d.cutout.image for d in decoded]))
    items: list[BatchItem] = []
    for (_, file), outcome in zip(files, outcomes, strict=True):
        if isinstance(outcome, BatchItemError):
            plane.count(outcome.status)
            items.append(BatchItem(filename=file.filename, error=outcome))
        else:
            result = await job.answer(outcome, next(predictions))
            items.append(BatchItem(filename=file.filename, result=result))
    failed = len(outcomes) - len(decoded)
    return BatchResponse(items=items, succeeded=len(decoded), failed=failed)
