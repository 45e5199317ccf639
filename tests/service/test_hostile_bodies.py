"""Hostile request bodies against a real `galmorph serve`: one memory budget for bodies and
decodes, and /v2 infer inside every bound /classify has.

On ceac0bd, bodies were read whole before any budget applied (12 concurrent /v2 tensors of
[1, 9000, 9000, 3]: +6.1 GB and six 500s; 8 x 250 MB junk /v2 bodies: 413 only after the full
read; 16 x 60 MB raw bodies: +1.3 GB), and two small /v2 inputs gave 500 (a zero dimension,
an Inference-Header-Content-Length holding '²'). Each case here sends only what the server
needs to see to refuse: an answer that arrives while the rest of the body was never sent is
one given before reading it (the server would otherwise wait for it and answer 408).
"""

from __future__ import annotations

import gzip
import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from galmorph.core.cutouts.decode import sniff_format
from galmorph.core.cutouts.formats import FITS_MAGIC, FORMATS
from galmorph.core.cutouts.limits import MIB, CutoutError
from galmorph.service.decoding import BodyBusyError, DecodeBusyError, MemoryBudget
from galmorph.service.uploads import PayloadTooLargeError
from tests.support import process_cost
from tests.support.cutout_factory import make_grz_fits, make_png
from tests.support.onnx_factory import FactoryModel, write_model
from tests.support.raw_http import JUNK, Answer, exchange, junk, request_head
from tests.support.real_data import REAL_DATA
from tests.support.server_process import RunningServer, serve

BUDGET = 64 * MIB  # the smallest budget the settings allow
NAME = "test_factory_model"
INFER = f"/v2/models/{NAME}/infer"
HEADER_LENGTH = "Inference-Header-Content-Length"
SLACK_MIB = 48


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    folder = tmp_path_factory.mktemp("bodies")
    model = write_model(folder / "model.onnx", FactoryModel(64))
    environment = {
        "GALMORPH_DECODE_MEMORY_BUDGET_BYTES": str(BUDGET),
        # Over the budget, so that the budget (not the size limit) is what refuses.
        "GALMORPH_MAX_BODY_BYTES": str(128 * MIB),
        # A server that waits for a body it should have refused answers 408 soon.
        "GALMORPH_BODY_TIMEOUT_S": "5",
    }
    with serve(model, folder, "--log-level", "warning", env=environment) as running:
        yield running


def images_json(shape: list[int], binary: bool = True) -> bytes:
    tensor: dict[str, object] = {"name": "images", "shape": shape, "datatype": "UINT8"}
    if binary:
        tensor["parameters"] = {"binary_data_size": shape[0] * shape[1] * shape[2] * shape[3]}
    else:
        tensor["data"] = []
    return json.dumps({"inputs": [tensor]}).encode()


def binary_infer_head(document: bytes, body_length: int) -> bytes:
    return request_head(
        INFER, body_length, {HEADER_LENGTH: str(len(document)).encode()}, "application/json"
    )


def test_concurrent_oversized_v2_tensors_are_refused_before_their_bytes(
    server: RunningServer,
) -> None:
    # 9000 is over max_side: each request sends its JSON and is answered before the 243 MB
    # it announces.
    shape = [1, 9000, 9000, 3]
    document = images_json(shape)
    head = binary_infer_head(document, len(document) + 9000 * 9000 * 3)
    barrier = threading.Barrier(12)

    def send(_: int) -> Answer:
        barrier.wait()
        return exchange(server.port, head + document, early_s=10)

    with process_cost.measured(server.process.pid) as cost, ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(send, range(12)))
    assert [answer.status for answer in answers] == [413] * 12, [a.body for a in answers]
    assert not any(answer.body_sent for answer in answers)
    assert "side exceeds the limit of 8192" in answers[0].json()["error"]
    assert cost.rss_growth_mib < 16, cost


def test_images_that_with_their_fit_exceed_the_budget_are_413_unread(
    server: RunningServer,
) -> None:
    # 48 MB of pixels fit the 64 MiB budget; fitting them (Pillow's 4 bytes a pixel) does not.
    shape = [1, 4000, 4000, 3]
    document = images_json(shape)
    answer = exchange(
        server.port, binary_infer_head(document, len(document) + 48_000_000) + document
    )
    assert answer.status == 413 and not answer.body_sent
    assert "more to fit one image" in answer.json()["error"]
    assert answer.headers["connection"] == "close"


def test_a_body_longer_than_its_tensors_need_is_refused_unread(server: RunningServer) -> None:
    document = images_json([1, 8, 8, 3])
    answer = exchange(
        server.port, binary_infer_head(document, len(document) + 192 + 10**8) + document
    )
    assert answer.status == 413 and not answer.body_sent
    assert "binary_data_size 192 but 100000192 bytes follow" in answer.json()["error"]


