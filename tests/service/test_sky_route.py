"""GET /classify/sky on a real `galmorph serve`, against the loopback stub of the cutout service:
off by default, behind the API key, the cache in front, and every upstream failure a clear
refusal with the right status."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from galmorph.core.cutouts.decode import decode_cutout
from galmorph.core.modelfile.engine import OnnxModel
from galmorph.core.sky.client import CutoutSpec
from galmorph.core.sky.options import CutoutOptions
from galmorph.service.app import create_app
from galmorph.service.settings import Settings
from tests.support.onnx_factory import write_model
from tests.support.server_process import RunningServer, serve
from tests.support.sky_stub import SkyStub, render_fits

API_KEY = "sky-route-key"
ROUTE = "/classify/sky"
FETCH_TIMEOUT_S = 1.5  # the stub's "slow" answers take twice as long
RETRY_AFTER_S = 2  # the stub's, on 429 and 503: not a number the server uses itself
# Small servers on a shared machine: one decode thread, batches of one (serve() gives
# onnxruntime --threads 1).
THREADS = {"GALMORPH_DECODE_THREADS": "1", "GALMORPH_MAX_BATCH_SIZE": "1"}


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sky_route")


@pytest.fixture(scope="module")
def model(work: Path) -> Path:
    return write_model(work / "model.onnx")


@pytest.fixture(scope="module")
def onnx(model: Path) -> OnnxModel:
    return OnnxModel(model, intra_op_threads=1)


@pytest.fixture(scope="module")
def stub() -> Iterator[SkyStub]:
    with SkyStub(retry_after=RETRY_AFTER_S, slow_seconds=2 * FETCH_TIMEOUT_S) as running:
        yield running


def sky_env(stub: SkyStub, cache: Path, **extra: str) -> dict[str, str]:
    return {
        **THREADS,
        "GALMORPH_SKY_ENABLED": "true",
        "GALMORPH_CUTOUT_URL": stub.base_url,
        "GALMORPH_CUTOUT_CACHE": str(cache),
        "GALMORPH_FETCH_ATTEMPTS": "1",  # each fault reaches the client as the stub made it
        "GALMORPH_FETCH_TIMEOUT_S": str(FETCH_TIMEOUT_S),
        **extra,
    }


@pytest.fixture(scope="module")
def server(work: Path, model: Path, stub: SkyStub) -> Iterator[RunningServer]:
    env = sky_env(stub, work / "cache", GALMORPH_API_KEY=API_KEY)
    with serve(model, work, env=env) as running:
        yield running


def ask(
    server: RunningServer, ra: str, dec: str, key: str | None = API_KEY, **params: str
) -> httpx.Response:
    headers = {} if key is None else {"X-API-Key": key}
    return httpx.get(
        f"{server.url}{ROUTE}", params={"ra": ra, "dec": dec, **params}, headers=headers, timeout=30
    )


def detail(response: httpx.Response) -> str:
    """The refusal's text; every refusal is JSON {"detail": ...}."""
    assert response.headers["content-type"] == "application/json"
    text: str = response.json()["detail"]
    return text


def test_off_by_default() -> None:
    # In process: the refusal comes before the model or the network are needed.
    with TestClient(create_app(Settings(_env_file=None))) as client:  # type: ignore[call-arg]
        response = client.get(ROUTE, params={"ra": "150", "dec": "2"})
        assert response.status_code == 404
        assert "GALMORPH_SKY_ENABLED=true" in detail(response)
        assert ROUTE not in client.get("/openapi.json").json()["paths"]


def test_classifies_a_position_then_reads_it_from_the_cache(
    server: RunningServer, stub: SkyStub, onnx: OnnxModel
) -> None:
    first = ask(server, "150.1", "2.2", top_k="2")
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["cutout"]["source"] == "fetched"
    (request,) = stub.requests("/cutout.fits")
    # The model's own field: its input size at its pixel scale, in its bands.
    height, width = onnx.card.input_size
    assert request.params["size"] == str(width) and request.params["bands"] == "grz"
    assert float(request.params["pixscale"]) == onnx.card.pixel_scale
    spec = CutoutSpec.for_input(onnx.card.input_spec, CutoutOptions(base_url=stub.base_url))
    assert body["cutout"] == {
        "url": spec.request(150.1, 2.2).url,
        "source": "fetched",
        "ra": 150.1,
        "dec": 2.2,
        **spec.to_dict(),
    }
    # The same probabilities as the stub's FITS decoded and classified here.
    data = render_fits(150.1, 2.2, "grz", onnx.card.pixel_scale, width, height)
    expected = onnx.predict(decode_cutout(data, spec=onnx.card.input_spec).image[None])[0]
    got = [body["probabilities"][name] for name in onnx.card.class_names]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert len(body["top_k"]) == 2 and body["preprocessing"]["format"] == "fits"

    second = ask(server, "150.1", "2.2", top_k="2")
    assert second.status_code == 200, second.text
    assert second.json()["cutout"]["source"] == "cached"
    assert second.json()["probabilities"] == body["probabilities"]
    assert len(stub.requests("/cutout.fits")) == 1, "the cached cutout was fetched again"


