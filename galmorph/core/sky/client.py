"""Cutouts by sky position from the Legacy Survey viewer's cutout service, checked and cached.

The service (legacysurvey/imagine: `get_cutout` in map/views.py, routes in map/urls.py):

    GET {base}/cutout.fits?ra=RA&dec=DEC&layer=ls-dr10&pixscale=0.262&size=256&bands=grz
    GET {base}/cutout.jpg?...        the viewer's own RGB rendering

`ra`, `dec` in degrees (without them: 400 "Need ra,dec keywords"); `pixscale` in arcsec/px
(default 0.262); `size` (default 256), or `width` and `height`, each silently cut to 3000;
`bands` one letter each. Quirks a client must catch: an unknown band makes the viewer return
all of the layer's bands; an unknown layer is an HTTP 200 whose body is the text "no such
layer"; a position off the footprint is a server error (500). A FITS cutout is a float32
(nbands, H, W) cube in nanomaggies, (H, W) for one band, with BANDS/BANDn and a TAN WCS
centred on (ra, dec) (DESIGN.md section 4).

Defaults come from the model's InputSpec (its card's) so that the service returns exactly the
field the model sees: size = input_size, pixscale = pixel_scale, bands = its bands (grz),
layer ls-dr10; `CutoutOptions` (galmorph.core.sky.options) overrides any of them, `base_url`
points at a mirror or a stub.

Every response is checked before it is cached or used (`verify_cutout`): status 200 and a body
that parses as the requested format (FITS through fits_io.read_fits under DecodeLimits) with
the requested shape. An HTML error page or a truncated FITS is a failed fetch, never a
classification.

Politeness (`Politeness`, galmorph.core.sky.options): at most `concurrency` requests in
flight; request starts spaced by 1/`rate` seconds per host; a User-Agent naming galmorph.
Retries (tenacity): connection errors, timeouts, 408, 429, 5xx and FITS bodies cut short, up
to `attempts` tries, waiting with exponential backoff plus jitter; a Retry-After (429/503) is
honoured and holds back every request to that host, up to `max_retry_after` (a longer demand
fails the fetch rather than come back early). Other 4xx statuses and text bodies fail at once.
A server passes each request's deadline: no wait or attempt outlasts it, and a Retry-After
longer than the time left fails the fetch at once without holding the host back.

`CutoutFetcher` puts the disk cache (galmorph.core.sky.cache) in front of the client: the
cache first, the service for what is missing (never twice for one cutout at a time), nothing
but the cache when offline. One fetcher serves a whole process: a scoring run, `galmorph
fetch`, or a server (one per app lifespan, `read` per request).
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import hashlib
import math
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlencode, urlsplit

import httpx
from astropy.io import fits
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt
from tenacity.stop import stop_base
from tenacity.wait import wait_exponential, wait_random

from galmorph.core.cutouts import formats
from galmorph.core.cutouts.fits_io import BLOCK, CARD, MAX_HEADER_BLOCKS, read_fits
from galmorph.core.cutouts.limits import CutoutError, CutoutErrorKind, DecodeLimits
from galmorph.core.cutouts.raster_io import read_raster
from galmorph.core.inputspec import LEGACY_SURVEY_PIXEL_SCALE, InputSpec, canonical_scale
from galmorph.core.sky.cache import CutoutCache
from galmorph.core.sky.options import (
    DEFAULT_LAYER,
    IMAGE_FORMATS,
    LEGACY_SURVEY_VIEWER,
    MAX_SIDE,
    CutoutOptions,
    Politeness,
    decimal_text,
)

# Positions are sent rounded to 1e-7 degree (0.36 mas, a thousandth of a pixel), so float noise
# from unit conversions maps to one request and one cache entry.
COORDINATE_DECIMALS = 7
BAND_ORDER = "ugrizY"  # wavelength order, the order the viewer's `bands` lists them in
_SNIPPET_CHARS = 160
_SEXAGESIMAL = re.compile(r"\d\s*[:hdms°'\"]\s*\d|\d\s+\d")
RETRY_AFTER_DIGITS = 9  # delay-seconds up to 31 years
_DELAY_SECONDS = re.compile(rf"[0-9]{{1,{RETRY_AFTER_DIGITS}}}")


# ---------------------------------------------------------------- positions


def check_position(ra: float, dec: float) -> tuple[float, float]:
    """(ra, dec) in degrees with RA wrapped into [0, 360); ValueError naming a bad value.

    RA in [-180, 0) is accepted (catalogs centred on RA 0 use it) and wrapped. Rounded before
    wrapping, so 359.99999999 is 0.0, never 360.0 (which the service refuses).
    """
    ra, dec = float(ra), float(dec)
    if not (math.isfinite(ra) and math.isfinite(dec)):
        raise ValueError(
            f"ra, dec must be finite degrees, got {decimal_text(ra)}, {decimal_text(dec)}"
        )
    if not -90.0 <= dec <= 90.0:
        raise ValueError(f"dec {decimal_text(dec)} is outside [-90, 90] degrees")
    if not -180.0 <= ra <= 360.0:
        raise ValueError(f"ra {decimal_text(ra)} is outside [0, 360] degrees")
    # + 0.0: -0.0 (a tiny negative rounded) is the same position and request as 0.0
    ra = round(round(ra, COORDINATE_DECIMALS) % 360.0, COORDINATE_DECIMALS) + 0.0
    return ra, round(dec, COORDINATE_DECIMALS) + 0.0


def looks_sexagesimal(text: str) -> bool:
    """'12:30:49.4', '12h30m49s', '+12 23 28': hours/degrees with minutes and seconds."""
    return bool(_SEXAGESIMAL.search(text))


def parse_degrees(value: str | float, what: str) -> float:
    """A coordinate given as text or a number, in decimal degrees; sexagesimal is refused."""
    if isinstance(value, int | float):
        return float(value)
    text = str(value).strip()
    try:
        return float(text)
    except ValueError:
        if looks_sexagesimal(text):
            raise ValueError(
                f"{what} {text!r} is sexagesimal; galmorph takes decimal degrees: convert "
                "first, e.g. astropy.coordinates.SkyCoord(ra, dec, unit=(u.hourangle, u.deg))"
            ) from None
        raise ValueError(f"{what} {text!r} is not a number of degrees") from None


# ---------------------------------------------------------------- what to ask for


def survey_bands(spec: InputSpec) -> str:
    """The survey bands the model's colour mapping uses, in wavelength order ('grz')."""
    used = set(spec.bands.values())
    return "".join(sorted(used, key=lambda b: (b not in BAND_ORDER, BAND_ORDER.find(b), b)))


