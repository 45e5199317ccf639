"""Resumable, verified download against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from galmorph.cli import main
from galmorph.training.download import DownloadError, DownloadOptions, download

PAYLOAD = bytes(range(256)) * 4099  # ~1 MB, not a multiple of the read size
SHA = hashlib.sha256(PAYLOAD).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    supports_range = True
    requests: ClassVar[list[str | None]] = []
    cut_first_response_at: ClassVar[int | None] = None

    def do_GET(self) -> None:
        cls = type(self)
        cls.requests.append(self.headers.get("Range"))
        start = 0
        if cls.supports_range and self.headers.get("Range"):
            start = int(self.headers["Range"].removeprefix("bytes=").split("-")[0])
        body = PAYLOAD[start:]
        if start:
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if cls.cut_first_response_at is not None:
            body, cls.cut_first_response_at = body[: cls.cut_first_response_at], None
            self.wfile.write(body)
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[tuple[str, type[_Handler]]]:
    handler = type("Handler", (_Handler,), {"requests": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/files/Galaxy10_DECals.h5", handler
    finally:
        httpd.shutdown()
        httpd.server_close()


QUIET = DownloadOptions(sha256=SHA, progress=False, retry_delay_s=0.0)


def test_full_download(tmp_path: Path, server: tuple[str, type[_Handler]]) -> None:
    url, handler = server
    dest = download(url, tmp_path / "g.h5", QUIET)
    assert dest.read_bytes() == PAYLOAD
    assert not (tmp_path / "g.h5.part").exists()
    assert handler.requests == [None]
    # Present and verified: no second request.
    download(url, dest, QUIET)
    assert handler.requests == [None]


def test_resumes_partial_file(tmp_path: Path, server: tuple[str, type[_Handler]]) -> None:
    url, handler = server
    (tmp_path / "g.h5.part").write_bytes(PAYLOAD[:300_000])
    dest = download(url, tmp_path / "g.h5", QUIET)
    assert dest.read_bytes() == PAYLOAD
    assert handler.requests == ["bytes=300000-"]


def test_retries_after_dropped_connection(
    tmp_path: Path, server: tuple[str, type[_Handler]]
) -> None:
    url, handler = server
    handler.cut_first_response_at = 200_000
    dest = download(url, tmp_path / "g.h5", QUIET)
    assert dest.read_bytes() == PAYLOAD
    assert handler.requests[0] is None and handler.requests[-1] is not None
    assert handler.requests[-1].startswith("bytes=")


def test_server_without_range_restarts_cleanly(
    tmp_path: Path, server: tuple[str, type[_Handler]]
) -> None:
    url, handler = server
    handler.supports_range = False
    (tmp_path / "g.h5.part").write_bytes(b"garbage that must not survive" * 100)
    dest = download(url, tmp_path / "g.h5", QUIET)
    assert dest.read_bytes() == PAYLOAD
    assert handler.requests == ["bytes=2900-"]


def test_wrong_checksum_is_an_error(tmp_path: Path, server: tuple[str, type[_Handler]]) -> None:
    url, _ = server
    options = DownloadOptions(sha256="0" * 64, progress=False)
    with pytest.raises(DownloadError, match="SHA256 mismatch"):
        download(url, tmp_path / "g.h5", options)
    assert not (tmp_path / "g.h5").exists()
    assert not (tmp_path / "g.h5.part").exists()


def test_existing_file_that_does_not_verify(
    tmp_path: Path, server: tuple[str, type[_Handler]]
) -> None:
    url, _ = server
    (tmp_path / "g.h5").write_bytes(b"old")
    with pytest.raises(DownloadError, match="remove it"):
        download(url, tmp_path / "g.h5", QUIET)
    assert (tmp_path / "g.h5").read_bytes() == b"old"


def test_http_error_and_bad_inputs(tmp_path: Path, server: tuple[str, type[_Handler]]) -> None:
    url, _ = server
    with pytest.raises(DownloadError, match="not a SHA256"):
        download(url, tmp_path / "g.h5", DownloadOptions(sha256="xyz"))
    with pytest.raises(DownloadError, match="only http"):
        download("file:///etc/passwd", tmp_path / "p", QUIET)


def test_cli_download(
    tmp_path: Path, server: tuple[str, type[_Handler]], capsys: pytest.CaptureFixture[str]
) -> None:
    url, _ = server
    args = ["data", "download", "--out", str(tmp_path), "--url", url, "--quiet"]
    assert main([*args, "--sha256", SHA.upper()]) == 0
    assert (tmp_path / "Galaxy10_DECals.h5").read_bytes() == PAYLOAD
    assert "SHA256 verified" in capsys.readouterr().out
    other = tmp_path / "other"
    wrong = ["data", "download", "--out", str(other), "--url", url, "--quiet", "--sha256"]
    assert main([*wrong, "1" * 64]) == 1
    assert "SHA256 mismatch" in capsys.readouterr().err
    assert not (other / "Galaxy10_DECals.h5").exists()
