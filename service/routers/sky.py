"""GET /classify/sky: classify the galaxy at a sky position, from the Legacy Survey cutout
service (off unless GALMORPH_SKY_ENABLED; galmorph.service.sky has the fetcher).

The cutout asked for is the model's field (its input size at its pixel scale, its bands), read
from the server's cutout cache or fetched, checked, and cached; then it takes the same decode,
queue and inference as an upload to /classify. The whole request is answered within
`sky_deadline_s`: the fetch ends by it (galmorph.core.sky.client.CutoutClient.fetch), and decode,
queue and inference get what is left of it (at most `request_timeout_s`, as an upload).
"""

from __future__ import annotations

import asyncio
import time
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, Request

from galmorph.core.cutouts.limits import CutoutError
from galmorph.core.sky.client import FetchError, check_position, parse_degrees
from galmorph.service.data_plane import OptionsDep, PlaneDep
from galmorph.service.decoding import DecodeBusyError
from galmorph.service.dependencies import require_api_key
from galmorph.service.schemas import (
    ErrorResponse,
    SkyClassificationResult,
    SkyCutout,
    error_responses,
)
from galmorph.service.sky import SkyCutouts, fetch_refusal
from galmorph.service.uploads import Upload

router = APIRouter(tags=["classify"], dependencies=[Depends(require_api_key)])
DEADLINE_GRACE_S = 0.5

ERRORS = {
    **error_responses(401, 422, 502, 504),
    503: {
        "model": ErrorResponse,
        "description": "not ready, queue full or timed out; the cutout service busy, or asking "
        "to wait past this request's deadline (GALMORPH_SKY_DEADLINE_S; with its Retry-After "
        "when it gave one); or offline and the cutout not cached",
    },
}


def get_sky(request: Request) -> SkyCutouts:
    sky: SkyCutouts | None = request.app.state.sky
    if sky is None:
        raise HTTPException(
            404, "GET /classify/sky is off on this server (GALMORPH_SKY_ENABLED=true turns it on)"
        )
    return sky


def sky_position(
    ra: Annotated[
        str,
        Query(description="right ascension in decimal degrees, [-180, 360]", examples=["202.4696"]),
    ],
    dec: Annotated[
        str, Query(description="declination in decimal degrees, [-90, 90]", examples=["47.1952"])
    ],
) -> tuple[float, float]:
    """(ra, dec) in degrees; text, so that sexagesimal gets a message saying how to convert."""
    try:
        return check_position(parse_degrees(ra, "ra"), parse_degrees(dec, "dec"))
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None


SkyDep = Annotated[SkyCutouts, Depends(get_sky)]
PositionDep = Annotated[tuple[float, float], Depends(sky_position)]


@router.get(
    "/classify/sky",
    response_model=SkyClassificationResult,
    responses=ERRORS,
    summary="Classify the galaxy at a sky position (a Legacy Survey cutout, cached)",
)
async def classify_sky(
    sky: SkyDep, position: PositionDep, plane: PlaneDep, options: OptionsDep
) -> SkyClassificationResult:
    settings = plane.settings
    deadline = time.monotonic() + settings.sky_deadline_s
    plane.admit(1)  # a full queue is refused before the cutout service is asked
    fetcher = await sky.fetcher(plane.model.card)
    ra, dec = position
    try:
        # The fetcher stops its own waits and tries at the deadline, with the reason; this
        # bounds the rest (the cache read) with a moment's grace for that answer.
        async with asyncio.timeout(deadline + DEADLINE_GRACE_S - time.monotonic()):
            data, source = await fetcher.read(ra, dec, deadline)
    except FetchError as exc:
        refusal = fetch_refusal(exc, fetcher.offline)
        plane.count(refusal.status_code)
        raise refusal from None
    except TimeoutError:
        plane.count(504)
        raise HTTPException(
            504, f"no cutout within this request's {settings.sky_deadline_s:g} s deadline"
        ) from None
    job = plane.start(options, deadline)
    try:
        item = await job.decode(Upload(data, filename=None, content_type=None))
    except CutoutError as exc:
        # The position was fine and the body passed the fetcher's checks: the service's fault.
        plane.count(502)
        raise HTTPException(
            502, f"the cutout service's cutout is unusable: {exc.message}"
        ) from None
    except DecodeBusyError:
        plane.count(503)
        raise
    (prediction,) = await job.predict([item.cutout.image])
    result = await job.answer(item, prediction)
    spec = fetcher.spec
    cutout = {"url": spec.request(ra, dec).url, "source": source, "ra": ra, "dec": dec}
    return SkyClassificationResult(
        **dict(result), cutout=SkyCutout.model_validate({**cutout, **spec.to_dict()})
    )
