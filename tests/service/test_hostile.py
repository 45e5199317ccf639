"""Hostile inputs and clients: every case asserts its status code AND what it cost.

Server cases run against a real `galmorph serve` (uvicorn) process and read its cost from
/proc: memory is the growth of its peak RSS (VmHWM, reset through /proc/PID/clear_refs before
each case) over its RSS before the case; CPU is utime + stime from /proc/PID/stat. The bounds
are what a case may legitimately cost, with slack, and far below what the same inputs cost
before decoding was bounded (measured then on a 256 px model: a 55 KB FITS claiming 1000"/px
took 2.5 GB and 10 s of CPU; an 8192x8192 PNG 640 MB, three of them in one batch ~3 GB; a
gzip FITS of 30,000 empty extensions 3 s of CPU; a 4096^2 x 3 gzip cube 430 MB).

The scorer's cases run catalogs naming special files (a FIFO, /dev/zero, a socket, a symlink
loop) and must end with error rows, never hang: they run under a watchdog.
"""

from __future__ import annotations

import io
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import httpx
import numpy as np
import pytest
from astropy.io import fits

from galmorph.core.cutouts.limits import MIB, CutoutError, CutoutErrorKind, DecodeLimits
from galmorph.scoring.decode_worker import DecodeSettings, decode_sources
from galmorph.service import decoding
from galmorph.service.batching import MicroBatcher
from galmorph.service.decoding import DecodeBusyError, MemoryBudget
from tests.support import process_cost
from tests.support.app_client import running, settings_for
from tests.support.cutout_factory import bad_inputs, gzip_bomb, make_grz_fits, make_png
from tests.support.hostile_inputs import (
    extension_flood,
    flat_gzip_cube,
    flat_jpeg,
    flat_png,
    header_card_flood,
    png_chunk,
    scale_bomb_fits,
    scan_bomb_jpeg,
)
from tests.support.onnx_factory import FactoryModel, write_model
from tests.support.process_cost import Cost
from tests.support.server_process import RunningServer, serve

BUDGET = 448 * MIB  # holds one 8192^2 RGB PNG (~265 MiB) at a time, not two
INPUT = 128  # the test model's input size
T = TypeVar("T")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("hostile") / "model.onnx", FactoryModel(INPUT))


@pytest.fixture(scope="module")
def server(model: Path) -> Iterator[RunningServer]:
    environment = {
        "GALMORPH_DECODE_MEMORY_BUDGET_BYTES": str(BUDGET),
        "GALMORPH_DECODE_THREADS": "4",
        "GALMORPH_MAX_BATCH_FILES": "8",
        "GALMORPH_MAX_QUEUE": "64",
    }
    with serve(model, model.parent, "--log-level", "warning", env=environment) as running:
        yield running


@contextmanager
def measured(server: RunningServer) -> Iterator[Cost]:
    with process_cost.measured(server.process.pid) as cost:
        yield cost


def post(server: RunningServer, data: bytes, name: str, **params: str) -> httpx.Response:
    return httpx.post(
        f"{server.url}/classify", files={"file": (name, data)}, params=params, timeout=60
    )


# --- scale bombs --------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [1000.0, 100.0, 0.001])
def test_absurd_pixel_scales_are_refused_naming_both_scales(
    server: RunningServer, scale: float
) -> None:
    data = scale_bomb_fits(scale)
    with measured(server) as cost:
        response = post(server, data, "bomb.fits")
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert f'{scale:.4g}"/px' in detail and '0.004094 to 2.096"/px' in detail, detail
    assert '0.262"/px' in detail
    assert cost.rss_growth_mib < 24 and cost.cpu_s < 0.5, cost  # was 2.5 GB, 10 s at 1000"/px


