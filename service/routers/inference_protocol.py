"""The Open Inference Protocol v2 over REST (KServe, Triton, Seldon clients call it as is): its
routes, kept thin, as in the protocol's spec (github.com/kserve/open-inference-protocol,
specification/protocol/inference_rest.md):

- `GET /v2` server metadata, `GET /v2/health/live` -> {"live": true} (`/v2/health/ready` is
  the readiness route's alias, galmorph.service.routers.health);
- `GET /v2/models/{name}[/versions/{version}]` model metadata, `.../ready` model readiness;
- `POST /v2/models/{name}[/versions/{version}]/infer`.

The model's name is the card's `model_name`, its one version the first 12 hex digits of its
SHA-256 (as `GET /model` reports). The request and response documents are in
galmorph.service.oip.models; the input's datatypes, shapes, limits and binary data, and the
outputs as tensors, in galmorph.service.oip.codec; decoding, queueing and inference are the
data plane's (galmorph.service.data_plane), as for /classify. Request parameters `stretch` and
`fit` are `/classify`'s query options; UINT8 images are fitted on the decode threads within the
memory budget. Errors are the protocol's `{"error": "..."}` with the status the rest of the API
gives the same refusal (400 for a malformed protocol request).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from galmorph.core.cutouts.decode import DecodedCutout
from galmorph.core.modelfile.contract import OUTPUT_NAME
from galmorph.core.modelfile.engine import OnnxModel
from galmorph.core.version import __version__
from galmorph.service.data_plane import ClassifyOptions, DataPlane, Job, PlaneDep
from galmorph.service.dependencies import ReadyModelDep, RuntimeDep, require_api_key
from galmorph.service.oip.codec import (
    HEADER_LENGTH,
    IMAGES_INPUT,
    body_limit,
    encode_response,
    input_specs,
    output_specs,
    read_request,
    requested_outputs,
    string_parameter,
)
from galmorph.service.oip.models import (
    InferenceRequest,
    InferenceResponse,
    ModelReady,
    ProtocolError,
    ProtocolErrorResponse,
    ServerLive,
    ServerMetadata,
)
from galmorph.service.results import model_version, output_values
from galmorph.service.schemas import ERROR_DESCRIPTIONS, KServeModelMetadata, inline_definitions
from galmorph.service.uploads import MAX_LENGTH_DIGITS, BodyReader, Upload

SERVER_NAME = "galmorph"
PLATFORM = "onnx_onnxv1"  # the protocol's platform name for an ONNX model run by onnxruntime
BINARY_EXTENSION = "binary_tensor_data"
BODY_READ = "inference_body_read"  # request.state: False while the body is being read


class ProtocolRoute(APIRoute):
    """Answers every refusal in the protocol's shape, {"error": ...}, with the status and
    headers (Retry-After, Connection) the app's own exception handlers give it elsewhere."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def answer(request: Request) -> Response:
            response: Response
            try:
                return await handler(request)
            except ProtocolError as exc:
                response = JSONResponse({"error": exc.message}, status_code=exc.status)
            except Exception as exc:
                response = await _as_protocol_error(request, exc)
            if not getattr(request.state, BODY_READ, True):
                # Refused before the whole body was read: the rest would otherwise have to be
                # read and thrown away for the connection to serve another request.
                response.headers["Connection"] = "close"
            return response

        return answer


async def _as_protocol_error(request: Request, exc: Exception) -> Response:
    handlers = request.app.exception_handlers
    handler = next((handlers[c] for c in type(exc).__mro__ if c in handlers), None)
    if handler is None:
        raise exc
    response: Response = await handler(request, exc)
    try:
        detail = json.loads(bytes(response.body))["detail"]
    except (ValueError, KeyError, TypeError):
        return response
    headers = {
        key: value
        for key, value in response.headers.items()
        if key.lower() not in ("content-length", "content-type")
    }
    message = detail if isinstance(detail, str) else json.dumps(detail)
    return JSONResponse({"error": message}, status_code=response.status_code, headers=headers)


def protocol_errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    descriptions = {400: "malformed inference request (protocol)", **ERROR_DESCRIPTIONS}
    return {
        status: {"model": ProtocolErrorResponse, "description": descriptions[status]}
        for status in statuses
    }


router = APIRouter(tags=["open inference protocol"], route_class=ProtocolRoute)
keyed = [Depends(require_api_key)]


INFER_BODY = {
    "requestBody": {
        "required": True,
        "description": "an inference request; with the binary tensor data extension the JSON "
        f"is followed by the tensors' bytes and `{HEADER_LENGTH}` gives the JSON's length",
        "content": {
            "application/json": {"schema": inline_definitions(InferenceRequest.model_json_schema())}
        },
    },
    "parameters": [
        {
            "name": HEADER_LENGTH,
            "in": "header",
            "required": False,
            "description": "binary tensor data extension: the length of the JSON at the start "
            "of the body, in bytes",
            "schema": {"type": "string", "pattern": f"^[0-9]{{1,{MAX_LENGTH_DIGITS}}}$"},
        }
    ],
    # With binary_data_output the outputs' bytes follow the JSON (its length in the header).
    "responses": {
        "200": {
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
            }
        }
    },
}


# --- server ------------------------------------------------------------------------------


@router.get("/v2", response_model=ServerMetadata, summary="Open Inference Protocol: server")
async def server_metadata() -> ServerMetadata:
    return ServerMetadata(name=SERVER_NAME, version=__version__, extensions=[BINARY_EXTENSION])


@router.get("/v2/health/live", response_model=ServerLive, summary="Open Inference Protocol: live")
async def server_live() -> ServerLive:
    return ServerLive(live=True)