@pytest.mark.parametrize("size", [250_000_000, 20 * MIB])
def test_a_junk_v2_body_over_the_json_limit_is_413_unread(server: RunningServer, size: int) -> None:
    answer = exchange(server.port, request_head(INFER, size, content_type="application/json"))
    assert answer.status == 413 and not answer.body_sent
    assert "binary tensor data" in answer.json()["error"]
    assert answer.headers["connection"] == "close"


def test_a_body_larger_than_the_whole_budget_is_413_unread(server: RunningServer) -> None:
    with process_cost.measured(server.process.pid) as cost:  # no buffer made for it either
        answer = exchange(server.port, request_head("/classify", 100 * MIB))  # < max_body_bytes
    assert cost.rss_growth_mib < 16, cost
    assert answer.status == 413 and not answer.body_sent
    assert "(the memory budget) exceeds the limit of 67108864 bytes" in answer.json()["detail"]


@pytest.mark.parametrize("multipart", [False, True], ids=["raw", "multipart"])
def test_a_full_budget_answers_503_at_once_and_frees_when_the_holder_goes(
    server: RunningServer, multipart: bool
) -> None:
    content_type = "multipart/form-data; boundary=x" if multipart else ""
    with socket.create_connection(("127.0.0.1", server.port)) as holder:
        # Announces 60 MiB and sends none of it: the reservation is held while it waits.
        # (until the server's body timeout, 5 s)
        holder.sendall(request_head("/classify", 60 * MIB))
        time.sleep(0.5)  # for the server to take the holder's request first
        started = time.monotonic()
        head = request_head("/classify", 10 * MIB, None, content_type)
        answer = exchange(server.port, head, early_s=2)
        assert answer.status == 503 and not answer.body_sent, answer
        assert time.monotonic() - started < 2
        assert int(answer.headers["retry-after"]) >= 1
        assert answer.headers["connection"] == "close"
        assert "decode budget (bodies and decodes)" in answer.json()["detail"]
    # The holder gone, its reservation is returned: the same body is read (and is junk).
    deadline = time.monotonic() + 10
    while True:
        answer = exchange(server.port, request_head("/classify", 10 * MIB), junk(10 * MIB))
        if answer.status != 503 or time.monotonic() > deadline:
            break
    assert answer.status == 415 and answer.body_sent, answer


@pytest.mark.slow
def test_concurrent_raw_bodies_stay_inside_the_budget(server: RunningServer) -> None:
    # 16 x 12 MiB at once (192 MiB) against the 64 MiB budget: the bodies admitted are read,
    # the others are refused before they are sent, and the server's memory follows the budget.
    size = 12 * MIB
    barrier = threading.Barrier(16)

    def send(_: int) -> Answer:
        barrier.wait()
        return exchange(server.port, request_head("/classify", size), junk(size), early_s=2)

    with process_cost.measured(server.process.pid) as cost, ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(send, range(16)))
    statuses = sorted(answer.status for answer in answers)
    assert set(statuses) <= {415, 503} and 415 in statuses, statuses
    assert all(a.body_sent == (a.status == 415) for a in answers)
    assert cost.rss_growth_mib < BUDGET / MIB + SLACK_MIB, cost


@pytest.mark.parametrize(
    ("shape", "binary"),
    [([1, 0, 0, 3], False), ([1, 0, 0, 3], True), ([1, 5, 0, 3], True), ([1, 4, 4, 0], False)],
)
def test_an_empty_image_dimension_is_400(
    server: RunningServer, shape: list[int], binary: bool
) -> None:
    document = images_json(shape, binary)
    headers = {HEADER_LENGTH: str(len(document))} if binary else {}
    answer = httpx.post(f"{server.url}{INFER}", content=document, headers=headers, timeout=30)
    assert answer.status_code == 400, answer.text
    assert "H and W at least 1" in answer.json()["error"]


@pytest.mark.parametrize("value", [b"\xb2", b"1\xb2", b"\xd9\xa3", b"1" * 40, b"-1", b""])
def test_a_header_length_that_is_not_ascii_digits_is_400(
    server: RunningServer, value: bytes
) -> None:
    document = images_json([1, 8, 8, 3])
    body = document + bytes(192)
    head = request_head(INFER, len(body), {HEADER_LENGTH: value}, "application/json")
    answer = exchange(server.port, head, [body])
    assert answer.status == 400, answer
    assert "is not a byte count" in answer.json()["error"]


