"""What a user chooses about cutouts fetched by sky position: the service and its politeness.

Import-light on purpose (no HTTP or FITS libraries): the command line builds its --help from
these defaults, and `galmorph --help` must stay instant. The client is galmorph.core.sky.client.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from galmorph.core.version import __version__

LEGACY_SURVEY_VIEWER = "https://www.legacysurvey.org/viewer"
DEFAULT_LAYER = "ls-dr10"
MAX_SIDE = 3000  # the viewer's `maxsize`: larger sizes are cut to it without a word
# image format -> (endpoint under the base URL, cache file suffix)
IMAGE_FORMATS = {"fits": ("cutout.fits", ".fits"), "jpeg": ("cutout.jpg", ".jpg")}
USER_AGENT = f"galmorph/{__version__} (galaxy morphology classifier; batch cutout client)"


def decimal_text(value: float) -> str:
    """The one text form of a coordinate or pixel scale in URLs, cache keys and messages.

    The shortest digits that read back as the same float, as repr gives them (so keys made by
    earlier versions for ordinary values stay the same), but never an exponent, which the
    cutout service does not parse ('1e-07' -> '0.0000001'), and never '-0.0'.
    """
    text = repr(float(value) + 0.0)  # + 0.0 turns -0.0 into 0.0
    if "e" not in text:
        return text
    text = format(Decimal(text), "f")
    return text if "." in text else f"{text}.0"


@dataclass(frozen=True)
class CutoutOptions:
    """What to ask the service for; None takes the value from the model's InputSpec."""

    base_url: str = LEGACY_SURVEY_VIEWER
    layer: str = DEFAULT_LAYER
    bands: str | None = None  # None: the model's bands (grz)
    pixscale: float | None = None  # arcsec/px; None: the model's pixel_scale
    size: int | None = None  # pixels (square); None: the model's input_size
    image_format: str = "fits"  # or "jpeg": the viewer's own rendering


@dataclass(frozen=True)
class Politeness:
    """How hard galmorph may lean on a cutout service."""

    concurrency: int = 4  # requests in flight
    rate: float = 4.0  # request starts per second, per host
    timeout: float = 60.0  # seconds for one attempt, connection to last byte
    attempts: int = 5  # tries per cutout, the first included
    backoff: float = 1.0  # first retry wait (s); doubles each retry, plus up to this of jitter
    max_backoff: float = 60.0
    max_retry_after: float = 300.0  # a longer Retry-After fails the fetch
    user_agent: str = USER_AGENT

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.attempts < 1:
            raise ValueError("concurrency and attempts must be at least 1")
        if not (self.rate > 0 and self.timeout > 0):
            raise ValueError("rate and timeout must be positive")
        if self.backoff < 0 or self.max_backoff < 0 or self.max_retry_after < 0:
            raise ValueError("backoff and retry-after limits must not be negative")
