"""The FastAPI application factory. Nothing is created at import time: every app owns its
settings, model runtime and metrics registry (tests build several side by side)."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.formparsers import MultiPartException
from starlette.requests import ClientDisconnect

from galmorph.core.cutouts import formats
from galmorph.core.cutouts.decode import CutoutError
from galmorph.core.version import __version__
from galmorph.service.batching import BatcherStoppedError, InferenceTimeoutError, QueueFullError
from galmorph.service.decoding import BodyBusyError, DecodeBusyError, Decoder
from galmorph.service.errors import cutout_status
from galmorph.service.headers import SecurityHeadersMiddleware
from galmorph.service.http_protocol import POLICY_STATE_KEY, ConnectionPolicy
from galmorph.service.metrics import MetricsMiddleware, ServiceMetrics
from galmorph.service.routers import (
    classify,
    health,
    inference_protocol,
    metrics,
    model_info,
    similar,
    sky,
    web,
)
from galmorph.service.runtime import MemoryTrimmer, ServiceRuntime
from galmorph.service.settings import Settings
from galmorph.service.sky import SkyCutouts
from galmorph.service.uploads import (
    BodyTimeoutError,
    HeaderValueError,
    PayloadTooLargeError,
    ServerDrainingError,
    SpoolSpaceError,
    UploadError,
)

logger = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    service_metrics = ServiceMetrics()
    runtime = ServiceRuntime(settings, service_metrics)
    decoder = Decoder(settings.decode_memory_budget_bytes, settings.decode_threads)
    sky_cutouts = SkyCutouts(settings) if settings.sky_enabled else None
    trimmer = MemoryTrimmer(idle=lambda: decoder.budget.used == 0)
    service_metrics.sample_queue = lambda: (
        runtime.batcher.queue_length if runtime.batcher is not None else 0
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[Mapping[str, Any]]:
        # Lifespan state: uvicorn hands it to every connection's protocol and every request.
        policy = ConnectionPolicy(
            header_timeout_s=settings.header_timeout_s,
            body_timeout_s=settings.body_timeout_s,
            upload_timeout_s=settings.upload_timeout_s,
            # Half the graceful-shutdown time: the answers still have to be sent after it.
            shutdown_upload_grace_s=settings.graceful_shutdown_s / 2,
            on_header_timeout=service_metrics.header_timeouts.inc,
            max_connections_per_client=settings.max_connections_per_client,
        )
        runtime.start()
        trimmer.start()
        try:
            yield {POLICY_STATE_KEY: policy}
        finally:
            await trimmer.stop()
            await runtime.stop()
            if sky_cutouts is not None:
                await sky_cutouts.aclose()
            decoder.shutdown()
            service_metrics.close()

    app = FastAPI(
        title="galmorph",
        version=__version__,
        description=f"Galaxy morphology classification of {formats.format_labels()} cutouts "
        "(Galaxy10 DECaLS classes) with onnxruntime.",
        lifespan=lifespan,
        # Swagger UI and ReDoc load their scripts from a CDN: only when asked for.
        docs_url="/docs" if settings.docs else None,
        redoc_url="/redoc" if settings.docs else None,
    )
    app.state.settings = settings
    app.state.metrics = service_metrics
    app.state.runtime = runtime
    app.state.decoder = decoder
    app.state.sky = sky_cutouts
    app.state.similarity_index = similar.open_index(settings)

    routers = (classify, health, inference_protocol, model_info, metrics, web)
    for module in routers:
        app.include_router(module.router)
    # Off, /classify/sky answers 404 saying how to turn it on, and is not in the schema.
    app.include_router(sky.router, include_in_schema=settings.sky_enabled)
    app.include_router(similar.router, include_in_schema=settings.similarity_index is not None)
    app.mount("/static", StaticFiles(directory=web.STATIC_DIR), name="static")
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["X-API-Key", "Content-Type"],
        )
    app.add_middleware(SecurityHeadersMiddleware, docs_paths=docs_paths(app))
    # Outermost, so it also counts responses produced by the exception handlers.
    app.add_middleware(MetricsMiddleware, metrics=service_metrics)
    add_exception_handlers(app)
    return app


def docs_paths(app: FastAPI) -> frozenset[str]:
    paths = (app.docs_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url)
    return frozenset(path for path in paths if path is not None and app.docs_url is not None)


def app_from_environment() -> FastAPI:
    """Factory for `uvicorn --factory` (several workers): settings from env and .env."""
    return create_app(Settings())


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def parameter_problem(error: Mapping[str, Any]) -> str:
    """`query top_k: Input should be ..., got "0"`: where, what was wrong, what was sent."""
    where = " ".join(str(part) for part in error["loc"])
    sent = error.get("input")
    got = f", got {json.dumps(sent, ensure_ascii=False)}" if isinstance(sent, str) else ""
    return f"{where}: {error['msg']}{got}"


def add_exception_handlers(app: FastAPI) -> None:
    """Every refusal is a JSON {"detail": "..."} with the right status, never a 500."""

    @app.exception_handler(CutoutError)
    async def cutout_error(_: Request, exc: CutoutError) -> JSONResponse:
        return _error(cutout_status(exc), exc.message)

    @app.exception_handler(PayloadTooLargeError)
    async def too_large(_: Request, exc: PayloadTooLargeError) -> JSONResponse:
        # The rest of the body was not read: closing the connection is the only safe end.
        return _error(413, str(exc), {"Connection": "close"})

    @app.exception_handler(BodyTimeoutError)
    async def body_timeout(_: Request, exc: BodyTimeoutError) -> JSONResponse:
        return _error(408, str(exc), {"Connection": "close"})

    @app.exception_handler(ServerDrainingError)
    async def draining(_: Request, exc: ServerDrainingError) -> JSONResponse:
        return _error(503, str(exc), {"Connection": "close", "Retry-After": "5"})

    @app.exception_handler(SpoolSpaceError)
    async def no_spool_space(_: Request, exc: SpoolSpaceError) -> JSONResponse:
        return _error(503, str(exc), {"Connection": "close", "Retry-After": "5"})

    @app.exception_handler(UploadError)
    async def bad_upload(_: Request, exc: UploadError) -> JSONResponse:
        return _error(422, str(exc))

    @app.exception_handler(MultiPartException)
    async def bad_multipart(_: Request, exc: MultiPartException) -> JSONResponse:
        return _error(422, f"malformed multipart body: {exc.message}")

    @app.exception_handler(RequestValidationError)
    async def bad_parameters(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, "; ".join(parameter_problem(error) for error in exc.errors()))

    @app.exception_handler(QueueFullError)
    async def queue_full(_: Request, exc: QueueFullError) -> JSONResponse:
        return _error(503, str(exc), {"Retry-After": str(exc.retry_after_s)})

    @app.exception_handler(DecodeBusyError)
    async def decode_busy(_: Request, exc: DecodeBusyError) -> JSONResponse:
        return _error(503, str(exc), {"Retry-After": str(exc.retry_after_s)})

    @app.exception_handler(BodyBusyError)
    async def body_busy(_: Request, exc: BodyBusyError) -> JSONResponse:
        # Refused before the body was read: closing the connection is the only safe end.
        headers = {"Retry-After": str(exc.retry_after_s), "Connection": "close"}
        return _error(503, str(exc), headers)

    @app.exception_handler(HeaderValueError)
    async def bad_header(_: Request, exc: HeaderValueError) -> JSONResponse:
        return _error(400, str(exc), {"Connection": "close"})

    @app.exception_handler(InferenceTimeoutError)
    async def timed_out(request: Request, exc: InferenceTimeoutError) -> JSONResponse:
        runtime: ServiceRuntime = request.app.state.runtime
        retry = runtime.batcher.retry_after_s() if runtime.batcher is not None else 1
        return _error(503, str(exc), {"Retry-After": str(retry)})

    @app.exception_handler(BatcherStoppedError)
    async def stopped(_: Request, exc: BatcherStoppedError) -> JSONResponse:
        return _error(503, str(exc), {"Retry-After": "5"})

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.error("unhandled error", exc_info=exc)
        return _error(500, "internal server error")

    @app.exception_handler(ClientDisconnect)
    async def client_gone(_: Request, exc: ClientDisconnect) -> JSONResponse:
        # Nobody reads this answer; it only keeps a vanished client out of the 500s.
        return _error(400, "client disconnected before the request body was complete")
