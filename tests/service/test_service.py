"""In-process tests of the classification service: engine, batcher, settings and the HTTP API."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from galmorph.core.cutouts.decode import DecodeLimits, decode_cutout
from galmorph.core.data.galaxy10 import GALAXY10_CLASS_NAMES
from galmorph.core.modelfile.contract import ModelOutputs
from galmorph.core.modelfile.engine import CPU_PROVIDER, CUDA_PROVIDER, ModelLoadError, OnnxModel
from galmorph.service.batching import (
    BatcherConfig,
    InferenceTimeoutError,
    MicroBatcher,
    QueueFullError,
)
from galmorph.service.log_format import JsonFormatter
from galmorph.service.settings import Settings
from tests.support.app_client import running, settings_for, settings_without_dotenv, wait_for
from tests.support.cutout_factory import bad_inputs, gzip_bomb, make_grz_fits, make_png
from tests.support.onnx_factory import FactoryModel, build_model, write_model

CPU = [CPU_PROVIDER]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("model") / "model.onnx")


@pytest.fixture(scope="module")
def client(model_path: Path) -> Iterator[TestClient]:
    with running(settings_for(model_path, max_body_bytes=8 * 1024 * 1024)) as client:
        yield client


# --- engine -------------------------------------------------------------------------------


def test_engine_loads_contract_and_reports_active_providers(model_path: Path) -> None:
    model = OnnxModel(model_path)  # default: CUDA first when this build offers it
    assert model.providers[-1] == CPU_PROVIDER
    # No GPU here: CUDA may be *offered* but the session must report that it is not active.
    assert model.cuda_active == (CUDA_PROVIDER in model.providers)
    assert model.requested_providers[0] in (CUDA_PROVIDER, CPU_PROVIDER)
    assert model.sha256 == hashlib.sha256(model_path.read_bytes()).hexdigest()
    assert model.card.class_names == GALAXY10_CLASS_NAMES
    assert model.input_size == (64, 64)
    images = np.random.default_rng(0).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    probabilities = model.predict(images)
    assert probabilities.shape == (5, 10) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    # Batched and single runs agree (the batcher relies on it).
    single = np.concatenate([model.predict(images[i : i + 1]) for i in range(5)])
    np.testing.assert_allclose(single, probabilities, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"uint8 images of shape \(N, 64, 64, 3\)"):
        model.predict(images.astype(np.float32))


def test_cuda_is_asked_for_only_where_an_nvidia_driver_is(monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime

    from galmorph.core.modelfile import engine

    offered = set(onnxruntime.get_available_providers())
    monkeypatch.setattr(engine, "nvidia_driver_present", lambda: False)
    assert engine.default_providers() == [CPU_PROVIDER]
    monkeypatch.setattr(engine, "nvidia_driver_present", lambda: True)
    assert engine.default_providers() == [
        name for name in (CUDA_PROVIDER, CPU_PROVIDER) if name in offered
    ]
    assert CUDA_PROVIDER in offered  # onnxruntime-gpu is the build we install


def test_engine_refuses_files_outside_the_contract(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        OnnxModel(tmp_path / "missing.onnx", providers=CPU)
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ModelLoadError, match="cannot load"):
        OnnxModel(tmp_path / "junk.onnx", providers=CPU)
    bare = build_model(FactoryModel())
    del bare.metadata_props[:]
    onnx.save(bare, str(tmp_path / "bare.onnx"))
    with pytest.raises(ModelLoadError, match=r"galmorph\.model_name"):
        OnnxModel(tmp_path / "bare.onnx", providers=CPU)
    wrong_size = FactoryModel(metadata_overrides={"galmorph.input_size": "[32, 32]"})
    with pytest.raises(ModelLoadError, match=r"does not match \[N, 32, 32, 3\]"):
        OnnxModel(write_model(tmp_path / "wrong.onnx", wrong_size), providers=CPU)
    fixed = write_model(tmp_path / "fixed.onnx", FactoryModel(fixed_batch=4))
    with pytest.raises(ModelLoadError, match="batch dimension fixed at 4"):
        OnnxModel(fixed, providers=CPU)
    good = write_model(tmp_path / "good.onnx", FactoryModel())
    with pytest.raises(ModelLoadError, match=r"unknown onnxruntime provider\(s\) CPUProvider"):
        OnnxModel(good, providers=["CPUProvider"])
    assert (
        OnnxModel(write_model(tmp_path / "one.onnx", FactoryModel(fixed_batch=1))).max_batch_size
        == 1
    )


# --- micro-batcher --------------------------------------------------------------------------


def slow_predict(delay_s: float, calls: list[int]) -> Any:
    def predict(images: np.ndarray) -> ModelOutputs:
        calls.append(len(images))
        time.sleep(delay_s)
        return ModelOutputs(images.reshape(len(images), -1)[:, :2].astype(np.float32))

    return predict


def test_batcher_groups_concurrent_requests_and_keeps_order() -> None:
    calls: list[int] = []

    async def scenario() -> None:
        batcher = MicroBatcher(
            slow_predict(0.02, calls), BatcherConfig(max_batch_size=4, max_delay_ms=50)
        )
        batcher.start()
        images = [np.full((2, 2, 3), i, np.uint8) for i in range(10)]
        results = await asyncio.gather(*(batcher.submit(image) for image in images))
        await batcher.stop()
        for i, result in enumerate(results):
            assert result.probabilities.tolist() == [i, i]  # each caller gets its own row
            assert result.batch_size >= 1 and result.queue_s >= 0
        assert max(r.batch_size for r in results) == 4

    asyncio.run(scenario())
    assert sum(calls) == 10 and max(calls) == 4 and len(calls) == 3


def test_batcher_refuses_when_full_and_times_out_without_breaking() -> None:
    calls: list[int] = []

    async def scenario() -> None:
        config = BatcherConfig(max_batch_size=1, max_delay_ms=0, max_queue=2, timeout_s=0.15)
        batcher = MicroBatcher(slow_predict(0.1, calls), config)
        batcher.start()
        image = np.zeros((2, 2, 3), np.uint8)
        tasks = [asyncio.create_task(batcher.submit(image)) for _ in range(2)]
        await asyncio.sleep(0.01)  # the first is running, the second waits
        with pytest.raises(QueueFullError) as full:
            await batcher.submit_many([image, image])
        assert full.value.retry_after_s >= 1
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        assert any(isinstance(o, InferenceTimeoutError) for o in outcomes)
        # A fresh request after the timeouts is served normally.
        batcher.config = BatcherConfig(max_batch_size=1, max_queue=2, timeout_s=5)
        assert (await batcher.submit(image)).batch_size == 1
        await batcher.stop()

    asyncio.run(scenario())


def test_batcher_failure_reaches_only_its_batch() -> None:
    async def scenario() -> None:
        def predict(images: np.ndarray) -> ModelOutputs:
            if images[0, 0, 0, 0] == 255:
                raise RuntimeError("model exploded")
            return ModelOutputs(np.ones((len(images), 2), np.float32))

        batcher = MicroBatcher(predict, BatcherConfig(max_batch_size=1, max_delay_ms=0))
        batcher.start()
        with pytest.raises(RuntimeError, match="exploded"):
            await batcher.submit(np.full((2, 2, 3), 255, np.uint8))
        assert (await batcher.submit(np.zeros((2, 2, 3), np.uint8))).batch_size == 1
        await batcher.stop()

    asyncio.run(scenario())


# --- settings and logging -----------------------------------------------------------------


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GALMORPH_PROVIDERS", "CUDAExecutionProvider, CPUExecutionProvider")
    monkeypatch.setenv("GALMORPH_CORS_ORIGINS", "https://a.example,https://b.example")
    monkeypatch.setenv("GALMORPH_MAX_BATCH_SIZE", "8")
    monkeypatch.setenv("GALMORPH_API_KEY", "s3cret")
    (tmp_path / ".env").write_text("GALMORPH_MAX_QUEUE=99\nGALMORPH_MAX_BATCH_SIZE=2\n")
    settings = Settings(_env_file=tmp_path / ".env")  # type: ignore[call-arg]
    assert settings.providers == [CUDA_PROVIDER, CPU_PROVIDER]
    assert settings.cors_origins == ["https://a.example", "https://b.example"]
    assert settings.max_batch_size == 8  # the environment wins over .env
    assert settings.max_queue == 99
    assert settings.api_key is not None and "s3cret" not in repr(settings)
    for key in list(settings.to_environment()):
        monkeypatch.delenv(key, raising=False)
    for key, value in settings.to_environment().items():
        monkeypatch.setenv(key, value)
    assert settings_without_dotenv() == settings
    with pytest.raises(ValueError, match="max_batch_files"):
        settings_without_dotenv(max_batch_files=10, max_queue=5)


def test_settings_own_the_decode_limits_and_batching(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = settings_without_dotenv()
    assert defaults.decode_limits == DecodeLimits()
    assert defaults.batcher_config == BatcherConfig()
    monkeypatch.setenv("GALMORPH_MAX_SIDE", "99")
    monkeypatch.setenv("GALMORPH_MAX_DECOMPRESSED_BYTES", "20000")
    monkeypatch.setenv("GALMORPH_REQUEST_TIMEOUT_S", "7.5")
    settings = settings_without_dotenv(max_delay_ms=1.0)
    assert settings.decode_limits == DecodeLimits(max_side=99, max_decompressed_bytes=20_000)
    assert settings.batcher_config == BatcherConfig(max_delay_ms=1.0, timeout_s=7.5)


def test_the_server_decodes_and_batches_with_its_settings(model_path: Path) -> None:
    overrides = {"max_side": 99, "max_decompressed_bytes": 20_000, "request_timeout_s": 7.5}
    with running(settings_for(model_path, max_batch_size=4, **overrides)) as client:
        wide = client.post("/classify", content=make_png(size=(64, 100)))
        bomb = client.post("/classify", files={"file": ("b.fits.gz", gzip_bomb(expanded_mib=1))})
        batching = client.get("/model").json()["batching"]
    assert wide.status_code == 413 and "limit of 99" in wide.json()["detail"]
    assert bomb.status_code == 413 and "limit of 20000 bytes" in bomb.json()["detail"]
    assert batching == {
        "max_batch_size": 4,
        "max_delay_ms": 2.0,
        "max_queue": 256,
        "timeout_s": 7.5,
    }


def test_json_log_lines_are_json() -> None:
    record = logging.LogRecord("uvicorn.access", 20, "x", 1, '%s - "%s %s HTTP/%s" %d', None, None)
    record.args = ("127.0.0.1:5", "POST", "/classify", "1.1", 200)
    line = json.loads(JsonFormatter().format(record))
    assert line["status"] == 200 and line["path"] == "/classify" and line["level"] == "info"


# --- HTTP API --------------------------------------------------------------------------------


def assert_result(body: dict[str, Any], model_path: Path) -> None:
    assert list(body["probabilities"]) == list(GALAXY10_CLASS_NAMES)
    assert sum(body["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    best = max(body["probabilities"], key=body["probabilities"].get)
    assert body["top_class"] == best == body["top_k"][0]["name"]
    assert body["model"]["sha256"] == hashlib.sha256(model_path.read_bytes()).hexdigest()
    timings = body["timings"]
    assert timings["total_ms"] >= timings["decode_ms"] > 0 and timings["batch_size"] >= 1


def test_classify_real_galaxy10_and_hst_files(
    client: TestClient, model_path: Path, real_data: Path
) -> None:
    files = [
        *sorted((real_data / "galaxy10-real").glob("*.jpg"))[:2],
        *sorted((real_data / "galaxy10-real").glob("*.png"))[:2],
        real_data / "hst-fits" / "abell_2744_spiral_galaxy_f105w.fits.gz",
    ]
    for path in files:
        response = client.post("/classify", files={"file": (path.name, path.read_bytes())})
        assert response.status_code == 200, response.text
        body = response.json()
        assert_result(body, model_path)
        assert body["filename"] == path.name
        expected_format = {".jpg": "jpeg", ".png": "png", ".gz": "fits"}[path.suffix]
        assert body["preprocessing"]["format"] == expected_format
    hst = body["preprocessing"]
    assert hst["resampled_from_scale"] == pytest.approx(0.06, rel=0.01)
    assert any("single band" in warning for warning in hst["warnings"])


def test_response_equals_decode_plus_engine(client: TestClient, model_path: Path) -> None:
    """The service adds no pixel path of its own: same probabilities as the library calls."""
    data = make_grz_fits(size=64, bands="griz", gz=True)
    model = OnnxModel(model_path, providers=CPU, intra_op_threads=1)
    decoded = decode_cutout(data, spec=model.card.input_spec, filename="c.fits.gz")
    expected = model.predict(decoded.image[None])[0]
    params = {"return_image": "true", "top_k": "10", "filename": "c.fits.gz"}
    response = client.post("/classify", content=data, params=params)
    body = response.json()
    assert response.status_code == 200, body
    got = np.array([body["probabilities"][name] for name in GALAXY10_CLASS_NAMES])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert body["preprocessing"]["bands_used"] == ["g", "r", "z"]
    assert body["preprocessing"]["stretch"] == "dr2_rgb" and body["preprocessing"]["flipped"]
    assert len(body["top_k"]) == 10
    shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["image_png_base64"]))))
    np.testing.assert_array_equal(shown, decoded.image)


def test_stretch_and_top_k_parameters(client: TestClient) -> None:
    data = make_grz_fits(size=64)
    lupton = client.post("/classify?stretch=lupton&top_k=2", content=data)
    assert lupton.status_code == 200, lupton.text
    assert lupton.json()["preprocessing"]["stretch"] == "lupton"
    assert len(lupton.json()["top_k"]) == 2
    unknown = client.post("/classify?stretch=sepia", content=data)
    assert unknown.status_code == 422 and "sepia" in unknown.json()["detail"]
    bad_k = client.post("/classify?top_k=0", content=data)
    assert bad_k.status_code == 422
    assert bad_k.json()["detail"] == (
        'query top_k: Input should be greater than or equal to 1, got "0"'
    )


@pytest.mark.parametrize("case", bad_inputs(), ids=lambda case: case.name)
def test_bad_input_statuses(client: TestClient, case: Any) -> None:
    response = client.post("/classify", files={"file": (case.filename, case.data)})
    assert response.status_code == case.status, response.text
    if case.status != 200:
        detail = response.json()["detail"]
        assert isinstance(detail, str) and len(detail) > 10
    # The next request is unaffected.
    assert client.post("/classify", content=make_png()).status_code == 200


def test_size_limit_is_enforced_while_streaming(model_path: Path) -> None:
    limit = 4096
    with running(settings_for(model_path, max_body_bytes=limit)) as client:
        big = make_png(size=(128, 128))
        assert len(big) > limit
        declared = client.post("/classify", content=big)
        assert declared.status_code == 413 and str(limit) in declared.json()["detail"]

        def chunks() -> Iterator[bytes]:  # no Content-Length: only counting can stop it
            yield b"SIMPLE  ="  # a FITS start: past the format check, on to the size limit
            for _ in range(1000):
                yield b"\0" * 1024

        streamed = client.post("/classify", content=chunks())
        assert streamed.status_code == 413
        multipart = client.post("/classify", files={"file": ("big.png", big)})
        assert multipart.status_code == 413
        assert client.post("/classify", content=make_png(size=(16, 16))).status_code == 200


def test_batch_endpoint_isolates_bad_items(client: TestClient, real_data: Path) -> None:
    good = sorted((real_data / "galaxy10-real").glob("*.png"))[:3]
    files = [("files", (p.name, p.read_bytes())) for p in good]
    files.insert(1, ("files", ("catalog.fits", b"ra,dec\n1,2\n")))
    files.append(("files", ("cut.png", make_png()[:200])))
    response = client.post("/classify/batch?top_k=1", files=files)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["succeeded"], body["failed"]) == (3, 2)
    statuses = [item["error"]["status"] if item["error"] else 200 for item in body["items"]]
    assert statuses == [200, 415, 200, 200, 422]
    names = [p.name for p in good]
    expected = [names[0], "catalog.fits", *names[1:], "cut.png"]
    assert [item["filename"] for item in body["items"]] == expected
    assert all(len(item["result"]["top_k"]) == 1 for item in body["items"] if item["result"])
    not_multipart = client.post("/classify/batch", content=make_png())
    assert not_multipart.status_code == 415
    only_text = client.post("/classify/batch", files={"note": (None, "x")})
    assert only_text.status_code == 422
    assert only_text.json()["detail"].startswith("multipart part 'note' is not expected")


def test_model_metadata_and_kserve_aliases(client: TestClient, model_path: Path) -> None:
    info = client.get("/model").json()
    assert info["class_names"] == list(GALAXY10_CLASS_NAMES)
    assert info["input"] == {"name": "images", "datatype": "UINT8", "shape": [-1, 64, 64, 3]}
    assert info["providers"] == CPU and info["onnxruntime_version"]
    assert info["sha256"] == hashlib.sha256(model_path.read_bytes()).hexdigest()
    assert info["card"]["model_name"] == info["name"] == "test_factory_model"
    assert "dr2_rgb" in info["preprocessing"]["stretches"]
    pixel_scale = info["preprocessing"]["pixel_scale"]
    assert info["preprocessing"]["field_of_view_arcsec"] == [64 * pixel_scale] * 2
    assert info["preprocessing"]["interpolation"] == info["card"]["interpolation"] == "bicubic"
    kserve = client.get("/v2/models/test_factory_model").json()
    assert kserve["platform"] == "onnx_onnxv1" and kserve["versions"] == [info["version"]]
    assert client.get("/v2/models/another").status_code == 404
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json()["ready"] is True


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_count_requests_batches_and_provider(client: TestClient) -> None:
    client.post("/classify", content=make_png())
    client.post("/classify", content=b"GIF89a" + b"\0" * 32)
    samples = metric_samples(client.get("/metrics").text)
    requests_ok = samples[
        (
            "galmorph_http_requests_total",
            (("method", "POST"), ("route", "/classify"), ("status", "200")),
        )
    ]
    assert requests_ok >= 1
    assert (
        "galmorph_http_requests_total",
        (("method", "POST"), ("route", "/classify"), ("status", "415")),
    ) in samples
    assert samples[("galmorph_batch_size_count", ())] >= 1
    assert samples[("galmorph_queue_wait_seconds_count", ())] >= 1
    assert samples[("galmorph_ready", ())] == 1
    info = [key for key in samples if key[0] == "galmorph_model_info"]
    assert dict(info[0][1])["provider"] == CPU_PROVIDER
    assert ("galmorph_http_requests_in_flight", ()) in samples


def test_openapi_documents_responses(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    classify = schema["paths"]["/classify"]["post"]
    assert {"200", "413", "415", "422", "503"} <= set(classify["responses"])
    assert "multipart/form-data" in classify["requestBody"]["content"]
    result = schema["components"]["schemas"]["ClassificationResult"]["properties"]
    assert {"top_class", "probabilities", "top_k", "model", "preprocessing", "timings"} <= set(
        result
    )


def test_not_ready_while_waiting_for_the_model(tmp_path: Path) -> None:
    path = tmp_path / "late.onnx"
    settings = settings_for(path, wait_for_model=True, model_wait_interval_s=0.1)
    with running(settings, ready=False) as client:
        assert client.get("/healthz").status_code == 200
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["reason"].startswith(f"waiting for model at {path}: there is no file")
        refused = client.post("/classify", content=make_png())
        assert refused.status_code == 503 and refused.headers["Retry-After"]
        write_model(path)
        wait_for(client, ready=True)
        assert client.post("/classify", content=make_png()).status_code == 200


def test_require_gpu_keeps_a_cpu_only_server_unready(model_path: Path) -> None:
    with running(settings_for(model_path, require_gpu=True), ready=False) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert "require_gpu" in ready.json()["reason"] and ready.json()["providers"] == CPU
        assert client.post("/classify", content=make_png()).status_code == 503


def test_broken_model_is_reported_not_crashed(tmp_path: Path) -> None:
    (tmp_path / "broken.onnx").write_bytes(b"\0" * 100)
    with running(settings_for(tmp_path / "broken.onnx"), ready=False) as client:
        assert "model failed to load" in client.get("/readyz").json()["reason"]
        assert client.get("/healthz").status_code == 200


def test_api_key_and_cors(model_path: Path) -> None:
    settings = settings_for(model_path, api_key="k3y", cors_origins=["https://viewer.example"])
    with running(settings) as client:
        assert client.post("/classify", content=make_png()).status_code == 401
        wrong = client.post("/classify", content=make_png(), headers={"X-API-Key": "nope"})
        assert wrong.status_code == 401 and "X-API-Key" in wrong.json()["detail"]
        assert client.get("/model").status_code == 401
        right = client.post("/classify", content=make_png(), headers={"X-API-Key": "k3y"})
        assert right.status_code == 200
        for open_path in ("/healthz", "/readyz", "/v2/health/ready", "/metrics", "/"):
            assert client.get(open_path).status_code == 200, open_path
        preflight = client.options(
            "/classify",
            headers={
                "Origin": "https://viewer.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "X-API-Key",
            },
        )
        assert preflight.headers["access-control-allow-origin"] == "https://viewer.example"


def test_serving_path_never_imports_torch(model_path: Path) -> None:
    script = f"""
import sys
from fastapi.testclient import TestClient
from galmorph.service.app import create_app
from galmorph.service.settings import Settings
from tests.support.cutout_factory import make_png
settings = Settings(_env_file=None, model_path={str(model_path)!r},
                    providers=["CPUExecutionProvider"], intra_op_threads=1)
with TestClient(create_app(settings)) as client:
    import time
    while client.get("/readyz").status_code != 200:
        time.sleep(0.05)
    assert client.post("/classify", content=make_png()).status_code == 200
print("torch" in sys.modules)
"""
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "False"


def test_serve_cli_refuses_a_missing_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from galmorph.cli import main

    assert main(["serve", "--model", str(tmp_path / "none.onnx")]) == 2
    assert "--wait-for-model" in capsys.readouterr().err
