"""GET /classify/sky answers within its deadline (GALMORPH_SKY_DEADLINE_S), whatever the
cutout service does: a long Retry-After, a sleep, a trickle, a Retry-After that is not a
number. A real `galmorph serve` against the loopback stub (tests/support/sky_stub.py), with the
deadline lowered to DEADLINE_S so that each case takes seconds.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest

from galmorph.core.sky.client import (
    CutoutClient,
    CutoutSpec,
    FetchError,
    HostRateLimiter,
    parse_retry_after,
)
from galmorph.core.sky.options import Politeness
from tests.support.onnx_factory import write_model
from tests.support.server_process import RunningServer, serve
from tests.support.sky_stub import SkyStub, render_fits

pytestmark = pytest.mark.slow

ROUTE = "/classify/sky"
DEADLINE_S = 3.0
# What the issue allows beyond the deadline, on a busy 2-core machine.
SLACK_S = 2.0
HEALTHY_S = 5.0  # a position the service answers is served within this meanwhile


@pytest.fixture(scope="module")
def stub() -> Iterator[SkyStub]:
    # Sleeps and trickles outlast every deadline here.
    with SkyStub(slow_seconds=30.0, trickle_interval=0.2) as running:
        yield running


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, stub: SkyStub) -> Iterator[RunningServer]:
    work = tmp_path_factory.mktemp("sky_deadline")
    env = {
        "GALMORPH_DECODE_THREADS": "1",
        "GALMORPH_MAX_BATCH_SIZE": "1",
        "GALMORPH_SKY_ENABLED": "true",
        "GALMORPH_CUTOUT_URL": stub.base_url,
        "GALMORPH_CUTOUT_CACHE": str(work / "cache"),
        "GALMORPH_SKY_DEADLINE_S": str(DEADLINE_S),
        # The defaults otherwise (20 s per attempt, 3 attempts): the deadline is what bounds.
    }
    with serve(write_model(work / "model.onnx"), work, env=env) as running:
        yield running


def ask(server: RunningServer, ra: float, dec: float) -> tuple[httpx.Response, float]:
    """The answer and the seconds it took."""
    started = time.monotonic()
    response = httpx.get(f"{server.url}{ROUTE}", params={"ra": ra, "dec": dec}, timeout=60)
    return response, time.monotonic() - started


def ask_with_healthy_meanwhile(
    server: RunningServer, ra: float, dec: float, healthy: tuple[float, float]
) -> tuple[httpx.Response, float, httpx.Response, float]:
    """Ask for (ra, dec); half a second later, for a position the service answers."""
    with ThreadPoolExecutor(1) as pool:
        troubled = pool.submit(ask, server, ra, dec)
        time.sleep(0.5)
        fine, fine_s = ask(server, *healthy)
        response, took = troubled.result()
    return response, took, fine, fine_s


def assert_served(response: httpx.Response, took: float) -> None:
    assert response.status_code == 200, response.text
    assert took < HEALTHY_S, f"a healthy position took {took:.1f} s"


def test_a_retry_after_past_the_deadline_is_our_503_at_once(
    server: RunningServer, stub: SkyStub
) -> None:
    stub.retry_after = 120
    stub.plan[(10.0, 1.0)] = ["429"] * 10
    response, took, fine, fine_s = ask_with_healthy_meanwhile(server, 10.0, 1.0, (10.5, 1.0))
    assert response.status_code == 503, response.text
    assert response.headers["Retry-After"] == "120"
    assert "it asks to wait 120 s, more than the" in response.json()["detail"]
    assert took < 1.5, f"answered after {took:.1f} s, not at once"
    # The 429 paused nobody: the healthy position went straight to the service.
    assert_served(fine, fine_s)
    assert fine.json()["cutout"]["source"] == "fetched"
    assert len([r for r in stub.requests() if r.position == (10.0, 1.0)]) == 1


def test_a_host_pause_lasts_no_longer_than_the_request_that_saw_it(
    server: RunningServer, stub: SkyStub
) -> None:
    # Retry-After 2 fits in the deadline once: the request waits (and the host with it),
    # then a second 429 asks for more than is left and the answer is 503 with it.
    stub.retry_after = 2
    stub.plan[(11.0, 1.0)] = ["429"] * 10
    response, took, fine, fine_s = ask_with_healthy_meanwhile(server, 11.0, 1.0, (11.5, 1.0))
    assert response.status_code == 503, response.text
    assert response.headers["Retry-After"] == "2"
    assert took <= DEADLINE_S + SLACK_S
    assert_served(fine, fine_s)
    first_429 = min(r.start for r in stub.requests() if r.position == (11.0, 1.0))
    (healthy,) = [r for r in stub.requests() if r.position == (11.5, 1.0)]
    assert healthy.start >= first_429 + 1.9, "the healthy request ignored the host's pause"
    # Asked again once that request is answered: no pause is left over.
    again, again_s = ask(server, 11.6, 1.0)
    assert_served(again, again_s)
    assert again_s < 1.5


@pytest.mark.parametrize(("fault", "ra"), [("slow", 12.0), ("trickle", 12.5)])
def test_a_service_that_sleeps_or_trickles_is_504_within_the_deadline(
    server: RunningServer, stub: SkyStub, fault: str, ra: float
) -> None:
    stub.plan[(ra, 1.0)] = [fault] * 10
    response, took, fine, fine_s = ask_with_healthy_meanwhile(server, ra, 1.0, (ra + 0.1, 1.0))
    assert response.status_code == 504, response.text
    assert DEADLINE_S - 0.5 <= took <= DEADLINE_S + SLACK_S, f"answered after {took:.1f} s"
    assert "no complete answer from 127.0.0.1:" in response.json()["detail"]
    assert_served(fine, fine_s)


@pytest.mark.parametrize(("retry_after", "ra"), [("²", 13.0), ("soon, maybe", 13.5)])
def test_a_retry_after_that_is_not_seconds_or_a_date_is_no_500(
    server: RunningServer, stub: SkyStub, retry_after: str, ra: float
) -> None:
    # Not a wait the service asked for: the usual backoff, within the deadline.
    stub.retry_after = retry_after
    stub.plan[(ra, 1.0)] = ["503"] * 10
    response, took = ask(server, ra, 1.0)
    assert response.status_code == 503, response.text
    assert "Retry-After" not in response.headers
    assert response.json()["detail"].startswith("cutout service: HTTP 503 from 127.0.0.1:")
    assert took <= DEADLINE_S + SLACK_S


def test_the_log_has_no_traceback(server: RunningServer) -> None:
    log = server.log()
    assert "Traceback" not in log and " 500" not in log


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("120", 120.0),
        (" 7 ", 7.0),
        ("0", 0.0),
        ("²", None),
        ("1²", None),
        ("١٢", None),  # Arabic-Indic digits: str.isdigit says yes, HTTP says no
        ("-5", None),
        ("1.5", None),
        ("9" * 10, None),  # longer than any real demand
        ("9" * 5000, None),
        ("soon", None),
        ("", None),
        (None, None),
        ("Mon, 99 Foo 2026 99:99:99 GMT", None),
    ],
)
def test_retry_after_takes_ascii_seconds_or_a_date(
    value: str | None, seconds: float | None
) -> None:
    assert parse_retry_after(value) == seconds


def test_retry_after_as_an_http_date() -> None:
    now = datetime(2026, 12, 7, 8, 0, tzinfo=UTC)
    later = format_datetime(now + timedelta(seconds=90), usegmt=True)
    assert parse_retry_after(later, now) == 90.0
    earlier = format_datetime(now - timedelta(seconds=90), usegmt=True)
    assert parse_retry_after(earlier, now) == 0.0
    assert math.isfinite(parse_retry_after("Fri, 31 Dec 9999 23:59:59 GMT", now) or 0)


def busy_once_service() -> tuple[httpx.MockTransport, list[float]]:
    """Each position: first a 429 asking for 1 s, then its cutout; the request times."""
    asked: list[float] = []
    seen: set[str] = set()

    def answer(request: httpx.Request) -> httpx.Response:
        asked.append(time.monotonic())
        ra, dec = float(request.url.params["ra"]), float(request.url.params["dec"])
        if request.url.params["ra"] not in seen:
            seen.add(request.url.params["ra"])
            return httpx.Response(429, headers={"Retry-After": "1"}, text="slow down")
        return httpx.Response(200, content=render_fits(ra, dec, "grz", 0.262, 64, 64))

    return httpx.MockTransport(answer), asked


SPEC = CutoutSpec(base_url="http://cutouts.test/viewer", width=64, height=64)


def test_without_a_deadline_the_client_waits_out_the_retry_after() -> None:
    # The scorer and `galmorph fetch`: patient and polite, as before.
    transport, asked = busy_once_service()

    async def fetch() -> bytes:
        async with CutoutClient(Politeness(), transport=transport) as client:
            return await client.fetch(SPEC.request(20.0, 1.0))

    assert asyncio.run(fetch())[:6] == b"SIMPLE"
    assert len(asked) == 2 and asked[1] - asked[0] >= 1.0


def test_with_a_deadline_a_longer_retry_after_fails_at_once_and_pauses_nobody() -> None:
    transport, asked = busy_once_service()

    async def fetch() -> tuple[FetchError, float, float]:
        async with CutoutClient(Politeness(), transport=transport) as client:
            started = time.monotonic()
            with pytest.raises(FetchError) as refused:
                await client.fetch(SPEC.request(21.0, 1.0), deadline=started + 0.5)
            failed = time.monotonic() - started
            # Another position: the 429 above left no pause behind.
            other = SPEC.request(22.0, 1.0)
            seen = time.monotonic()
            with pytest.raises(FetchError):  # its own first answer is a 429 too
                await client.fetch(other, deadline=seen + 0.5)
            return refused.value, failed, asked[-1] - seen

    error, failed, waited = asyncio.run(fetch())
    assert error.status == 429 and error.retry_after == 1.0 and not error.retryable
    assert failed < 0.4 and waited < 0.4


def test_a_host_pause_past_the_deadline_refuses_at_once_with_the_wait() -> None:
    async def wait() -> tuple[float, float]:
        limiter = HostRateLimiter(rate=4.0)
        limiter.pause("cutouts.test", 5.0)
        started = time.monotonic()
        with pytest.raises(FetchError) as refused:
            await limiter.wait("cutouts.test", deadline=started + 1.0)
        assert refused.value.retry_after is not None
        return time.monotonic() - started, refused.value.retry_after

    took, retry_after = asyncio.run(wait())
    assert took < 0.1 and 4.5 < retry_after <= 5.0
