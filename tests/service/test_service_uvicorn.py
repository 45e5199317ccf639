"""The service as users run it: `galmorph serve` (uvicorn) on a real 127.0.0.1 socket."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from galmorph.cli import main as galmorph_main
from galmorph.core.data.galaxy10 import GALAXY10_CLASS_NAMES
from tests.support.cutout_factory import bad_inputs, make_grz_fits, make_png, make_single_band_fits
from tests.support.onnx_factory import FactoryModel, write_model
from tests.support.server_process import RunningServer, serve

pytestmark = pytest.mark.slow
BODY_LIMIT = 4 * 1024 * 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    work = tmp_path_factory.mktemp("uvicorn")
    model = write_model(work / "model.onnx")
    with serve(
        model,
        work,
        *("--max-batch-size", "8", "--max-delay-ms", "40"),
        env={"GALMORPH_MAX_BODY_BYTES": str(BODY_LIMIT)},
    ) as running:
        yield running


def synthetic_cutouts() -> dict[str, bytes]:
    return {
        "grz.fits": make_grz_fits(size=64),
        "grz.fits.gz": make_grz_fits(size=64, gz=True, seed=1),
        "griz.fits.fz": make_grz_fits(size=64, bands="griz", fpack=True, seed=2),
        "fine_scale.fits": make_grz_fits(size=128, pixel_scale=0.131, seed=3),
        "single_int16.fits": make_single_band_fits(size=48, bitpix=16),
    }


def test_real_and_synthetic_cutouts_over_http(server: RunningServer, real_data: Path) -> None:
    real = sorted((real_data / "galaxy10-real").iterdir()) + sorted(
        (real_data / "hst-fits").glob("*.fits.gz")
    )
    uploads = {path.name: path.read_bytes() for path in real} | synthetic_cutouts()
    assert len(uploads) >= 30
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for name, data in uploads.items():
            response = client.post("/classify", files={"file": (name, data)})
            assert response.status_code == 200, (name, response.text)
            body = response.json()
            assert list(body["probabilities"]) == list(GALAXY10_CLASS_NAMES), name
            assert body["filename"] == name
        fine = client.post("/classify", content=uploads["fine_scale.fits"]).json()
        assert fine["preprocessing"]["resampled_from_scale"] == pytest.approx(0.131, rel=0.01)


def test_bad_inputs_over_http_then_still_serving(server: RunningServer) -> None:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for case in bad_inputs():
            response = client.post("/classify", files={"file": (case.filename, case.data)})
            assert response.status_code == case.status, (case.name, response.text)
            assert isinstance(response.json().get("detail", ""), str)
        assert client.get("/healthz").status_code == 200
        assert client.post("/classify", content=make_png()).status_code == 200
    assert "Traceback" not in server.log()


def send_until_refused(port: int, head: bytes, chunk: bytes, max_chunks: int) -> tuple[int, bytes]:
    """Send the head, then body chunks until the server hangs up; return (chunks sent, answer)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(head)
        sent = 0
        try:
            while sent < max_chunks:
                connection.sendall(chunk)
                sent += 1
        except OSError:  # the server answered and closed the connection
            pass
        return sent, connection.recv(4096)


def test_size_limit_stops_reading_the_body(server: RunningServer) -> None:
    # Declared too large: refused before any body byte is needed.
    declared = (
        b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Length: 10000000000\r\n\r\n"
    )
    _, answer = send_until_refused(server.port, declared, b"\0" * 65536, 4)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    # Chunked with no length: the server must answer once the limit is crossed, long before
    # this client would stop sending (64 MiB of chunks).
    chunked = (
        b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
        b"9\r\nSIMPLE  =\r\n"  # a FITS start: past the format check, on to the size limit
    )
    chunk = b"10000\r\n" + b"\0" * 65536 + b"\r\n"
    sent, answer = send_until_refused(server.port, chunked, chunk, 1024)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert sent < 1024, "the server read the whole oversized body"
    assert b"exceeds the limit of 4194304 bytes" in answer
    assert httpx.get(f"{server.url}/healthz").status_code == 200