@dataclass(frozen=True)
class CutoutSpec:
    """Everything in a cutout request except the position."""

    base_url: str = LEGACY_SURVEY_VIEWER
    layer: str = DEFAULT_LAYER
    bands: str = "grz"
    pixscale: float = LEGACY_SURVEY_PIXEL_SCALE
    width: int = 256
    height: int = 256
    image_format: str = "fits"

    def __post_init__(self) -> None:
        url = urlsplit(self.base_url)
        if url.scheme not in ("http", "https") or not url.netloc or url.query:
            raise ValueError(f"cutout base URL must be http(s)://host/path, got {self.base_url!r}")
        if not self.layer or not re.fullmatch(r"[\w.+-]+", self.layer):
            raise ValueError(f"layer must be a name like 'ls-dr10', got {self.layer!r}")
        if not self.bands or not self.bands.isalpha() or len(set(self.bands)) != len(self.bands):
            raise ValueError(
                f"bands must be distinct one-letter names like 'grz', got {self.bands!r}"
            )
        if not (math.isfinite(self.pixscale) and self.pixscale > 0):
            raise ValueError(f"pixscale must be a positive number of arcsec, got {self.pixscale}")
        # frozen: the one place a scale from a model or --pixscale becomes the canonical one
        object.__setattr__(self, "pixscale", canonical_scale(self.pixscale))
        for name, side in (("width", self.width), ("height", self.height)):
            if not 1 <= side <= MAX_SIDE:
                raise ValueError(
                    f"cutout {name} {side} is outside 1..{MAX_SIDE} (the service cuts larger "
                    f"requests to {MAX_SIDE} pixels without saying so)"
                )
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(
                f"image format {self.image_format!r} is not one of {', '.join(IMAGE_FORMATS)}"
            )

    @classmethod
    def for_input(cls, spec: InputSpec, options: CutoutOptions | None = None) -> CutoutSpec:
        """The request that returns exactly the model's field: its size at its pixel scale."""
        options = options or CutoutOptions()
        height, width = spec.input_size
        if options.size is not None:
            height = width = options.size
        return cls(
            base_url=options.base_url.rstrip("/"),
            layer=options.layer,
            bands=options.bands or survey_bands(spec),
            pixscale=spec.pixel_scale if options.pixscale is None else options.pixscale,
            width=width,
            height=height,
            image_format=options.image_format,
        )

    @property
    def endpoint(self) -> str:
        return f"{self.base_url.rstrip('/')}/{IMAGE_FORMATS[self.image_format][0]}"

    @property
    def suffix(self) -> str:
        return IMAGE_FORMATS[self.image_format][1]

    @property
    def expected_shape(self) -> tuple[int, ...]:
        """The shape a valid answer decodes to (fits_io / raster_io `original_shape`)."""
        if self.image_format == "jpeg":
            return (self.height, self.width, 3)
        if len(self.bands) == 1:
            return (self.height, self.width)
        return (len(self.bands), self.height, self.width)

    def plausible_size(self, size: int) -> bool:
        """A cheap check of a stored file's size: a FITS file is whole 2880-byte blocks."""
        if self.image_format == "fits":
            return size > 0 and size % BLOCK == 0
        return size > 0

    def request(self, ra: float, dec: float) -> CutoutRequest:
        """The request for one position; ValueError for coordinates that are not degrees."""
        ra, dec = check_position(ra, dec)
        return CutoutRequest(self, ra, dec)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class CutoutRequest:
    """One cutout: the spec plus a checked position (made by CutoutSpec.request)."""

    spec: CutoutSpec
    ra: float
    dec: float

    def params(self) -> dict[str, str]:
        """Query parameters in the order the service's documentation writes them."""
        spec = self.spec
        params = {
            "ra": decimal_text(self.ra),
            "dec": decimal_text(self.dec),
            "layer": spec.layer,
            "pixscale": decimal_text(spec.pixscale),
        }
        if spec.width == spec.height:
            params["size"] = str(spec.width)
        else:
            params["width"], params["height"] = str(spec.width), str(spec.height)
        params["bands"] = spec.bands
        return params

    @property
    def url(self) -> str:
        return f"{self.spec.endpoint}?{urlencode(self.params())}"

    @property
    def host(self) -> str:
        return urlsplit(self.spec.base_url).netloc

    @property
    def key(self) -> str:
        """Cache key: every request parameter, base URL and endpoint included."""
        return hashlib.sha256(self.url.encode()).hexdigest()


