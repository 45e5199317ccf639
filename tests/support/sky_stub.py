"""A loopback stand-in for the Legacy Survey viewer's cutout service, with fault injection.

`SkyStub` is a real HTTP/1.1 server (http.server, keep-alive, one thread per connection) on
127.0.0.1 that answers like the viewer (legacysurvey/imagine map/views.py `get_cutout`):

- GET /cutout.fits: a float32 (nbands, H, W) cube ((H, W) for one band) in nanomaggies with
  BANDS/BANDn and a TAN WCS centred on the asked (ra, dec) at the asked pixscale, holding a
  synthetic galaxy (tests.support.cutout_factory.galaxy_planes, seeded by the position) at the
  centre, i.e. at the asked position. GET /cutout.jpg: the same rendered with dr2_rgb, north up.
- size (default 256), width, height cut to 3000; pixscale default 0.262; no ra/dec: 400
  "Need ra,dec keywords"; an unknown layer: 200 "no such layer"; an unknown band: all the
  layer's bands (griz), as the viewer does.

Faults are planned per position, one per attempt: `stub.plan[(ra, dec)] = ["429", "500"]`
answers the first request for that position with a 429, the second with a 500, and later ones
normally (`stub.default`, "ok"). Kinds (FAULTS): ok, 429 and 503 (Retry-After:
`retry_after`, any text: a number, an HTTP date or garbage), 500 (an HTML error page), html
and text (200 with an error page or "no such layer"), slow (waits `slow_seconds` first),
trickle (the whole cutout, a byte every `trickle_interval` seconds, for at most `slow_seconds`),
truncate (Content-Length of the whole, half the body, then the connection closes), short (half
a FITS with a matching Content-Length), reset (connection reset, no answer), wrong_bands (a
whole FITS of other bands). `latency` delays every answer.

`stub.log` records every request: path, parameters, headers, status, fault, start and end
(time.monotonic) and how many requests were in flight when it started.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import numpy as np
from astropy.io import fits
from PIL import Image

from galmorph.core.cutouts.imaging import dr2_rgb, flip_north_up, to_uint8
from tests.support.cutout_factory import galaxy_planes, tan_wcs_header

FAULTS = (
    "ok", "429", "503", "500", "html", "text", "slow", "trickle", "truncate", "short", "reset",
    "wrong_bands",
)  # fmt: skip
LAYERS = {"ls-dr10": "griz", "ls-dr9": "grz"}
MAX_SIZE = 3000
ERROR_PAGE = (
    b"<!DOCTYPE html><html><head><title>Server Error (500)</title></head>"
    b"<body><h1>Server Error (500)</h1><p>NoOverlapError: No overlap</p></body></html>"
)


@dataclass(frozen=True)
class LoggedRequest:
    path: str
    params: dict[str, str]
    headers: dict[str, str]
    status: int | None  # None: no answer (reset, or the client left)
    fault: str
    start: float
    end: float
    in_flight: int  # requests being answered when this one started, itself included

    @property
    def position(self) -> tuple[float, float] | None:
        if "ra" not in self.params or "dec" not in self.params:
            return None
        return float(self.params["ra"]), float(self.params["dec"])


@lru_cache(maxsize=512)
def render_fits(
    ra: float, dec: float, bands: str, pixscale: float, width: int, height: int
) -> bytes:
    """The viewer's FITS answer: a galaxy at (ra, dec), header as the viewer writes it."""
    seed = int.from_bytes(hashlib.sha256(f"{ra:.7f},{dec:.7f}".encode()).digest()[:4], "little")
    side = max(width, height)
    planes = galaxy_planes(side, pixel_scale=pixscale, bands=bands, seed=seed)
    top, left = (side - height) // 2, (side - width) // 2
    cube = np.stack([planes[b][top : top + height, left : left + width] for b in bands])
    header = tan_wcs_header((height, width), pixscale)
    header["CRVAL1"], header["CRVAL2"] = ra, dec
    header["BANDS"] = bands
    for i, band in enumerate(bands):
        header[f"BAND{i}"] = band
    header["IMAGETYP"] = "IMAGE"
    buffer = io.BytesIO()
    fits.PrimaryHDU(cube[0] if len(bands) == 1 else cube, header).writeto(buffer)
    return buffer.getvalue()