def test_legal_requests_still_pass(server: RunningServer) -> None:
    document = images_json([2, 8, 8, 3])
    answer = httpx.post(
        f"{server.url}{INFER}",
        content=document + bytes(range(128)) * 3,
        headers={HEADER_LENGTH: str(len(document))},
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["outputs"][0]["shape"] == [2, 10]


def test_the_budget_counts_each_piece_of_a_chunked_body(server: RunningServer) -> None:
    """Without a Content-Length the pieces are reserved as they arrive: a chunked body larger
    than the budget is refused once it has sent the budget's worth, not read to its end."""

    def pieces() -> Iterator[bytes]:
        yield FITS_MAGIC  # a FITS start: past the format check, to the budget
        yield from (bytes(JUNK) for _ in range(100))  # 100 MiB, under max_body_bytes

    answer = httpx.post(f"{server.url}/classify", content=pieces(), timeout=60)
    assert answer.status_code == 413, answer.text
    assert "the memory budget" in answer.json()["detail"]


def test_bodies_and_decodes_draw_on_one_budget() -> None:
    budget = MemoryBudget(100)
    with budget.claim_body() as body:
        body(60, "request body")
        with budget.claim() as decode:
            with pytest.raises(DecodeBusyError, match="40 of the 100-byte decode budget"):
                decode(50, "PNG image")
            decode(40, "PNG image")
        with budget.claim_body() as other:
            with pytest.raises(BodyBusyError, match="needs 50 bytes, 40 of the 100-byte"):
                other(50, "request body")
            with pytest.raises(PayloadTooLargeError, match="request body of 101 bytes"):
                other(101, "request body")
        assert budget.used == 60
    assert budget.used == 0


# A raw body is judged on its first SNIFF_BYTES: one of no cutout format is refused (415) and
# its connection closed, however much is announced. On 8d8d00b a 50 MB junk body was read whole
# before its 415. Each case sends the head and EARLY of the body, and the rest only if no
# answer came within the wait: `body_sent` False is an answer given after at most EARLY bytes.
EARLY = 64 * 1024
JUNK_SIZE = 50_000_000


def chunked_head(path: str) -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n".encode()


def chunk(data: bytes | memoryview) -> bytes:
    return b"%x\r\n" % len(data) + bytes(data) + b"\r\n"


@pytest.mark.parametrize("path", ["/classify", "/classify?filename=galaxy.fits"])
def test_a_junk_raw_body_is_415_after_its_first_bytes(server: RunningServer, path: str) -> None:
    first = bytes(JUNK[:EARLY])
    rest = (piece for piece in junk(JUNK_SIZE - EARLY))
    answer = exchange(server.port, request_head(path, JUNK_SIZE) + first, rest, early_s=10)
    assert answer.status == 415 and not answer.body_sent, answer
    assert answer.headers["connection"] == "close"
    # The refusal a whole-body decode gives for these bytes (named like FITS, or not).
    filename = "galaxy.fits" if "filename" in path else None
    with pytest.raises(CutoutError) as whole:
        sniff_format(bytes(JUNK), filename)
    assert answer.json()["detail"] == whole.value.message


def test_a_chunked_junk_body_is_415_after_its_first_bytes(server: RunningServer) -> None:
    first = chunk(JUNK[:EARLY])
    rest = (chunk(piece) for piece in junk(JUNK_SIZE - EARLY))
    answer = exchange(server.port, chunked_head("/classify") + first, rest, early_s=10)
    assert answer.status == 415 and not answer.body_sent, answer
    assert answer.headers["connection"] == "close"


def test_a_client_streaming_a_junk_body_gets_its_415(server: RunningServer) -> None:
    """An ordinary client that sends the whole body without waiting reads the 415, whether or
    not the server closed before the body's end."""
    answer = httpx.post(f"{server.url}/classify", content=junk(JUNK_SIZE), timeout=60)
    assert answer.status_code == 415, answer.text
    assert "unrecognised binary data" in answer.json()["detail"]


def every_format() -> list[tuple[str, str, bytes]]:
    """(format, case, bytes) for every registered format, real files where there are some."""
    hst = (REAL_DATA / "hst-fits/abell_2744_spiral_galaxy_f105w.fits.gz").read_bytes()
    real = REAL_DATA / "galaxy10-real"
    cases = [
        ("fits", "grz", make_grz_fits(size=64)),
        ("fits", "fpack", make_grz_fits(size=64, fpack=True)),
        ("fits", "hst-gzip", hst),
        ("fits", "hst", gzip.decompress(hst)),
        ("png", "galaxy10", (real / "class2_Round_Smooth.png").read_bytes()),
        ("png", "under-sniff-bytes", make_png(size=(8, 8))),  # read whole, as before
        ("jpeg", "galaxy10", (real / "sample_1_Disturbed.jpg").read_bytes()),
    ]
    assert {name for name, _, _ in cases} == {fmt.name for fmt in FORMATS}, "a format untested"
    return cases


@pytest.mark.parametrize("chunked", [False, True], ids=["length", "chunked"])
@pytest.mark.parametrize(
    ("name", "data"), [pytest.param(n, d, id=f"{n}-{c}") for n, c, d in every_format()]
)
def test_every_supported_format_still_classifies_as_a_raw_body(
    server: RunningServer, name: str, data: bytes, chunked: bool
) -> None:
    # A generator has no length: httpx sends it chunked, in pieces smaller than SNIFF_BYTES.
    pieces = (data[i : i + 300] for i in range(0, len(data), 300))
    content = pieces if chunked else data
    answer = httpx.post(f"{server.url}/classify", content=content, timeout=60)
    assert answer.status_code == 200, answer.text
    assert answer.json()["preprocessing"]["format"] == name