# ---------------------------------------------------------------- checking an answer


class FetchError(Exception):
    """A cutout that could not be had; `status` is the HTTP status when there was one,
    `no_answer` is true when no complete answer came (a timeout or a transport error)."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        retryable: bool = False,
        retry_after: float | None = None,
        no_answer: bool = False,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.retryable = retryable
        self.retry_after = retry_after
        self.no_answer = no_answer
        self.attempts = 1

    def __str__(self) -> str:
        if self.attempts > 1:
            return f"{self.message} (after {self.attempts} attempts)"
        return self.message


def _snippet(data: bytes) -> str:
    """The start of a text body, tags stripped, on one line: what an error page says."""
    text = data[:4096].decode("utf-8", "replace")
    text = re.sub(r"<(script|style|head)\b.*?</\1>|<[^>]*>", " ", text, flags=re.S | re.I)
    text = " ".join(text.split())
    return text[:_SNIPPET_CHARS] or "(empty body)"


def _what(data: bytes) -> str:
    fmt = formats.identify(data)
    if fmt is not None:
        return fmt.label
    known = formats.identify_unsupported(data)
    if known is not None:
        return known
    try:
        data[:1024].decode("utf-8")
    except UnicodeDecodeError:
        return "binary data"
    return "HTML" if b"<" in data[:1024] else "text"


def verify_cutout(data: bytes, spec: CutoutSpec, limits: DecodeLimits = DecodeLimits()) -> None:  # noqa: B008
    """Raise FetchError unless `data` is the cutout `spec` asks for (format, shape, bands).

    A FITS body cut short (not whole 2880-byte blocks) is retryable; text, another format, or
    a whole FITS of the wrong shape or bands is not: asking again gets the same answer.
    """
    if not data:
        raise FetchError("empty body", retryable=True)
    fmt = formats.identify(data)
    wanted = "FITS" if spec.image_format == "fits" else "JPEG"
    if fmt is None or fmt.name != spec.image_format:
        what = _what(data)
        detail = f": {_snippet(data)}" if what in ("HTML", "text") else ""
        raise FetchError(f"the body is {what}, not a {wanted} cutout{detail}")
    try:
        if spec.image_format == "fits":
            shape = read_fits(data, limits).original_shape
        else:
            shape = tuple(int(s) for s in read_raster(data, fmt, limits).image.shape)
    except CutoutError as exc:
        cut_short = spec.image_format == "jpeg" or _fits_cut_short(data)
        raise FetchError(
            f"unreadable {wanted} ({len(data)} bytes): {exc.message}",
            retryable=cut_short and exc.kind is CutoutErrorKind.INVALID,
        ) from None
    if shape != spec.expected_shape:
        raise FetchError(
            f"{wanted} of shape {shape}, expected {spec.expected_shape} for bands "
            f"{spec.bands!r} at {spec.width}x{spec.height} (the layer may lack a band)"
        )


def _fits_cut_short(data: bytes) -> bool:
    """Whether the primary HDU declares more header or data than `data` holds (a transfer
    cut short, worth another try), as opposed to a whole file that is wrong."""
    for end in range(0, min(len(data), MAX_HEADER_BLOCKS * BLOCK), CARD):
        if data[end : end + 8] == b"END     ":
            break
    else:
        return True
    try:
        header = fits.Header.fromstring(data[: end + CARD].decode("ascii"))
        axes = [int(header[f"NAXIS{i}"]) for i in range(1, int(header.get("NAXIS", 0)) + 1)]
        values = math.prod(axes) if axes else 0
        declared = abs(int(header.get("BITPIX", 8))) // 8 * values
    except (KeyError, ValueError, UnicodeDecodeError):
        return True
    return len(data) < -(-(end + CARD) // BLOCK) * BLOCK + declared


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds from a Retry-After header: delay-seconds or an HTTP date; None if absent/bad.

    ASCII digits only (str.isdigit also takes '²', which float() refuses), at most
    RETRY_AFTER_DIGITS of them: a longer number is garbage, not a real demand.
    """
    if not value:
        return None
    value = value.strip()
    if _DELAY_SECONDS.fullmatch(value):
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


