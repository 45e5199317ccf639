"""GET/POST /similar on a real `galmorph serve --index`: neighbours by id and by upload (the
upload embedded as /classify embeds it), behind the API key; every bad input a 4xx with a
one-line detail; an index of another model refused at startup; off without --index."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from galmorph.similarity.index import build_index
from tests.support.app_client import running, settings_for
from tests.support.onnx_factory import FactoryModel, write_model
from tests.support.server_process import RunningServer, free_port, serve
from tests.support.similarity_data import galaxy_pngs, score_pngs

API_KEY = "similar-route-key"
KEY = {"X-API-Key": API_KEY}
THREADS = {"GALMORPH_DECODE_THREADS": "1", "GALMORPH_MAX_BATCH_SIZE": "1"}


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("similar_route")


@pytest.fixture(scope="module")
def model(work: Path) -> Path:
    return write_model(work / "model.onnx", FactoryModel(input_size=32, ood_threshold=0.5))


@pytest.fixture(scope="module")
def pngs(work: Path) -> list[Path]:
    return galaxy_pngs(work / "png", 40)


@pytest.fixture(scope="module")
def index(work: Path, model: Path, pngs: list[Path]) -> Path:
    build_index([score_pngs(model, pngs, work / "scores")], work / "index", threads=1)
    return work / "index"


@pytest.fixture(scope="module")
def server(work: Path, model: Path, index: Path) -> Iterator[RunningServer]:
    env = {**THREADS, "GALMORPH_API_KEY": API_KEY}
    with serve(model, work, "--index", str(index), env=env) as running:
        yield running


def test_get_by_id_lists_the_neighbours(server: RunningServer) -> None:
    answer = httpx.get(f"{server.url}/similar", params={"id": "g005", "k": 5}, headers=KEY)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["query"]["id"] == "g005" and body["k"] == 5
    assert body["index"]["count"] == 40 and body["index"]["metric"] == "cosine"
    neighbours = body["neighbours"]
    assert [n["rank"] for n in neighbours] == [1, 2, 3, 4, 5]
    assert "g005" not in {n["id_str"] for n in neighbours}
    distances = [n["distance"] for n in neighbours]
    assert distances == sorted(distances) and distances[0] >= 0


def test_post_embeds_the_upload_as_classify_does(server: RunningServer, pngs: list[Path]) -> None:
    data = pngs[12].read_bytes()
    answer = httpx.post(
        f"{server.url}/similar",
        params={"k": 3, "filename": "g.png"},
        content=data,
        headers=KEY,
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    # The indexed copy of the same cutout is its nearest neighbour, at distance ~0: the route
    # decodes and embeds exactly as the scorer that built the index did.
    assert body["neighbours"][0]["id_str"] == "g012"
    assert body["neighbours"][0]["distance"] < 1e-3
    classified = httpx.post(f"{server.url}/classify", content=data, headers=KEY).json()
    assert body["query"]["pred_label"] == classified["top_class"]
    assert body["query"]["filename"] == "g.png" and body["query"]["id"] is None


def test_filters(server: RunningServer) -> None:
    answer = httpx.get(
        f"{server.url}/similar", params={"id": "g001", "k": 40, "in_dist": "true"}, headers=KEY
    )
    assert answer.status_code == 200
    assert all(n["in_distribution"] for n in answer.json()["neighbours"])


@pytest.mark.parametrize(
    ("method", "params", "body", "status", "words"),
    [
        ("GET", {"id": "nope"}, None, 404, "'nope' is not in the index"),
        ("GET", {}, None, 422, "id"),
        ("GET", {"id": "g001", "k": 0}, None, 422, "k"),
        ("GET", {"id": "g001", "k": 101}, None, 422, "k"),
        ("GET", {"id": "g001", "k": "ten"}, None, 422, "k"),
        ("GET", {"id": "g001", "class": "Spiral"}, None, 422, "is not in the index"),
        ("POST", {}, b"", 422, "empty upload"),
        ("POST", {}, b"not an image at all", 415, ""),
        ("POST", {"stretch": "nope"}, b"x", 422, "stretch"),
    ],
)
def test_bad_inputs_are_4xx_with_a_detail(
    server: RunningServer,
    method: str,
    params: dict[str, object],
    body: bytes | None,
    status: int,
    words: str,
) -> None:
    answer = httpx.request(
        method, f"{server.url}/similar", params=params, content=body, headers=KEY
    )
    assert answer.status_code == status, answer.text
    assert words in answer.text and "Traceback" not in answer.text


def test_the_api_key_is_required(server: RunningServer) -> None:
    assert httpx.get(f"{server.url}/similar", params={"id": "g001"}).status_code == 401
    assert httpx.post(f"{server.url}/similar", content=b"x").status_code == 401


def test_off_without_an_index(work: Path, model: Path) -> None:
    with serve(model, work, env=THREADS) as plain:
        answer = httpx.get(f"{plain.url}/similar", params={"id": "g001"})
        assert answer.status_code == 404 and "--index" in answer.json()["detail"]


def test_an_index_of_another_model_stops_serve(work: Path, index: Path) -> None:
    other = write_model(work / "other.onnx", FactoryModel(input_size=32, seed=3))
    command = [sys.executable, "-m", "galmorph.cli", "serve", "--model", str(other),
               "--index", str(index), "--port", str(free_port())]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert "is not the index's model" in done.stderr and "Traceback" not in done.stderr
    missing = subprocess.run(
        [*command[:-4], "--index", str(work / "none"), "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert missing.returncode == 2 and "is not a similarity index" in missing.stderr


def test_a_model_swapped_in_after_startup_is_refused_per_request(
    work: Path, index: Path, pngs: list[Path]
) -> None:
    """--wait-for-model starts before the model exists, so the startup check cannot run: the
    route compares the served model with the index's on every upload."""
    other = write_model(work / "swapped.onnx", FactoryModel(input_size=32, seed=4))
    with running(settings_for(other, similarity_index=index)) as client:
        answer = client.post("/similar", content=pngs[0].read_bytes())
        assert answer.status_code == 409
        assert "not comparable" in answer.json()["detail"]
        assert client.get("/similar", params={"id": "g001"}).status_code == 200
