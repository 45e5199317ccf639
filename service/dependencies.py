"""FastAPI dependencies: the per-app settings and runtime, readiness, the optional API key."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request, Security
from fastapi.security import APIKeyHeader

from galmorph.core.modelfile.engine import OnnxModel
from galmorph.service.batching import MicroBatcher
from galmorph.service.metrics import ServiceMetrics
from galmorph.service.runtime import ServiceRuntime
from galmorph.service.settings import Settings

API_KEY_HEADER = APIKeyHeader(name="X-API-Key", auto_error=False)
NOT_READY_RETRY_AFTER_S = 5


def get_runtime(request: Request) -> ServiceRuntime:
    runtime: ServiceRuntime = request.app.state.runtime
    return runtime


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_metrics(request: Request) -> ServiceMetrics:
    metrics: ServiceMetrics = request.app.state.metrics
    return metrics


@dataclass(frozen=True)
class ReadyModel:
    model: OnnxModel
    batcher: MicroBatcher


def get_ready_model(runtime: Annotated[ServiceRuntime, Depends(get_runtime)]) -> ReadyModel:
    if not runtime.ready or runtime.model is None or runtime.batcher is None:
        raise HTTPException(
            503,
            f"model not ready: {runtime.reason}",
            headers={"Retry-After": str(NOT_READY_RETRY_AFTER_S)},
        )
    return ReadyModel(runtime.model, runtime.batcher)


def require_api_key(
    settings: Annotated[Settings, Depends(get_settings)],
    api_key: Annotated[str | None, Security(API_KEY_HEADER)],
) -> None:
    if settings.api_key is None:
        return
    expected = settings.api_key.get_secret_value().encode()
    if api_key is None or not secrets.compare_digest(api_key.encode(), expected):
        raise HTTPException(401, "missing or wrong X-API-Key header")


SettingsDep = Annotated[Settings, Depends(get_settings)]
RuntimeDep = Annotated[ServiceRuntime, Depends(get_runtime)]
ReadyModelDep = Annotated[ReadyModel, Depends(get_ready_model)]
MetricsDep = Annotated[ServiceMetrics, Depends(get_metrics)]
