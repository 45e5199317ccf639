"""Liveness and readiness, plus the Open Inference Protocol's server-ready alias (its body has
the protocol's `ready`). Always open (no API key)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from galmorph.service.dependencies import RuntimeDep
from galmorph.service.schemas import Liveness, Readiness

router = APIRouter(tags=["health"])


# /v2/health/live answers in the protocol's own shape (routers/inference_protocol.py).
@router.get("/healthz", response_model=Liveness, summary="Liveness: the process answers")
async def live() -> Liveness:
    return Liveness()


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "not ready; `reason` says why"}},
    summary="Readiness: model loaded, warmed up, execution provider verified",
)
@router.get("/v2/health/ready", response_model=Readiness, include_in_schema=False)
async def ready(runtime: RuntimeDep, response: Response) -> Readiness:
    if not runtime.ready:
        response.status_code = 503
    providers = runtime.model.providers if runtime.model is not None else []
    return Readiness(ready=runtime.ready, reason=runtime.reason, providers=providers)