@pytest.mark.parametrize("scale", [2.0, 0.0045])
def test_extreme_allowed_scales_are_resampled_within_the_input(
    server: RunningServer, scale: float
) -> None:
    data = scale_bomb_fits(scale, size=256)
    with measured(server) as cost:
        response = post(server, data, "edge.fits")
    assert response.status_code == 200, response.text
    info = response.json()["preprocessing"]
    assert info["resampled_from_scale"] == pytest.approx(scale, rel=0.01)
    (note,) = [w for w in info["warnings"] if w.startswith("resampled from")]
    height, width = (int(side) for side in note.rsplit("-> ", 1)[1].split()[0].split("x"))
    assert height <= INPUT and width <= INPUT, note
    assert cost.rss_growth_mib < 24 and cost.cpu_s < 0.5, cost


# --- pixel bombs and the decode budget ----------------------------------------------------


def test_largest_allowed_png_costs_its_reservation(server: RunningServer) -> None:
    data = flat_png(8192)  # 200 KB, 8192 x 8192 RGB
    with measured(server) as cost:
        response = post(server, data, "big.png")
    assert response.status_code == 200, response.text
    # Pillow holds RGB at 4 bytes a pixel: 256 MiB, reserved before decoding (was 640 MB).
    assert cost.rss_growth_mib < 256 + 32 and cost.cpu_s < 5, cost


def test_concurrent_pixel_bombs_share_the_budget(server: RunningServer) -> None:
    data = flat_png(8192)
    barrier = threading.Barrier(6)

    def send(_: int) -> httpx.Response:
        barrier.wait()
        return post(server, data, "big.png")

    with measured(server) as cost, ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(send, range(6)))
    statuses = sorted(response.status_code for response in responses)
    assert 200 in statuses and 503 in statuses and set(statuses) == {200, 503}, statuses
    for response in responses:
        if response.status_code == 503:
            assert int(response.headers["Retry-After"]) >= 1
            assert "decode budget" in response.json()["detail"]
    assert cost.rss_growth_mib < BUDGET / MIB + 48, cost  # six at once took ~3.8 GB before


def test_one_decode_larger_than_the_budget_is_413_before_decoding(server: RunningServer) -> None:
    data = flat_png(8192, colour_type=6)  # RGBA: the picture, an RGB copy, the alpha (~585 MiB)
    with measured(server) as cost:
        response = post(server, data, "rgba.png")
    assert response.status_code == 413, response.text
    assert "decode memory budget" in response.json()["detail"]
    assert cost.rss_growth_mib < 24 and cost.cpu_s < 0.5, cost


def test_huge_jpeg_is_decoded_in_full_within_its_reservation(server: RunningServer) -> None:
    data = flat_jpeg(4096)
    with measured(server) as cost:
        response = post(server, data, "big.jpg")
    assert response.status_code == 200, response.text
    assert response.json()["preprocessing"]["resized_from"] == [4096, 4096]  # every pixel
    assert cost.rss_growth_mib < 64 + 24 and cost.cpu_s < 1.5, cost  # the picture: 64 MiB


def test_jpeg_scan_bomb_is_refused_unread(server: RunningServer) -> None:
    bomb = scan_bomb_jpeg()  # 8192^2, 2010 scans: over a minute of CPU to decode
    assert len(bomb) < 1024 * 1024
    with measured(server) as cost:
        response = post(server, bomb, "scans.jpg")
    assert response.status_code == 413, response.text
    assert "JPEG has 2010 scans, over the limit of 32" in response.json()["detail"]
    assert cost.rss_growth_mib < 24 and cost.cpu_s < 0.5, cost
    normal = post(server, flat_jpeg(4096, progressive=True), "progressive.jpg")
    assert normal.status_code == 200, normal.text


def test_batch_decodes_one_file_at_a_time(server: RunningServer) -> None:
    files = [("files", (f"big{i}.png", flat_png(4096))) for i in range(3)]  # 64 MiB decoded each
    with measured(server) as cost:
        response = httpx.post(f"{server.url}/classify/batch", files=files, timeout=120)
    assert response.status_code == 200, response.text
    assert response.json()["succeeded"] == 3
    # One decode at a time; together they would take 3 x 64 MiB (three 8192^2 ~3 GB before).
    assert cost.rss_growth_mib < 64 + 48, cost