# --- model -------------------------------------------------------------------------------


def check_model(model: OnnxModel, name: str, version: str | None) -> None:
    served = model.card.model_name
    if name != served:
        # Names as sent, not as Python reprs (which escape what a client typed).
        raise ProtocolError(404, f"no model named '{name}'; this server serves '{served}'")
    if version is not None and version != model_version(model):
        raise ProtocolError(
            404, f"model '{name}' has no version '{version}'; it has '{model_version(model)}'"
        )


MODEL_ERRORS = protocol_errors(401, 404, 422, 503)


@router.get(
    "/v2/models/{name}",
    response_model=KServeModelMetadata,
    responses=MODEL_ERRORS,
    dependencies=keyed,
    summary="Open Inference Protocol: model metadata",
)
@router.get(
    "/v2/models/{name}/versions/{version}",
    response_model=KServeModelMetadata,
    responses=MODEL_ERRORS,
    dependencies=keyed,
    summary="Open Inference Protocol: model metadata of a version",
)
async def model_metadata(
    name: str, ready: ReadyModelDep, version: str | None = None
) -> KServeModelMetadata:
    model = ready.model
    check_model(model, name, version)
    return KServeModelMetadata(
        name=model.card.model_name,
        versions=[model_version(model)],
        platform=PLATFORM,
        inputs=input_specs(model),
        outputs=output_specs(model),
    )


@router.get(
    "/v2/models/{name}/ready",
    response_model=ModelReady,
    responses={503: {"model": ModelReady, "description": "not ready"}, **protocol_errors(404, 422)},
    summary="Open Inference Protocol: model readiness",
)
@router.get(
    "/v2/models/{name}/versions/{version}/ready",
    response_model=ModelReady,
    responses={503: {"model": ModelReady, "description": "not ready"}, **protocol_errors(404, 422)},
    summary="Open Inference Protocol: readiness of a model version",
)
async def model_ready(
    name: str, runtime: RuntimeDep, response: Response, version: str | None = None
) -> ModelReady:
    if runtime.model is not None:
        check_model(runtime.model, name, version)
    if not runtime.ready:
        response.status_code = 503
    return ModelReady(name=name, ready=runtime.ready)


# --- inference ---------------------------------------------------------------------------

INFER_ERRORS = protocol_errors(400, 401, 404, 408, 413, 415, 422, 503)


@router.post(
    "/v2/models/{name}/infer",
    response_model=InferenceResponse,
    responses=INFER_ERRORS,
    openapi_extra=INFER_BODY,
    dependencies=keyed,
    summary="Open Inference Protocol: classify images or files",
)
async def infer(
    request: Request,
    name: str,
    plane: PlaneDep,
) -> Response:
    return await _infer(request, name, None, plane)


# A route of its own: one function for both would give the unversioned route a `version`
# query parameter the protocol does not have.
@router.post(
    "/v2/models/{name}/versions/{version}/infer",
    response_model=InferenceResponse,
    responses=INFER_ERRORS,
    openapi_extra=INFER_BODY,
    dependencies=keyed,
    summary="Open Inference Protocol: classify with a model version",
)
async def infer_version(
    request: Request,
    name: str,
    version: str,
    plane: PlaneDep,
) -> Response:
    return await _infer(request, name, version, plane)


async def _infer(request: Request, name: str, version: str | None, plane: DataPlane) -> Response:
    model = plane.model
    check_model(model, name, version)
    if request.headers.get("content-encoding", "identity") != "identity":
        raise ProtocolError(415, "compressed requests are not supported: send them uncompressed")
    # The body's memory (and its JSON's parse) is reserved until the answer is made.
    with plane.decoder.budget.claim_body() as reserve:
        body = BodyReader(request, body_limit(plane.settings), reserve)
        setattr(request.state, BODY_READ, False)
        try:
            inference, tensor, data = await read_request(request, body, reserve, plane.settings)
        finally:
            await body.aclose()
        setattr(request.state, BODY_READ, True)
        wanted = requested_outputs(inference, model)
        options = ClassifyOptions(
            stretch=string_parameter(inference, "stretch"),
            fit=string_parameter(inference, "fit"),
            top_k=None,
            return_image=False,
        )
        plane.admit(len(data))
        job = plane.start(options)
        with plane.counting():
            cutouts = [await _model_input(tensor.name, i, x, job) for i, x in enumerate(data)]
        predictions = await job.predict([cutout.image for cutout in cutouts])
    outputs = [(output, output_values(_field(output.name), predictions)) for output in wanted]
    document: dict[str, Any] = {
        "model_name": model.card.model_name,
        "model_version": model_version(model),
    }
    if inference.id is not None:
        document["id"] = inference.id
    binary = bool(inference.parameters.get("binary_data_output", False))
    content, json_length = encode_response(document, outputs, binary)
    if json_length is None:
        return Response(content, media_type="application/json")
    return Response(
        content, media_type="application/octet-stream", headers={HEADER_LENGTH: str(json_length)}
    )


def _field(output_name: str) -> str:
    """The ModelOutputs field behind an output tensor (the rest share their names)."""
    return "probabilities" if output_name == OUTPUT_NAME else output_name


async def _model_input(input_name: str, index: int, item: Any, job: Job) -> DecodedCutout:
    """One element of the input: an image fitted as a PNG of it would be, or a file decoded
    as /classify decodes an upload."""
    where = f"{input_name}[{index}]"
    if input_name == IMAGES_INPUT:
        return await job.fit(item, where)
    if not len(item):
        raise ProtocolError(400, f"{where} is empty")
    return (await job.decode(Upload(item, None, None), where)).cutout