# ---------------------------------------------------------------- the polite client


class HostRateLimiter:
    """Request starts spaced by 1/rate seconds per host; `pause` holds a host back."""

    def __init__(self, rate: float) -> None:
        self._interval = 1.0 / rate
        self._next: dict[str, float] = {}
        self._paused_until: dict[str, float] = {}

    async def wait(self, host: str, deadline: float = math.inf) -> None:
        """Until this caller may start a request; a FetchError carrying the wait as its
        retry_after when that would be past `deadline` (time.monotonic())."""
        while True:
            now = time.monotonic()
            slot = max(now, self._next.get(host, now), self._paused_until.get(host, now))
            if slot > deadline:
                raise FetchError(
                    f"requests to {host} are held back {slot - now:.1f} s more (its "
                    "Retry-After, the rate limit), past this request's deadline",
                    retry_after=slot - now,
                )
            self._next[host] = slot + self._interval
            if slot > now:
                await asyncio.sleep(slot - now)
            # A pause that arrived while this caller slept pushes it behind the pause.
            if self._paused_until.get(host, 0.0) <= time.monotonic():
                return

    def pause(self, host: str, seconds: float) -> None:
        until = time.monotonic() + seconds
        self._paused_until[host] = max(self._paused_until.get(host, 0.0), until)


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, FetchError) and exc.retryable


def _time_left(deadline: float) -> float:
    return deadline - time.monotonic()


class _SleepPastDeadline(stop_base):
    """tenacity stop: the next wait would end after the deadline (no try could follow)."""

    def __init__(self, deadline: float) -> None:
        self._deadline = deadline

    def __call__(self, state: RetryCallState) -> bool:
        return state.upcoming_sleep >= _time_left(self._deadline)