def test_too_many_files_in_a_batch_is_413(server: RunningServer) -> None:
    files = [("files", (f"f{i}.png", make_png(seed=i))) for i in range(9)]
    response = httpx.post(f"{server.url}/classify/batch", files=files, timeout=30)
    assert response.status_code == 413, response.text
    assert "more than the limit of 8 files" in response.json()["detail"]


# --- FITS structure floods and gzip -------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "build", "status", "needle"),
    [
        ("extension flood", lambda: extension_flood(30_000), 413, "first 64 HDUs"),
        ("header card flood", header_card_flood, 413, "more than 7200 cards"),
        ("gzip bomb", gzip_bomb, 413, "expand past the limit"),
    ],
)
def test_fits_floods_are_refused_cheaply(
    server: RunningServer, name: str, build: Callable[[], bytes], status: int, needle: str
) -> None:
    data = build()
    with measured(server) as cost:
        response = post(server, data, "flood.fits.gz")
    assert response.status_code == status, (name, response.text)
    assert needle in response.json()["detail"], name
    # The extension flood took 3 s of CPU; the gzip bomb inflates to its 256 MiB cap at most.
    assert cost.rss_growth_mib < 24 and cost.cpu_s < 1.5, (name, cost)


def test_many_extension_floods_in_parallel_cost_little(server: RunningServer) -> None:
    data = extension_flood(30_000)
    with measured(server) as cost, ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda _: post(server, data, "x.fits.gz").status_code, range(8)))
    assert statuses == [413] * 8
    assert cost.cpu_s < 1.5, cost  # eight took ~24 s of CPU before


def test_big_gzip_cube_is_read_only_where_the_model_looks(server: RunningServer) -> None:
    data = flat_gzip_cube(4096)  # 200 KB; 3 x 4096^2 float32 = 192 MiB inflated
    with measured(server) as cost:
        response = post(server, data, "cube.fits.gz")
    assert response.status_code == 200, response.text
    assert response.json()["preprocessing"]["crop_pad_from"] == [4096, 4096]
    # The rest of the stream is inflated only to prove the file whole (was 430 MB).
    assert cost.rss_growth_mib < 32 and cost.cpu_s < 2.5, cost


# --- truncated and odd files --------------------------------------------------------------