def metric_value(text: str, name: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and not sample.labels:
                return float(sample.value)
    raise AssertionError(f"{name} not in metrics")


def test_concurrent_requests_share_batches(server: RunningServer) -> None:
    before = httpx.get(f"{server.url}/metrics").text
    runs_before = metric_value(before, "galmorph_batch_size_count")
    images_before = metric_value(before, "galmorph_batch_size_sum")
    barrier = threading.Barrier(16)

    def classify(seed: int) -> dict[str, int]:
        data = make_png(seed=seed)
        barrier.wait()
        response = httpx.post(f"{server.url}/classify", content=data, timeout=30)
        assert response.status_code == 200, response.text
        timings: dict[str, int] = response.json()["timings"]
        return timings

    with ThreadPoolExecutor(16) as pool:
        timings = list(pool.map(classify, range(16)))
    after = httpx.get(f"{server.url}/metrics").text
    runs = metric_value(after, "galmorph_batch_size_count") - runs_before
    images = metric_value(after, "galmorph_batch_size_sum") - images_before
    assert images == 16
    assert runs < 16, "no two concurrent requests shared a model run"
    assert max(t["batch_size"] for t in timings) > 1


def test_full_queue_answers_503_with_retry_after(tmp_path: Path) -> None:
    # About 0.4 s per image on one thread (0.39 s measured here), so that twelve requests sent
    # at once (clients made beforehand) find the two-image queue full; a machine fast enough to
    # drain it between arrivals gets more rounds rather than a failed test.
    slow = write_model(
        tmp_path / "slow.onnx", FactoryModel(input_size=256, channels=64, extra_convs=64)
    )
    with serve(
        slow,
        tmp_path,
        *("--max-batch-size", "1", "--max-delay-ms", "0", "--max-queue", "2"),
        env={"GALMORPH_MAX_BATCH_FILES": "2"},
    ) as slow_server:
        uploads = [make_png(seed=seed) for seed in range(12)]

        def burst() -> list[httpx.Response]:
            clients = [httpx.Client(base_url=slow_server.url, timeout=120) for _ in uploads]
            barrier = threading.Barrier(len(uploads))

            def classify(index: int) -> httpx.Response:
                barrier.wait()
                return clients[index].post("/classify", content=uploads[index])

            try:
                with ThreadPoolExecutor(len(uploads)) as pool:
                    return list(pool.map(classify, range(len(uploads))))
            finally:
                for client in clients:
                    client.close()

        for _ in range(4):
            responses = burst()
            statuses = sorted(response.status_code for response in responses)
            assert set(statuses) <= {200, 503}, statuses
            if 503 in statuses:
                break
        assert 503 in statuses and 200 in statuses, statuses
        for response in responses:
            if response.status_code == 503:
                assert int(response.headers["Retry-After"]) >= 1
                assert "queue is full" in response.json()["detail"]
        # Overload passes: the next request is served.
        assert httpx.post(f"{slow_server.url}/classify", content=make_png()).status_code == 200


def test_classify_client_prints_a_table(
    server: RunningServer, real_data: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    good = sorted((real_data / "galaxy10-real").glob("*.jpg"))[:2]
    bad = tmp_path / "notes.fits"
    bad.write_text("not a cutout")
    code = galmorph_main(["classify", *map(str, good), str(bad), "--url", server.url])
    lines = capsys.readouterr().out.splitlines()
    assert code == 1  # one file failed
    assert lines[0].split()[:3] == ["FILE", "CLASS", "P"]
    assert sum(any(name in line for name in GALAXY10_CLASS_NAMES) for line in lines[1:3]) == 2
    assert "ERROR" in lines[3] and "415" in lines[3]