class _Backoff:
    """tenacity wait: the server's Retry-After when it gave one, else exponential + jitter."""

    def __init__(self, politeness: Politeness) -> None:
        self._exponential = wait_exponential(
            multiplier=politeness.backoff, max=politeness.max_backoff
        ) + wait_random(0, politeness.backoff)

    def __call__(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome is not None else None
        if isinstance(exc, FetchError) and exc.retry_after is not None:
            return exc.retry_after
        return float(self._exponential(state))


async def _read_capped(response: httpx.Response, cap: int, *, truncate: bool = False) -> bytes:
    """The body, refusing (or with `truncate`, cutting) past `cap` bytes."""
    parts: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        parts.append(chunk)
        size += len(chunk)
        if size > cap:
            if truncate:
                break
            raise FetchError(f"the body exceeds {cap} bytes, the limit for a cutout")
    return b"".join(parts)[:cap] if truncate else b"".join(parts)


class CutoutClient:
    """The service over HTTP: bounded, rate-limited, retrying; an async context manager."""

    def __init__(
        self,
        politeness: Politeness = Politeness(),  # noqa: B008 (frozen dataclass: safe default)
        *,
        limits: DecodeLimits = DecodeLimits(),  # noqa: B008 (frozen dataclass: safe default)
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.politeness = politeness
        self.limits = limits
        self._transport = transport
        self._http: httpx.AsyncClient | None = None
        self._slots = asyncio.Semaphore(politeness.concurrency)
        self._rate = HostRateLimiter(politeness.rate)
        self.requests_sent = 0

    async def __aenter__(self) -> CutoutClient:
        p = self.politeness
        self._http = httpx.AsyncClient(
            headers={"User-Agent": p.user_agent},
            timeout=httpx.Timeout(p.timeout),
            limits=httpx.Limits(
                max_connections=p.concurrency, max_keepalive_connections=p.concurrency
            ),
            follow_redirects=True,
            transport=self._transport,
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def fetch(self, request: CutoutRequest, deadline: float = math.inf) -> bytes:
        """The verified cutout; FetchError (with .status, .attempts) when it cannot be had.

        With a `deadline` (time.monotonic(); a server answering a client) every wait and
        attempt ends by it: no retry that could not finish in time, and a Retry-After longer
        than the time left fails at once, without holding the host back for later requests.
        """
        p = self.politeness
        retrying = AsyncRetrying(
            stop=stop_after_attempt(p.attempts) | _SleepPastDeadline(deadline),
            wait=_Backoff(p),
            retry=retry_if_exception(_retryable),
            reraise=True,
        )
        data = b""
        try:
            async for attempt in retrying:
                with attempt:
                    data = await self._attempt(request, deadline)
        except FetchError as exc:
            exc.attempts = int(retrying.statistics.get("attempt_number", 1))
            raise
        return data

    async def _attempt(self, request: CutoutRequest, deadline: float) -> bytes:
        if self._http is None:
            raise RuntimeError("CutoutClient used outside `async with`")
        host = request.host
        try:
            async with asyncio.timeout(None if deadline == math.inf else _time_left(deadline)):
                await self._slots.acquire()
        except TimeoutError:
            raise FetchError(
                f"all {self.politeness.concurrency} connections to {host} stayed busy until "
                "this request's deadline",
                no_answer=True,
            ) from None
        try:
            await self._rate.wait(host, deadline)
            self.requests_sent += 1
            limit = min(self.politeness.timeout, _time_left(deadline))
            try:
                async with (
                    asyncio.timeout(limit),
                    self._http.stream("GET", request.url) as response,
                ):
                    if response.status_code != 200:
                        head = await _read_capped(response, 4096, truncate=True)
                        raise self._status_error(response, head, host, deadline)
                    data = await _read_capped(response, self.limits.max_bytes)
            except httpx.TransportError as exc:
                detail = str(exc) or "no detail"
                raise FetchError(
                    f"{type(exc).__name__} from {host}: {detail}", retryable=True, no_answer=True
                ) from None
            except TimeoutError:
                raise FetchError(
                    f"no complete answer from {host} within {max(limit, 0.0):.3g} s",
                    retryable=True,
                    no_answer=True,
                ) from None
        finally:
            self._slots.release()
        verify_cutout(data, request.spec, self.limits)
        return data

    def _status_error(
        self, response: httpx.Response, head: bytes, host: str, deadline: float
    ) -> FetchError:
        status = response.status_code
        message = f"HTTP {status} from {host}: {_snippet(head)}"
        retryable = status in (408, 429) or status >= 500
        retry_after = None
        if status in (429, 503):
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
        if retry_after is not None:
            most, left = self.politeness.max_retry_after, _time_left(deadline)
            if retry_after > min(most, left):
                reason = (
                    f"over the {most:g} s limit"
                    if retry_after > most
                    else f"more than the {left:.1f} s this request has left"
                )
                return FetchError(
                    f"{message}; it asks to wait {retry_after:g} s, {reason}",
                    status=status,
                    retry_after=retry_after,
                )
            self._rate.pause(host, retry_after)
        return FetchError(message, status=status, retryable=retryable, retry_after=retry_after)


# ---------------------------------------------------------------- the cache in front


@dataclass(frozen=True)
class FetchOutcome:
    """Where one position's cutout ended up: a cache entry, or why not."""

    request: CutoutRequest
    path: Path | None  # the cache entry; None when it failed
    source: str  # "cached" | "fetched" | "failed"
    error: str | None = None  # FetchError text when failed


class CutoutFetcher:
    """The cache first, then the service; an async context manager, one per process.

    `ensure` / `ensure_many` make positions present in the cache (the scorer, `galmorph
    fetch`): a cache hit costs one stat, or with verify=True a full check of the content.
    `read` returns verified bytes (a server route). Concurrent asks for one cutout share one
    download. Offline, no HTTP client exists at all: a miss is a FetchError.
    """

    def __init__(
        self,
        spec: CutoutSpec,
        cache: CutoutCache,
        politeness: Politeness = Politeness(),  # noqa: B008 (frozen dataclass: safe default)
        *,
        offline: bool = False,
        limits: DecodeLimits = DecodeLimits(),  # noqa: B008
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.spec = spec
        self.cache = cache
        self.offline = offline
        self.limits = limits
        self.client = (
            None if offline else CutoutClient(politeness, limits=limits, transport=transport)
        )
        self._inflight: dict[str, asyncio.Future[tuple[Path, bytes]]] = {}
        self._verify = functools.partial(verify_cutout, spec=spec, limits=limits)

    async def __aenter__(self) -> CutoutFetcher:
        if self.client is not None:
            await self.client.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self.client is not None:
            await self.client.aclose()

    @property
    def requests_sent(self) -> int:
        return 0 if self.client is None else self.client.requests_sent

    async def read(self, ra: float, dec: float, deadline: float = math.inf) -> tuple[bytes, str]:
        """Verified cutout bytes and "cached" or "fetched"; FetchError, or ValueError for a
        position that is not degrees. A download is over by `deadline` (CutoutClient.fetch);
        one already under way for this cutout is joined, on the deadline it started with."""
        request = self.spec.request(ra, dec)
        data = await asyncio.to_thread(self.cache.read, request.key, self.spec.suffix, self._verify)
        if data is not None:
            return data, "cached"
        _, data = await self._download_once(request, deadline)
        return data, "fetched"

    async def ensure(self, ra: float, dec: float, *, verify: bool = False) -> FetchOutcome:
        """Make the cutout present in the cache; failures are outcomes, not exceptions
        (ValueError still for a position that is not degrees)."""
        request = self.spec.request(ra, dec)
        if verify:
            hit = await asyncio.to_thread(
                self.cache.read, request.key, self.spec.suffix, self._verify
            )
            path = None if hit is None else self.cache.path(request.key, self.spec.suffix)
        else:
            path = self.cache.lookup(request.key, self.spec.suffix, self.spec.plausible_size)
        if path is not None:
            return FetchOutcome(request, path, "cached")
        joined = request.key in self._inflight
        try:
            path, _ = await self._download_once(request)
        except FetchError as exc:
            return FetchOutcome(request, None, "failed", str(exc))
        except Exception as exc:  # one cutout never stops a catalog (a full disk, a bug)
            return FetchOutcome(request, None, "failed", f"{type(exc).__name__}: {exc}")
        return FetchOutcome(request, path, "cached" if joined else "fetched")

    async def ensure_many(
        self,
        positions: Iterable[tuple[float, float]],
        *,
        verify: bool = False,
        on_outcome: Callable[[FetchOutcome], None] | None = None,
    ) -> list[FetchOutcome]:
        """ensure() for every position at once (the client bounds the concurrency), in order."""

        async def one(ra: float, dec: float) -> FetchOutcome:
            outcome = await self.ensure(ra, dec, verify=verify)
            if on_outcome is not None:
                on_outcome(outcome)
            return outcome

        return list(await asyncio.gather(*(one(ra, dec) for ra, dec in positions)))

    async def _download_once(
        self, request: CutoutRequest, deadline: float = math.inf
    ) -> tuple[Path, bytes]:
        if self.client is None:
            raise FetchError(f"offline, and not in the cache {self.cache.root}: {request.url}")
        key = request.key
        future = self._inflight.get(key)
        if future is None:
            future = asyncio.ensure_future(self._download(request, deadline))
            self._inflight[key] = future
            future.add_done_callback(lambda _: self._inflight.pop(key, None))
        # shield: one waiter cancelled (a client gone away) must not cancel the shared download
        return await asyncio.shield(future)

    async def _download(self, request: CutoutRequest, deadline: float) -> tuple[Path, bytes]:
        assert self.client is not None
        data = await self.client.fetch(request, deadline)
        path = await asyncio.to_thread(self.cache.put, request.key, self.spec.suffix, data)
        return path, data