def odd_files() -> list[tuple[str, bytes, int]]:
    png = make_png()
    text_flood = png[:33] + png_chunk(b"zTXt", b"k\0\0" + _zeros_z(1 << 20)) * 60 + png[33:]
    one_axis = fits.PrimaryHDU(np.zeros(100, np.float32))
    buffer = io.BytesIO()
    one_axis.writeto(buffer)
    jpeg = flat_jpeg(1024)
    return [
        *((case.name, case.data, case.status) for case in bad_inputs()),
        ("png text chunk flood", text_flood, 200),
        ("one-axis FITS", buffer.getvalue(), 422),
        ("truncated jpeg", jpeg[: len(jpeg) // 3], 422),
        ("gzip cube cut short", flat_gzip_cube(1024)[:6000], 422),  # beyond the model's field
        ("fits with trailing garbage", make_grz_fits(size=64) + b"\xff" * 5000, 200),
    ]


def _zeros_z(size: int) -> bytes:
    import zlib

    return zlib.compress(b"\0" * size, 9)


def test_truncated_and_odd_files_get_their_status_cheaply(server: RunningServer) -> None:
    cases = odd_files()
    with measured(server) as cost:
        for name, data, status in cases:
            response = post(server, data, name.replace(" ", "_"))
            assert response.status_code == status, (name, response.text)
    assert cost.rss_growth_mib < 64 and cost.cpu_s < 3, cost
    assert "Traceback" not in server.log()


# --- admission and time, in process ------------------------------------------------------


def test_uploads_are_refused_before_decoding_when_the_queue_is_full(
    model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("decoded although the queue was full")

    with running(settings_for(model, max_queue=4, max_batch_files=4)) as client:
        monkeypatch.setattr(decoding, "decode_cutout", never)
        monkeypatch.setattr(MicroBatcher, "queue_length", property(lambda self: 3))
        files = [("files", (f"f{i}.png", make_png(seed=i))) for i in range(2)]
        batch = client.post("/classify/batch", files=files)
        monkeypatch.setattr(MicroBatcher, "queue_length", property(lambda self: 4))
        single = client.post("/classify", content=make_png())
    for response in (batch, single):
        assert response.status_code == 503, response.text
        assert "queue is full" in response.json()["detail"] and "Retry-After" in response.headers


def test_a_full_spool_disk_is_503_and_small_uploads_still_pass(
    model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Multipart files over 1 MiB roll over to a temporary file; /dev/full gives the kernel's
    # own ENOSPC on the first write, as a full tmpfs does.
    assert Path("/dev/full").exists(), "this test needs Linux's /dev/full"

    def full_disk_file(*args: object, **kwargs: object) -> BinaryIO:
        return open("/dev/full", "w+b", buffering=0)  # the spool closes it

    monkeypatch.setattr(tempfile, "TemporaryFile", full_disk_file)
    large = make_png(size=(1024, 1024), seed=3)  # random RGB: about 3 MiB
    assert len(large) > 1024 * 1024
    with running(settings_for(model)) as client:
        refused = client.post("/classify", files={"file": ("big.png", large)})
        served = client.post("/classify", files={"file": ("small.png", make_png())})
    assert refused.status_code == 503, refused.text
    assert "no room to hold the upload" in refused.json()["detail"]
    assert refused.headers["Retry-After"] == "5"
    assert served.status_code == 200, served.text


def test_decode_time_counts_in_the_request_timeout(
    model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = decoding.decode_cutout

    def slow(*args: Any, **kwargs: Any) -> Any:
        time.sleep(1.6)
        return real(*args, **kwargs)

    with running(settings_for(model, request_timeout_s=1.0, decode_threads=2)) as client:
        monkeypatch.setattr(decoding, "decode_cutout", slow)
        started = time.monotonic()
        response = client.post("/classify", content=make_png())
        answered = time.monotonic() - started
        assert response.status_code == 503, response.text
        assert "decoding did not finish within the request timeout" in response.json()["detail"]
        assert answered < 1.5, answered  # answered at the deadline, not when the decode ended
        monkeypatch.setattr(decoding, "decode_cutout", real)  # (the other thread is free)
        assert client.post("/classify", content=make_png()).status_code == 200


def test_budget_refuses_holds_and_returns_reservations() -> None:
    budget = MemoryBudget(100)
    with budget.claim() as reserve:
        reserve(60, "a")
        with budget.claim() as other:
            with pytest.raises(DecodeBusyError, match="40 of the 100-byte decode budget"):
                other(50, "b")
            other(40, "c")
            assert budget.used == 100
        assert budget.used == 60
        with pytest.raises(CutoutError, match="more than the server's decode memory") as error:
            reserve(50, "a")  # this decode alone would need 110
        assert error.value.kind is CutoutErrorKind.TOO_LARGE
    assert budget.used == 0
    with pytest.raises(RuntimeError), budget.claim() as reserve:
        reserve(70, "d")
        raise RuntimeError("decode failed")
    assert budget.used == 0


# --- the scorer and special files ---------------------------------------------------------


def within(seconds: float, call: Callable[[], T]) -> T:
    """call() on a daemon thread; fails (instead of hanging the suite) if it runs longer."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append((call(), None))
        except BaseException as exc:  # handed to the caller below
            outcome.append((None, exc))

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"still running after {seconds} s: it hangs"
    result, error = outcome[0]
    if error is not None:
        raise error
    return result  # type: ignore[no-any-return]


@pytest.fixture
def special_files(tmp_path: Path) -> Iterator[dict[str, str]]:
    fifo = tmp_path / "pipe.fits"
    os.mkfifo(fifo)
    loop = tmp_path / "loop.fits"
    loop.symlink_to(tmp_path / "loop.fits")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tmp_path / "sock.fits"))
    good = tmp_path / "good.fits"
    good.write_bytes(make_grz_fits(size=64))
    (tmp_path / "folder.fits").mkdir()
    try:
        yield {
            "fifo": str(fifo),
            "zero": "/dev/zero",
            "socket": str(tmp_path / "sock.fits"),
            "loop": str(loop),
            "folder": str(tmp_path / "folder.fits"),
            "proc": "/proc/self/status",  # a regular file whose size says 0
            "good": str(good),
        }
    finally:
        listener.close()


def test_scorer_turns_special_files_into_error_rows(
    model: Path, special_files: dict[str, str]
) -> None:
    from galmorph.core.modelfile.engine import OnnxModel

    card = OnnxModel(model, intra_op_threads=1).card
    settings = DecodeSettings(
        card=card, stretch=None, source_kind="path", limits=DecodeLimits(max_bytes=1000 * 1000)
    )
    names = list(special_files)
    images, errors = within(10, lambda: decode_sources(settings, list(special_files.values())))
    by_name = dict(zip(names, errors, strict=True))
    assert by_name.pop("good") is None and images[names.index("good")].any()
    expected = {
        "fifo": "a FIFO (named pipe), not a regular file",
        "zero": "a character device, not a regular file",
        "socket": "a socket or a device without a driver",
        "loop": "missing: ",  # the scorer names a path that resolves nowhere missing
        "folder": "a directory, not a regular file",
        "proc": "unsupported: ",  # read (its size says 0), found to be text
    }
    for name, needle in expected.items():
        assert by_name[name] is not None and needle in by_name[name], (name, by_name[name])


def test_scorer_reads_no_further_than_the_byte_limit(tmp_path: Path) -> None:
    from galmorph.core.cutouts.decode import read_cutout_file

    with pytest.raises(CutoutError, match="holds more than the limit of 100 bytes"):
        read_cutout_file(Path("/proc/self/status"), DecodeLimits(max_bytes=100))
    big = tmp_path / "big.fits"
    big.write_bytes(b"\0" * 5000)
    with pytest.raises(CutoutError, match="over the limit of 100 bytes") as error:
        read_cutout_file(big, DecodeLimits(max_bytes=100))
    assert error.value.kind is CutoutErrorKind.TOO_LARGE


def test_scorer_read_timeout_ends_a_slow_read(tmp_path: Path, monkeypatch) -> None:
    from galmorph.core.cutouts import decode

    path = tmp_path / "slow.fits"
    path.write_bytes(make_grz_fits(size=256))  # ~800 KB: several chunks
    real_read = os.read

    def slow_read(descriptor: int, size: int) -> bytes:
        time.sleep(0.05)
        return real_read(descriptor, min(size, 64 * 1024))

    monkeypatch.setattr(decode.os, "read", slow_read)
    limits = DecodeLimits(read_timeout_s=0.2)
    with pytest.raises(CutoutError, match=r"still reading after 0\.2 s"):
        within(5, lambda: decode.read_cutout_file(path, limits))


def test_score_run_over_a_catalog_of_special_files_finishes(
    model: Path, special_files: dict[str, str], tmp_path: Path
) -> None:
    import pyarrow.parquet as pq

    from galmorph.scoring.run import ScoreConfig, score

    catalog = tmp_path / "catalog.csv"
    rows = [f"{name},{path}" for name, path in special_files.items()]
    catalog.write_text("id_str,file_loc\n" + "\n".join(rows) + "\n")
    config = ScoreConfig(
        catalog=catalog,
        model=model,
        out_dir=tmp_path / "out",
        workers=0,
        ort_threads=1,
        providers=("CPUExecutionProvider",),
        progress=False,
    )
    within(60, lambda: score(config))
    table = pq.read_table(tmp_path / "out" / "scores.parquet")
    ids, errors_column = table.column("id_str").to_pylist(), table.column("error").to_pylist()
    errors = dict(zip(ids, errors_column, strict=True))
    assert errors.pop("good") is None
    assert all(error for error in errors.values()), errors
