"""GET /similar?id=... and POST /similar: the nearest neighbours of a galaxy in a similarity
index (galmorph.similarity, docs/similarity.md), when the server is started with `--index`.

GET looks the galaxy up in the index (no model run). POST takes a cutout as POST /classify does
and embeds it through the same data plane (decode, queue, inference, deadline); the server's
model must be the index's. Off (no index), both answer 404 saying how to turn them on.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from galmorph.service.data_plane import ClassifyOptions, FitMode, PlaneDep, StretchName
from galmorph.service.dependencies import require_api_key
from galmorph.service.schemas import ErrorResponse, error_responses
from galmorph.service.settings import Settings

if TYPE_CHECKING:
    import numpy as np

    from galmorph.similarity.index import SimilarityIndex

router = APIRouter(tags=["similar"], dependencies=[Depends(require_api_key)])
MAX_K = 100


def open_index(settings: Settings) -> SimilarityIndex | None:
    """The index named by the settings, memory-mapped; None when there is none. Imported here
    so that a server without an index needs no usearch."""
    if settings.similarity_index is None:
        return None
    from galmorph.similarity.index import SimilarityIndex

    return SimilarityIndex(settings.similarity_index)


def get_index(request: Request) -> SimilarityIndex:
    index: SimilarityIndex | None = request.app.state.similarity_index
    if index is None:
        raise HTTPException(404, "/similar is off on this server (galmorph serve --index INDEX)")
    return index


# Any: the index's class is imported only where an index is served (it needs usearch).
IndexDep = Annotated[Any, Depends(get_index)]


class Neighbour(BaseModel):
    rank: int
    id_str: str
    distance: float = Field(description="cosine distance (0: the same direction)")
    pred_label: str | None
    pred_prob: float | None
    in_distribution: bool | None
    ood_score: float | None
    ra: float | None
    dec: float | None


class SimilarQuery(BaseModel):
    id: str | None = Field(description="the indexed galaxy asked about (GET)")
    filename: str | None = Field(description="the uploaded cutout's name (POST)")
    pred_label: str | None
    pred_prob: float | None
    in_distribution: bool | None
    ood_score: float | None


class IndexInfo(BaseModel):
    count: int
    model_sha256: str
    metric: str


class SimilarResponse(BaseModel):
    query: SimilarQuery
    k: int
    index: IndexInfo
    neighbours: list[Neighbour]
    search_ms: float
    total_ms: float


def _finite(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


class Filters(BaseModel):
    k: int
    label: str | None
    in_dist: bool


def similar_filters(
    k: Annotated[int, Query(ge=1, le=MAX_K, description="neighbours")] = 20,
    label: Annotated[
        str | None, Query(alias="class", description="only neighbours of this top class")
    ] = None,
    in_dist: Annotated[bool, Query(description="only neighbours in distribution")] = False,
) -> Filters:
    return Filters(k=k, label=label, in_dist=in_dist)


FiltersDep = Annotated[Filters, Depends(similar_filters)]


async def _neighbours(
    index: SimilarityIndex, vector: np.ndarray, filters: Filters, exclude: int | None
) -> tuple[list[Neighbour], float]:
    from galmorph.similarity.index import SimilarityError

    started = time.perf_counter()
    try:
        table = await run_in_threadpool(
            index.search,
            vector,
            filters.k,
            label=filters.label,
            in_distribution=filters.in_dist,
            exclude=exclude,
        )
    except SimilarityError as exc:
        raise HTTPException(422, str(exc)) from None
    rows = [Neighbour(**{k: _finite(v) for k, v in row.items()}) for row in table.to_pylist()]
    return rows, (time.perf_counter() - started) * 1e3


def _answer(
    index: SimilarityIndex,
    query: SimilarQuery,
    filters: Filters,
    found: tuple[list[Neighbour], float],
    started: float,
) -> SimilarResponse:
    manifest = index.manifest
    return SimilarResponse(
        query=query,
        k=filters.k,
        index=IndexInfo(count=manifest.count, model_sha256=manifest.model_sha256, metric="cosine"),
        neighbours=found[0],
        search_ms=round(found[1], 3),
        total_ms=round((time.perf_counter() - started) * 1e3, 3),
    )


@router.get(
    "/similar",
    response_model=SimilarResponse,
    responses=error_responses(401, 404, 422),
    summary="The indexed galaxies most like an indexed galaxy",
)
async def similar_by_id(
    index: IndexDep,
    filters: FiltersDep,
    id: Annotated[str, Query(min_length=1, max_length=1000, description="its id_str")],
) -> SimilarResponse:
    from galmorph.similarity.index import SimilarityError

    started = time.perf_counter()
    try:
        key = await run_in_threadpool(index.key_of_id, id)
    except SimilarityError as exc:
        raise HTTPException(404, str(exc)) from None
    row = index.ids.slice(key, 1).to_pylist()[0]
    query = SimilarQuery(
        id=id,
        filename=None,
        **{name: _finite(row[name]) for name in SimilarQuery.model_fields if name in row},
    )
    found = await _neighbours(index, index.vector(key), filters, exclude=key)
    return _answer(index, query, filters, found, started)


@router.post(
    "/similar",
    response_model=SimilarResponse,
    responses={
        **error_responses(401, 404, 408, 413, 415, 422, 503),
        409: {"model": ErrorResponse, "description": "the server's model is not the index's"},
    },
    summary="The indexed galaxies most like an uploaded cutout (embedded as /classify does)",
)
async def similar_to_upload(
    request: Request,
    index: IndexDep,
    plane: PlaneDep,
    filters: FiltersDep,
    stretch: Annotated[StretchName | None, Query(description="FITS flux stretch")] = None,
    fit: Annotated[FitMode | None, Query(description="crop_pad or resize")] = None,
    filename: Annotated[str | None, Query(description="file name hint for a raw body")] = None,
) -> SimilarResponse:
    if plane.model.sha256 != index.model_sha256:
        raise HTTPException(
            409,
            f"the index was built with model {index.model_sha256[:12]}, this server runs "
            f"{plane.model.sha256[:12]}: their embeddings are not comparable",
        )
    options = ClassifyOptions(stretch, fit, None, False, embeddings=True)
    async with plane.predict_upload(request, options, filename) as (_, item, prediction):
        upload = item.upload
    outputs = prediction.outputs
    assert outputs.embeddings is not None  # plane.start refuses a model without them
    best = int(outputs.probabilities.argmax())
    query = SimilarQuery(
        id=None,
        filename=upload.filename,
        pred_label=plane.model.card.class_names[best],
        pred_prob=float(outputs.probabilities[best]),
        in_distribution=None if outputs.in_distribution is None else bool(outputs.in_distribution),
        ood_score=None if outputs.ood_score is None else float(outputs.ood_score),
    )
    found = await _neighbours(index, outputs.embeddings, filters, exclude=None)
    return _answer(index, query, filters, found, plane.started)
