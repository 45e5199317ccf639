"""Open Inference Protocol v2: conformance with Triton's own client library, and the answers
equal to /classify's for the same input.

`tritonclient[http]` is the client KServe and Triton users have; it speaks the protocol's
JSON and, by default, Triton's binary tensor data extension. A real `galmorph serve` answers.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from fastapi.testclient import TestClient
from PIL import Image
from tritonclient.utils import InferenceServerException

from galmorph.service.app import create_app
from tests.support.app_client import running, settings_for
from tests.support.cutout_factory import make_grz_fits, make_png
from tests.support.onnx_factory import FactoryModel, write_model
from tests.support.server_process import RunningServer, serve

NAME = "test_factory_model"
# The factory's score is the mean squared pooled feature; this threshold splits its answers.
OOD_THRESHOLD = 0.4


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("oip")
    return write_model(folder / "model.onnx", FactoryModel(ood_threshold=OOD_THRESHOLD))


@pytest.fixture(scope="module")
def server(model_path: Path) -> Iterator[RunningServer]:
    with serve(model_path, model_path.parent) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: RunningServer) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(server.url.removeprefix("http://"))


@pytest.fixture(scope="module")
def cutouts(real_data: Path) -> list[tuple[str, bytes]]:
    """A FITS flux cube, a real HST star, a real Galaxy10 PNG and JPEG."""
    return [
        ("cutout.fits", make_grz_fits(size=80)),
        ("f105w_psf.fits.gz", (real_data / "hst-fits" / "f105w_psf.fits.gz").read_bytes()),
        ("class5.png", (real_data / "galaxy10-real" / "class5_Barred_Spiral.png").read_bytes()),
        ("sample_1.jpg", (real_data / "galaxy10-real" / "sample_1_Disturbed.jpg").read_bytes()),
    ]


def classify(server: RunningServer, name: str, data: bytes) -> dict[str, Any]:
    answer = httpx.post(
        f"{server.url}/classify?embeddings=true", files={"file": (name, data)}, timeout=30
    )
    assert answer.status_code == 200, answer.text
    result: dict[str, Any] = answer.json()
    return result


def files_input(cutouts: list[tuple[str, bytes]], binary: bool = True) -> triton.InferInput:
    tensor = triton.InferInput("files", [len(cutouts)], "BYTES")
    tensor.set_data_from_numpy(np.array([data for _, data in cutouts], dtype=object), binary)
    return tensor


def test_health_and_metadata_as_the_protocol_says(
    client: triton.InferenceServerClient, server: RunningServer
) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(NAME) and not client.is_model_ready("another")
    meta = client.get_server_metadata()
    assert meta["name"] == "galmorph" and "binary_tensor_data" in meta["extensions"]
    model = client.get_model_metadata(NAME)
    version = model["versions"][0]
    assert model["name"] == NAME and model["platform"] == "onnx_onnxv1"
    assert model["inputs"] == [
        {"name": "images", "datatype": "UINT8", "shape": [-1, 64, 64, 3]},
        {"name": "files", "datatype": "BYTES", "shape": [-1]},
    ]
    assert model["outputs"] == [
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
        {"name": "embeddings", "datatype": "FP32", "shape": [-1, 8]},
        {"name": "ood_score", "datatype": "FP32", "shape": [-1]},
        {"name": "in_distribution", "datatype": "BOOL", "shape": [-1]},
    ]
    assert client.get_model_metadata(NAME, model_version=version)["versions"] == [version]
    assert client.is_model_ready(NAME, model_version=version)
    assert httpx.get(f"{server.url}/v2/health/live").json() == {"live": True}
    assert httpx.get(f"{server.url}/v2/health/ready").json()["ready"] is True
    assert httpx.get(f"{server.url}/v2/models/{NAME}/ready").json() == {
        "name": NAME,
        "ready": True,
    }


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_files_are_answered_as_classify_answers_them(
    client: triton.InferenceServerClient,
    server: RunningServer,
    cutouts: list[tuple[str, bytes]],
    binary: bool,
) -> None:
    outputs = [
        triton.InferRequestedOutput(name, binary_data=binary)
        for name in ("probabilities", "embeddings", "ood_score", "in_distribution")
    ]
    if not binary:
        # tritonclient sends BYTES as UTF-8 text in JSON; files travel base64-encoded instead.
        tensor = triton.InferInput("files", [len(cutouts)], "BYTES")
        encoded = [base64.b64encode(data).decode() for _, data in cutouts]
        tensor.set_data_from_numpy(np.array(encoded, dtype=object), binary_data=False)
    else:
        tensor = files_input(cutouts)
    answer = client.infer(NAME, [tensor], outputs=outputs, request_id="r-1")
    assert answer.get_response()["id"] == "r-1"
    probabilities = answer.as_numpy("probabilities")
    embeddings = answer.as_numpy("embeddings")
    scores = answer.as_numpy("ood_score")
    flags = answer.as_numpy("in_distribution")
    assert probabilities.shape == (4, 10) and probabilities.dtype == np.float32
    assert embeddings.shape == (4, 8) and flags.dtype == np.bool_
    for i, (name, data) in enumerate(cutouts):
        expected = classify(server, name, data)
        np.testing.assert_allclose(
            probabilities[i], list(expected["probabilities"].values()), rtol=1e-6, atol=1e-7
        )
        np.testing.assert_allclose(embeddings[i], expected["embeddings"], rtol=1e-6, atol=1e-7)
        assert scores[i] == pytest.approx(expected["ood_score"], rel=1e-6)
        assert bool(flags[i]) is expected["in_distribution"] is bool(scores[i] <= OOD_THRESHOLD)
    assert set(flags.tolist()) == {True, False}, scores  # the threshold separates these inputs


def test_uint8_images_are_answered_as_a_png_of_them(
    client: triton.InferenceServerClient, server: RunningServer
) -> None:
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    tensor = triton.InferInput("images", list(images.shape), "UINT8")
    tensor.set_data_from_numpy(images)
    answer = client.infer(NAME, [tensor])  # no outputs named: all of them, binary
    names = [output["name"] for output in answer.get_response()["outputs"]]
    assert names == ["probabilities", "embeddings", "ood_score", "in_distribution"]
    for image, probabilities in zip(images, answer.as_numpy("probabilities"), strict=True):
        expected = classify(server, "image.png", make_png_of(image))
        np.testing.assert_allclose(probabilities, list(expected["probabilities"].values()), 1e-6)
    # The same request as plain protocol JSON, nested data, answered in JSON.
    body = {
        "inputs": [
            {
                "name": "images",
                "shape": [1, 64, 64, 3],
                "datatype": "UINT8",
                "data": images[:1].tolist(),
            }
        ],
        "outputs": [{"name": "probabilities"}],
    }
    document = httpx.post(f"{server.url}/v2/models/{NAME}/infer", json=body).json()
    (output,) = document["outputs"]
    assert output["name"] == "probabilities" and output["shape"] == [1, 10]
    np.testing.assert_allclose(output["data"], answer.as_numpy("probabilities")[0], rtol=1e-6)
    assert document["model_name"] == NAME and len(document["model_version"]) == 12


def make_png_of(image: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def test_refusals_reach_the_client_as_protocol_errors(
    client: triton.InferenceServerClient, cutouts: list[tuple[str, bytes]]
) -> None:
    with pytest.raises(InferenceServerException, match="no model named 'another'") as unknown:
        client.infer("another", [files_input(cutouts[:1])])
    assert unknown.value.status() == "404"
    bad = [cutouts[0], ("notes.txt", b"just some text")]
    with pytest.raises(InferenceServerException, match=r"files\[1\]: unsupported format") as fmt:
        client.infer(NAME, [files_input(bad)])
    assert fmt.value.status() == "415"
    truncated = [("cut.fits", cutouts[0][1][:4000])]
    with pytest.raises(InferenceServerException, match=r"files\[0\]") as corrupt:
        client.infer(NAME, [files_input(truncated)])
    assert corrupt.value.status() == "422"
    wrong = triton.InferInput("images", [1, 64, 64, 3], "FP32")
    wrong.set_data_from_numpy(np.zeros((1, 64, 64, 3), np.float32))
    with pytest.raises(InferenceServerException, match="must be UINT8, not FP32"):
        client.infer(NAME, [wrong])
    with pytest.raises(InferenceServerException, match="unknown output 'logits'"):
        client.infer(
            NAME, [files_input(cutouts[:1])], outputs=[triton.InferRequestedOutput("logits")]
        )


def test_a_model_from_before_embeddings_answers_what_it_has(tmp_path: Path) -> None:
    old = write_model(tmp_path / "old.onnx", FactoryModel(embeddings=False))
    with running(settings_for(old)) as client:
        meta = client.get(f"/v2/models/{NAME}").json()
        assert [o["name"] for o in meta["outputs"]] == ["probabilities"]
        png = base64.b64encode(make_png()).decode()
        request = {"inputs": [{"name": "files", "shape": [1], "datatype": "BYTES", "data": [png]}]}
        answer = client.post(f"/v2/models/{NAME}/infer", json=request)
        assert [o["name"] for o in answer.json()["outputs"]] == ["probabilities"]
        request["outputs"] = [{"name": "embeddings"}]
        refused = client.post(f"/v2/models/{NAME}/infer", json=request)
        assert refused.status_code == 400
        assert "has no 'embeddings' output" in refused.json()["error"]
        classify = client.post("/classify?embeddings=true", content=make_png())
        assert classify.status_code == 422 and "no embeddings output" in classify.json()["detail"]
        plain = client.post("/classify", content=make_png()).json()
        assert plain["ood_score"] is None and plain["in_distribution"] is None


@pytest.mark.parametrize(
    ("request_body", "status", "message"),
    [
        ({"inputs": []}, 400, "send exactly one input"),
        (
            {
                "inputs": [
                    {
                        "name": "images",
                        "shape": [1, 2, 2, 3],
                        "datatype": "UINT8",
                        "data": [1, 2, 3],
                    }
                ]
            },
            400,
            "needs 12 values, got 3",
        ),
        (
            {
                "inputs": [
                    {
                        "name": "images",
                        "shape": [1, 1, 1, 3],
                        "datatype": "UINT8",
                        "data": [1, 2, 300],
                    }
                ]
            },
            400,
            "integers 0..255",
        ),
        (
            {
                "inputs": [
                    {"name": "files", "shape": [1], "datatype": "BYTES", "data": ["not base64!"]}
                ]
            },
            400,
            "not base64",
        ),
        (
            {"inputs": [{"name": "files", "shape": [2], "datatype": "BYTES", "data": ["AAAA"]}]},
            400,
            "2] but 1 files",
        ),
        ({"inputs": "x"}, 400, "not an inference request"),
        (
            {
                "parameters": {"fit": "squash"},
                "inputs": [
                    {
                        "name": "images",
                        "shape": [1, 1, 1, 3],
                        "datatype": "UINT8",
                        "data": [1, 2, 3],
                    }
                ],
            },
            422,
            "unknown fit 'squash'",
        ),
    ],
)
def test_malformed_requests_are_named(
    model_path: Path, request_body: dict[str, Any], status: int, message: str
) -> None:
    with running(settings_for(model_path)) as client:
        answer = client.post(f"/v2/models/{NAME}/infer", json=request_body)
    assert answer.status_code == status
    assert message in answer.json()["error"]


def test_versions_and_not_ready_follow_the_protocol(model_path: Path, tmp_path: Path) -> None:
    with running(settings_for(model_path)) as client:
        version = client.get(f"/v2/models/{NAME}").json()["versions"][0]
        assert client.get(f"/v2/models/{NAME}/versions/{version}").status_code == 200
        other = client.get(f"/v2/models/{NAME}/versions/000000000000")
        assert other.status_code == 404 and "has no version" in other.json()["error"]
    with TestClient(
        create_app(settings_for(tmp_path / "missing.onnx", wait_for_model=False))
    ) as client:
        not_ready = client.get(f"/v2/models/{NAME}")
        assert not_ready.status_code == 503 and "not ready" in not_ready.json()["error"]
        assert not_ready.headers["Retry-After"]
        probe = client.get(f"/v2/models/{NAME}/ready")
        assert probe.status_code == 503 and probe.json() == {"name": NAME, "ready": False}


def test_large_tensors_must_travel_as_binary(
    model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from galmorph.service.oip import codec

    monkeypatch.setattr(codec, "MAX_JSON_BYTES", 300)
    images = [[[[7, 7, 7]] * 8] * 8]
    body = {"inputs": [{"name": "images", "shape": [1, 8, 8, 3], "datatype": "UINT8",
                        "data": images}]}  # fmt: skip
    with running(settings_for(model_path)) as client:
        refused = client.post(f"/v2/models/{NAME}/infer", json=body)
        assert refused.status_code == 413 and "binary tensor data" in refused.json()["error"]
        # The same tensor as binary data after a short JSON header is accepted.
        header = json.dumps(
            {"inputs": [{"name": "images", "shape": [1, 8, 8, 3], "datatype": "UINT8",
                         "parameters": {"binary_data_size": 192}}]}
        ).encode()  # fmt: skip
        answer = client.post(
            f"/v2/models/{NAME}/infer",
            content=header + bytes([7]) * 192,
            headers={"Inference-Header-Content-Length": str(len(header))},
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["outputs"][0]["shape"] == [1, 10]