def render_jpeg(ra: float, dec: float, pixscale: float, width: int, height: int) -> bytes:
    data = render_fits(ra, dec, "grz", pixscale, width, height)
    with fits.open(io.BytesIO(data)) as hdus:
        cube = np.asarray(hdus[0].data, np.float32)
    rgb = to_uint8(flip_north_up(dr2_rgb({b: cube[i] for i, b in enumerate("grz")})))
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@dataclass
class SkyStub:
    """Start with `with SkyStub() as stub:`; `stub.base_url` is the viewer's base URL."""

    plan: dict[tuple[float, float], list[str]] = field(default_factory=dict)
    default: str = "ok"
    retry_after: int | str = 1
    slow_seconds: float = 2.0
    trickle_interval: float = 0.2
    latency: float = 0.0
    log: list[LoggedRequest] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._attempts: dict[tuple[float, float], int] = {}
        self._in_flight = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        assert self._server is not None, "stub not started"
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/viewer"

    def __enter__(self) -> SkyStub:
        stub = self

        class Handler(_Handler):
            owner = stub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        assert self._server is not None and self._thread is not None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def requests(self, path_suffix: str = "") -> list[LoggedRequest]:
        with self._lock:
            return [r for r in self.log if r.path.endswith(path_suffix)]

    def _next_fault(self, position: tuple[float, float] | None) -> str:
        with self._lock:
            if position is None:
                return "ok"
            attempt = self._attempts.get(position, 0)
            self._attempts[position] = attempt + 1
            planned = self.plan.get(position, [])
            return planned[attempt] if attempt < len(planned) else self.default

    def _enter(self) -> int:
        with self._lock:
            self._in_flight += 1
            return self._in_flight

    def _leave(self, record: LoggedRequest) -> None:
        with self._lock:
            self._in_flight -= 1
            self.log.append(record)


class _Handler(BaseHTTPRequestHandler):
    owner: SkyStub
    protocol_version = "HTTP/1.1"  # keep-alive, as the real service

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        stub = self.owner
        start = time.monotonic()
        in_flight = stub._enter()
        url = urlsplit(self.path)
        params = {k: v[-1] for k, v in parse_qs(url.query).items()}
        status: int | None = None
        fault = "ok"
        try:
            try:
                ra, dec = float(params["ra"]), float(params["dec"])
            except (KeyError, ValueError):
                status = self._send(400, b"Need ra,dec keywords", "text/plain")
                return
            fault = stub._next_fault((ra, dec))
            if stub.latency:
                time.sleep(stub.latency)
            status = self._answer(fault, ra, dec, url.path, params)
        except (BrokenPipeError, ConnectionResetError):
            status = None  # the client gave up (its timeout): nothing was delivered
        finally:
            headers = {k.lower(): v for k, v in self.headers.items()}
            end = time.monotonic()
            stub._leave(
                LoggedRequest(url.path, params, headers, status, fault, start, end, in_flight)
            )

    def _answer(
        self, fault: str, ra: float, dec: float, path: str, params: dict[str, str]
    ) -> int | None:
        stub = self.owner
        if fault in ("429", "503"):
            return self._send(
                int(fault),
                b"Too many requests, slow down",
                "text/plain",
                {"Retry-After": str(stub.retry_after)},
            )
        if fault == "500":
            return self._send(500, ERROR_PAGE, "text/html")
        if fault == "html":
            return self._send(200, ERROR_PAGE, "text/html")
        if fault == "reset":
            self._reset()
            return None
        if fault == "slow":
            time.sleep(stub.slow_seconds)
        layer = params.get("layer", "ls-dr9")
        if layer not in LAYERS or fault == "text":
            return self._send(200, b"no such layer", "text/html")
        size = min(int(params.get("size", 256)), MAX_SIZE)
        width = min(int(params.get("width", size)), MAX_SIZE)
        height = min(int(params.get("height", size)), MAX_SIZE)
        pixscale = float(params.get("pixscale", 0.262))
        if path.endswith("cutout.jpg"):
            return self._send(200, render_jpeg(ra, dec, pixscale, width, height), "image/jpeg")
        bands = params.get("bands", LAYERS[layer])
        if any(b not in LAYERS[layer] for b in bands) or fault == "wrong_bands":
            bands = LAYERS[layer]  # the viewer's answer to a band it does not know
            if fault == "wrong_bands":
                bands = "gri"
        body = render_fits(ra, dec, bands, pixscale, width, height)
        if fault == "trickle":
            return self._trickle(body)
        if fault == "truncate":
            self.send_response(200)
            self.send_header("Content-Type", "image/fits")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self._reset()
            return 200
        if fault == "short":
            body = body[: len(body) // 2]
        return self._send(200, body, "image/fits")

    def _send(
        self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None
    ) -> int:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()
        return status

    def _trickle(self, body: bytes) -> int:
        """A whole answer announced, sent so slowly that no single read ever times out."""
        stub = self.owner
        self.send_response(200)
        self.send_header("Content-Type", "image/fits")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        stop = time.monotonic() + stub.slow_seconds
        for offset in range(len(body)):
            if time.monotonic() > stop:
                break
            self.wfile.write(body[offset : offset + 1])
            self.wfile.flush()
            time.sleep(stub.trickle_interval)
        self.close_connection = True
        return 200

    def _reset(self) -> None:
        """Close with a TCP reset (SO_LINGER 0), as a crashed proxy does."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()


def max_starts_within(records: list[LoggedRequest], window: float) -> int:
    """The most requests that started within any `window` seconds."""
    starts = sorted(r.start for r in records)
    best, lo = 0, 0
    for hi, start in enumerate(starts):
        while start - starts[lo] >= window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best
