"""Liveness and readiness, plus the Open Inference Protocol's server-ready alias (its body has
the protocol's `ready`). Always open (no API key)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response

from galmorph.service.dependencies import RuntimeDep
from galmorph.service.schemas import Liveness, Readiness

router = APIRouter(tags=["health"])


# /v2/health/live answers in the protocol's own shape (routers/inference_protocol.py).
@router.get("/healthz", response_model=Liveness, summary="Liveness: the process answers")
async def live() -> Liveness:
    return Liveness()


NOT_READY: dict[int | str, dict[str, Any]] = {
    503: {"model": Readiness, "description": "not ready; `reason` says why"}
}


@router.get(
    "/readyz",
    response_model=Readiness,
    responses=NOT_READY,
    summary="Readiness: model loaded, warmed up, execution provider verified",
)
@router.get(
    "/v2/health/ready",
    response_model=Readiness,
    responses=NOT_READY,
    summary="Open Inference Protocol: server readiness (the answer of /readyz)",
)
async def ready(runtime: RuntimeDep, response: Response) -> Readiness:
    if not runtime.ready:
        response.status_code = 503
    providers = runtime.model.providers if runtime.model is not None else []
    return Readiness(ready=runtime.ready, reason=runtime.reason, providers=providers)
