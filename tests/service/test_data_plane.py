"""The data plane every classifying route calls (galmorph.service.data_plane): the same
admission and the same cutout counts whichever route or protocol a cutout comes by."""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from galmorph.service import data_plane, decoding
from galmorph.service.batching import MicroBatcher
from tests.support.app_client import running, settings_for
from tests.support.cutout_factory import make_png
from tests.support.onnx_factory import FactoryModel, write_model

NAME = "test_factory_model"
INFER = f"/v2/models/{NAME}/infer"


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("plane") / "model.onnx", FactoryModel())


def files_request(*files: bytes) -> dict[str, Any]:
    data = [base64.b64encode(file).decode() for file in files]
    return {"inputs": [{"name": "files", "shape": [len(files)], "datatype": "BYTES", "data": data}]}


def images_request() -> dict[str, Any]:
    image = [[[7, 7, 7]] * 4] * 4
    return {"inputs": [{"name": "images", "shape": [1, 4, 4, 3], "datatype": "UINT8",
                        "data": [image]}]}  # fmt: skip


def test_every_classifying_route_refuses_before_decoding_when_the_queue_is_full(
    model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("decoded although the queue was full")

    with running(settings_for(model, max_queue=4, max_batch_files=4)) as client:
        monkeypatch.setattr(decoding, "decode_cutout", never)
        monkeypatch.setattr(data_plane, "fit_array", never)
        monkeypatch.setattr(MicroBatcher, "queue_length", property(lambda self: 4))
        answers = {
            "/classify": client.post("/classify", content=make_png()),
            "/classify/batch": client.post("/classify/batch", files=[("files", make_png())]),
            "/v2 files": client.post(INFER, json=files_request(make_png())),
            "/v2 images": client.post(INFER, json=images_request()),
        }
    for route, answer in answers.items():
        assert answer.status_code == 503, (route, answer.text)
        assert int(answer.headers["Retry-After"]) >= 1, route
        body = answer.json()
        assert "queue is full" in (body["error"] if "/v2" in route else body["detail"]), route


def cutout_counts(client: httpx.Client) -> dict[str, float]:
    metrics = client.get("/metrics").text
    found = re.findall(r'^galmorph_cutouts_total\{outcome="([^"]+)"\} (\S+)$', metrics, re.M)
    return {outcome: float(value) for outcome, value in found}


def test_every_route_counts_its_cutouts_alike(model: Path) -> None:
    good, bad = make_png(), b"\x89PNG\r\n\x1a\n" + b"\0" * 64  # a PNG signature, then nothing
    with running(settings_for(model)) as client:
        assert client.post("/classify", content=good).status_code == 200
        refused = client.post("/classify", content=bad)
        files = [("files", ("a.png", good)), ("files", ("b.png", bad))]
        assert client.post("/classify/batch", files=files).json()["failed"] == 1
        assert client.post(INFER, json=files_request(good)).status_code == 200
        assert client.post(INFER, json=files_request(bad)).status_code == refused.status_code
        counts = cutout_counts(client)
    assert counts == {"ok": 3.0, str(refused.status_code): 3.0}, counts
