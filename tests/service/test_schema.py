"""The OpenAPI schema is the server's behaviour.

Schemathesis generates requests from the app's own schema (valid ones and, for the checks
that need them, invalid ones) and sends them to a real `galmorph serve` with an API key: any
5xx, an undocumented status, or a body, header or content type the schema does not describe
fails. The rest checks what the schema promises by name: the parameter enums are the
decoder's sets, required bodies are required, every refusal a route can give is documented.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from functools import cache
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis.specs.openapi.checks import positive_data_acceptance

from galmorph.core.cutouts.decode import FIT_MODES
from galmorph.core.cutouts.imaging import STRETCHES
from galmorph.service.app import create_app
from galmorph.service.headers import CONTENT_SECURITY_POLICY, DOCS_CONTENT_SECURITY_POLICY
from galmorph.service.routers import classify, health, inference_protocol, metrics, model_info
from galmorph.service.routers.inference_protocol import HEADER_LENGTH
from galmorph.service.settings import Settings
from tests.support.cutout_factory import make_grz_fits, make_jpeg, make_png, make_single_band_fits
from tests.support.onnx_factory import write_model
from tests.support.server_process import RunningServer, serve

API_KEY = "schema-test-key"
MODEL_NAME = "test_factory_model"  # tests/onnx_factory's
# The schema as the app builds it; the server below publishes the same one (checked).
OPENAPI = create_app(Settings(_env_file=None, api_key=API_KEY)).openapi()  # type: ignore[call-arg]
CONFIG = {
    # Schemathesis sends the key where the schema asks for it, and leaves it out (expecting
    # 401) in the requests made to violate the schema.
    "auth": {"openapi": {"APIKeyHeader": {"api_key": API_KEY}}},
    # Valid and invalid requests. OpenAPI does not forbid query parameters it does not name,
    # and the server ignores them: they are not a schema violation.
    "generation": {"mode": "all", "allow-extra-parameters": True},
}
schema = schemathesis.openapi.from_dict(OPENAPI, config=schemathesis.Config.from_dict(CONFIG))
# Uploads are real cutouts, one of each format: then a schema-valid request is one the server
# must accept, and schemathesis checks that it does.
CUTOUTS = st.sampled_from(
    [
        make_png(),
        make_jpeg(),
        make_grz_fits(size=64),
        make_grz_fits(size=48, gz=True, seed=1),
        make_single_band_fits(size=40),
    ]
)
schemathesis.openapi.format("binary", CUTOUTS)
schemathesis.openapi.media_type("application/octet-stream", CUTOUTS)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    work = tmp_path_factory.mktemp("schema")
    env = {"GALMORPH_API_KEY": API_KEY, "GALMORPH_MAX_BODY_BYTES": str(1 << 20)}
    with serve(write_model(work / "model.onnx"), work, env=env) as running:
        yield running


@pytest.mark.slow
@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,  # the same requests on every run
    suppress_health_check=list(HealthCheck),
)
def test_every_answer_matches_the_schema(case: schemathesis.Case, server: RunningServer) -> None:
    excluded: list[Any] = []
    if case.path.endswith("/infer"):
        # Aimed at the served model, so that the body is read (another name or version is a
        # 404 before it). A request the schema allows may still be one the model cannot
        # answer (its shape and its data must agree, which a schema cannot say): that is a 400.
        served = {"name": MODEL_NAME, "version": model_version(server)}
        case.path_parameters = {key: served[key] for key in case.path_parameters or {}}
        excluded = [positive_data_acceptance]
        if case.meta is not None and case.meta.generation.mode.is_positive and case.headers:
            # A made-up JSON length cuts the JSON short: without it the body's parsing is
            # fuzzed (the requests made to violate the schema still send odd lengths).
            case.headers.pop(HEADER_LENGTH, None)
    response = case.call_and_validate(base_url=server.url, excluded_checks=excluded)
    # Schemathesis keeps headers by lower-case name, each with its list of values.
    assert response.headers["x-content-type-options"] == ["nosniff"]
    assert response.headers["content-security-policy"] == [CONTENT_SECURITY_POLICY]


@cache
def model_version(server: RunningServer) -> str:
    version: str = httpx.get(f"{server.url}/model", headers={"X-API-Key": API_KEY}).json()[
        "version"
    ]
    return version


@pytest.mark.slow
def test_the_server_publishes_the_schema_tested(server: RunningServer) -> None:
    assert httpx.get(f"{server.url}/openapi.json").json() == OPENAPI


def test_every_reference_resolves_and_every_route_is_listed() -> None:
    # A schema placed by hand (the /v2 infer body) once carried pydantic's `$defs` references,
    # which point at nothing in an OpenAPI document: schemathesis and client generators fail.
    references = re.findall(r'"\$ref": "([^"]*)"', json.dumps(OPENAPI))
    assert references
    components = OPENAPI["components"]["schemas"]
    for reference in references:
        assert reference.removeprefix("#/components/schemas/") in components, reference
    # The page is not part of the API; /classify/sky is listed when it is enabled.
    routers = (classify, health, inference_protocol, metrics, model_info)
    routes = {route.path for module in routers for route in module.router.routes}
    assert "/v2/health/ready" in routes
    assert routes == set(OPENAPI["paths"])


def operation(path: str, method: str) -> dict[str, Any]:
    found: dict[str, Any] = OPENAPI["paths"][path][method]
    return found


def query_enum(path: str, name: str) -> list[str]:
    (parameter,) = [p for p in operation(path, "post")["parameters"] if p["name"] == name]
    (choice,) = [option for option in parameter["schema"]["anyOf"] if "enum" in option]
    enum: list[str] = choice["enum"]
    return enum


@pytest.mark.parametrize("path", ["/classify", "/classify/batch"])
def test_fit_and_stretch_are_the_decoders_sets(path: str) -> None:
    assert query_enum(path, "fit") == list(FIT_MODES)
    assert query_enum(path, "stretch") == sorted(STRETCHES)


def test_upload_bodies_are_required() -> None:
    single = operation("/classify", "post")["requestBody"]
    batch = operation("/classify/batch", "post")["requestBody"]
    assert single["required"] and batch["required"]
    assert single["content"]["multipart/form-data"]["schema"]["required"] == ["file"]
    assert batch["content"]["multipart/form-data"]["schema"]["required"] == ["files"]


def test_every_refusal_a_route_can_give_is_documented() -> None:
    error_ref = {"$ref": "#/components/schemas/ErrorResponse"}
    expected = {
        ("/classify", "post"): {"401", "408", "413", "415", "422", "503"},
        ("/classify/batch", "post"): {"401", "408", "413", "415", "422", "503"},
        ("/model", "get"): {"401", "503"},
        ("/readyz", "get"): {"503"},
        ("/v2/health/ready", "get"): {"503"},
    }
    # The Open Inference Protocol's routes refuse in its own shape, {"error": ...}.
    protocol_ref = {"$ref": "#/components/schemas/ProtocolErrorResponse"}
    for model in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        expected[(model, "get")] = {"401", "404", "422", "503"}
        expected[(f"{model}/ready", "get")] = {"404", "422", "503"}
        expected[(f"{model}/infer", "post")] = {"400", "401", "404", "408", "413", "415"}
        expected[(f"{model}/infer", "post")] |= {"422", "503"}
    # Readiness probes answer 503 with their readiness document.
    probes = {"/readyz", "/v2/health/ready", "/v2/models/{name}/ready"}
    probes.add("/v2/models/{name}/versions/{version}/ready")
    for path, methods in OPENAPI["paths"].items():
        for method, spec in methods.items():
            errors = {status for status in spec["responses"] if status[0] in "45"}
            assert errors == expected.get((path, method), set()), (path, method)
            # A key-protected route documents the key and its 401.
            assert ("security" in spec) == ("401" in errors), (path, method)
            for status in errors - {"503"} if path in probes else errors:
                body = spec["responses"][status]["content"]["application/json"]["schema"]
                wanted = protocol_ref if path.startswith("/v2/") else error_ref
                assert body == wanted, (path, method, status)
    assert "HTTPValidationError" not in OPENAPI["components"]["schemas"]


@pytest.mark.slow
def test_refusals_quote_what_was_sent_as_text(server: RunningServer) -> None:
    headers = {"X-API-Key": API_KEY}
    with httpx.Client(base_url=server.url, headers=headers) as client:
        odd = "m\x11odel ü"
        missing = client.get(f"/v2/models/{quote(odd)}")
        assert missing.status_code == 404
        # As sent, not as a Python repr ('m\x11odel ü' with a backslash escape); the Open
        # Inference Protocol's routes answer {"error": ...}.
        assert missing.json()["error"] == (
            f"no model named '{odd}'; this server serves 'test_factory_model'"
        )
        squash = client.post("/classify?fit=squash", content=make_png())
        assert squash.status_code == 422
        assert squash.json()["detail"] == (
            "query fit: Input should be 'crop_pad' or 'resize', got \"squash\""
        )
        extra = client.post("/classify", files={"file": make_png()}, data={"note": "x"})
        assert extra.status_code == 422
        assert extra.json()["detail"].startswith("multipart part 'note' is not expected")


def test_docs_are_off_by_default_and_on_with_their_own_policy() -> None:
    with TestClient(create_app(Settings(_env_file=None))) as client:  # type: ignore[call-arg]
        assert client.get("/docs").status_code == 404
        assert client.get("/redoc").status_code == 404
        page = client.get("/")
        assert page.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
        assert page.headers["Referrer-Policy"] == "no-referrer"
        assert client.get("/openapi.json").status_code == 200
    with TestClient(create_app(Settings(_env_file=None, docs=True))) as client:  # type: ignore[call-arg]
        docs = client.get("/docs")
        assert docs.status_code == 200
        assert docs.headers["Content-Security-Policy"] == DOCS_CONTENT_SECURITY_POLICY
        assert "https://cdn.jsdelivr.net/" in docs.text
        assert client.get("/healthz").headers["Content-Security-Policy"] == (
            CONTENT_SECURITY_POLICY
        )