def test_the_api_key_is_required(server: RunningServer, stub: SkyStub) -> None:
    before = len(stub.log)
    for key in (None, "wrong"):
        response = ask(server, "150.2", "2.2", key=key)
        assert response.status_code == 401
        assert "X-API-Key" in detail(response)
    assert len(stub.log) == before, "an unauthorised request reached the cutout service"


@pytest.mark.parametrize(
    ("ra", "dec", "message"),
    [
        ("12:30:49.4", "+12:23:28", "ra '12:30:49.4' is sexagesimal; galmorph takes decimal"),
        ("187.7", "12h23m28s", "dec '12h23m28s' is sexagesimal"),
        ("north", "2", "ra 'north' is not a number of degrees"),
        ("150", "95", "dec 95.0 is outside [-90, 90] degrees"),
        ("nan", "2", "must be finite degrees"),
    ],
)
def test_positions_that_are_not_degrees_are_422(
    server: RunningServer, stub: SkyStub, ra: str, dec: str, message: str
) -> None:
    before = len(stub.log)
    response = ask(server, ra, dec)
    assert response.status_code == 422
    assert message in detail(response)
    assert len(stub.log) == before


def test_upstream_errors_and_bad_bodies_are_502(server: RunningServer, stub: SkyStub) -> None:
    stub.plan[(151.0, 2.0)] = ["500"]
    stub.plan[(151.1, 2.0)] = ["text"]
    failed = ask(server, "151.0", "2.0")
    assert failed.status_code == 502
    assert detail(failed).startswith("cutout service: HTTP 500 from 127.0.0.1:")
    assert "NoOverlapError" in detail(failed)  # what the service said, tags stripped
    text = ask(server, "151.1", "2.0")
    assert text.status_code == 502
    assert "the body is text, not a FITS cutout: no such layer" in detail(text)


def test_no_answer_in_time_is_504(server: RunningServer, stub: SkyStub) -> None:
    stub.plan[(152.0, 2.0)] = ["slow"]
    response = ask(server, "152.0", "2.0")
    assert response.status_code == 504
    host = urlsplit(stub.base_url).netloc
    assert detail(response) == (
        f"cutout service: no complete answer from {host} within {FETCH_TIMEOUT_S:g} s"
    )


def test_offline_serves_the_cache_and_refuses_a_miss(
    work: Path, model: Path, server: RunningServer, stub: SkyStub
) -> None:
    online = ask(server, "153.5", "2.0")  # fills the cache the offline server shares
    assert online.status_code == 200, online.text
    env = sky_env(stub, work / "cache", GALMORPH_CUTOUT_OFFLINE="true")
    offline_from = time.monotonic()
    with serve(model, work, env=env) as offline:
        hit = ask(offline, "153.5", "2.0", key=None)
        assert hit.status_code == 200, hit.text
        assert hit.json()["cutout"]["source"] == "cached"
        assert hit.json()["probabilities"] == online.json()["probabilities"]
        miss = ask(offline, "153.0", "2.0", key=None)
        assert miss.status_code == 503
        assert "Retry-After" not in miss.headers
        assert "not in this server's cache, and the server is offline" in detail(miss)
    asked = [r for r in stub.log if r.start >= offline_from]
    assert not asked, "offline, the server asked the cutout service"


def test_a_busy_service_is_503_with_its_retry_after(server: RunningServer, stub: SkyStub) -> None:
    # Last on this server: the 429 holds its requests to the stub back for RETRY_AFTER_S.
    stub.plan[(154.0, 2.0)] = ["429"]
    stub.plan[(154.1, 2.0)] = ["503"]
    for ra, status in (("154.0", 429), ("154.1", 503)):
        response = ask(server, ra, "2.0")
        assert response.status_code == 503
        assert response.headers["Retry-After"] == str(RETRY_AFTER_S)
        assert detail(response).startswith(f"cutout service: HTTP {status} from 127.0.0.1:")


def test_the_schema_documents_the_route(server: RunningServer, stub: SkyStub) -> None:
    schema = httpx.get(f"{server.url}/openapi.json").json()
    operation = schema["paths"][ROUTE]["get"]
    error = {"$ref": "#/components/schemas/ErrorResponse"}
    errors = {code: spec for code, spec in operation["responses"].items() if code[0] in "45"}
    assert set(errors) == {"401", "422", "502", "503", "504"}
    for spec in errors.values():
        assert spec["content"]["application/json"]["schema"] == error
    assert "security" in operation
    assert {p["name"] for p in operation["parameters"] if p["required"]} == {"ra", "dec"}
    ok = operation["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok == {"$ref": "#/components/schemas/SkyClassificationResult"}
    cutout = schema["components"]["schemas"]["SkyCutout"]
    spec = CutoutSpec(base_url=stub.base_url)
    assert set(cutout["properties"]) == {"url", "source", "ra", "dec", *spec.to_dict()}
    assert cutout["properties"]["source"]["enum"] == ["cached", "fetched"]


def test_an_unwritable_cache_refuses_to_start(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, sky_enabled=True, cutout_cache=blocker / "cutouts"
    )
    with pytest.raises(RuntimeError, match=r"not writable.*GALMORPH_CUTOUT_OFFLINE"):
        create_app(settings)
    offline = settings.model_copy(update={"cutout_offline": True})
    create_app(offline)  # offline reads a filled cache and never writes
