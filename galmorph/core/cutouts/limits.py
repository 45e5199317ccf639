"""The error type, size limits and memory reservation for untrusted cutouts (shared by every
decoder module)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

MIB = 2**20

Reserve = Callable[[int, str], None]
"""`reserve(nbytes, what)`: a decoder calls it with the most memory it is about to use, after
reading the headers and before reading or decompressing any pixel. A caller that bounds the
memory of decodes running at once (the server's decode budget) raises from it to refuse the
decode; the reservation lasts until the caller's decode call returns. Repeated calls add up."""


def reserve_nothing(nbytes: int, what: str) -> None:
    """The default `Reserve`: no budget, every decode may go ahead."""


class CutoutErrorKind(StrEnum):
    """Why a cutout is refused. The HTTP layer maps kinds to status codes; the scorer writes the
    kind in front of the message of an error row."""

    TOO_LARGE = "too_large"  # over a limit: bytes, declared pixels, decompressed size
    UNSUPPORTED = "unsupported"  # not a format galmorph reads
    INVALID = "invalid"  # a supported format that is corrupt, truncated or unusable


class CutoutError(Exception):
    """A cutout galmorph refuses, with the kind of refusal and a message naming the problem."""

    def __init__(self, kind: CutoutErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message

    def __repr__(self) -> str:
        return f"CutoutError({self.kind.value}, {self.message!r})"


@dataclass(frozen=True)
class DecodeLimits:
    """Limits checked before the pixel data is read or decompressed."""

    max_bytes: int = 64 * MIB  # encoded size (request body or file on disk); Triton's default
    max_pixels: int = 4096 * 4096 * 4  # declared pixel count, all planes of a cube included
    max_side: int = 8192  # any declared image axis (FITS NAXISn, PNG/JPEG width/height)
    # Bytes a gzip stream may expand to (headers + data + skipped extensions): a 4-plane
    # float32 3000x3000 Legacy Survey cube is 144 MiB.
    max_decompressed_bytes: int = 256 * MIB
    # FITS structure walked before the image is found: a Legacy Survey cutout has 1-3 HDUs,
    # an HST exposure 4-7 with ~1600 header cards each. Tens of thousands of empty extensions
    # would otherwise cost seconds of header parsing for a few hundred KB of gzip.
    max_fits_hdus: int = 64
    max_fits_header_cards: int = 36_000  # all headers walked together (each one: 7200)
    # Scans of one JPEG: libjpeg writes 10 for a progressive colour image (6 grey) and each
    # scan costs a pass over the whole image's coefficients whatever scale is decoded, so a
    # few hundred KB repeating a tiny scan cost over a minute of CPU at 8192^2.
    max_jpeg_scans: int = 32
    # Reading a cutout file from disk (the scorer): longer is an error row, not a stalled run.
    read_timeout_s: float = 60.0

    def check_encoded_size(self, size: int) -> None:
        if size > self.max_bytes:
            raise CutoutError(
                CutoutErrorKind.TOO_LARGE,
                f"file is {size} bytes, over the limit of {self.max_bytes} bytes",
            )

    def check_declared_shape(self, shape: tuple[int, ...], what: str) -> None:
        """Refuse (413) an image whose header declares too many pixels or too long a side."""
        if any(side > self.max_side for side in shape):
            raise CutoutError(
                CutoutErrorKind.TOO_LARGE,
                f"{what} declares shape {shape}: a side exceeds the limit of {self.max_side}",
            )
        pixels = 1
        for side in shape:
            pixels *= side
        if pixels > self.max_pixels:
            raise CutoutError(
                CutoutErrorKind.TOO_LARGE,
                f"{what} declares shape {shape} = {pixels} pixels, "
                f"over the limit of {self.max_pixels}",
            )
