"""GET /metrics in the Prometheus text format (open, like the health endpoints)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from galmorph.service.dependencies import MetricsDep, RuntimeDep
from prometheus_client import CONTENT_TYPE_LATEST

router = APIRouter(tags=["metrics"])


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(metrics: MetricsDep, runtime: RuntimeDep) -> Response:
    if runtime.batcher is not None:
        metrics.queue_length.set(runtime.batcher.queue_length)
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)
