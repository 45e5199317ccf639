"""The error type and size limits for untrusted cutouts (shared by every decoder module)."""

from __future__ import annotations

from dataclasses import dataclass

MIB = 2**20


class CutoutError(Exception):
    """A cutout the service refuses, with the HTTP status that says why.

    413: larger than the limits (body, declared pixels, decompressed size);
    415: not a supported format; 422: a supported format that is corrupt, truncated or unusable.
    """

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message

    def __repr__(self) -> str:
        return f"CutoutError({self.status_code}, {self.message!r})"


@dataclass(frozen=True)
class DecodeLimits:
    """Limits checked before the pixel data is read or decompressed."""

    max_bytes: int = 64 * MIB  # encoded size (request body or file on disk); Triton's default
    max_pixels: int = 4096 * 4096 * 4  # declared pixel count, all planes of a cube included
    max_side: int = 8192  # any declared image axis (FITS NAXISn, PNG/JPEG width/height)
    # Bytes a gzip stream may expand to (headers + data + skipped extensions): a 4-plane
    # float32 3000x3000 Legacy Survey cube is 144 MiB.
    max_decompressed_bytes: int = 256 * MIB

    def check_encoded_size(self, size: int) -> None:
        if size > self.max_bytes:
            raise CutoutError(
                413, f"file is {size} bytes, over the limit of {self.max_bytes} bytes"
            )

    def check_declared_shape(self, shape: tuple[int, ...], what: str) -> None:
        """Refuse (413) an image whose header declares too many pixels or too long a side."""
        if any(side > self.max_side for side in shape):
            raise CutoutError(
                413, f"{what} declares shape {shape}: a side exceeds the limit of {self.max_side}"
            )
        pixels = 1
        for side in shape:
            pixels *= side
        if pixels > self.max_pixels:
            raise CutoutError(
                413,
                f"{what} declares shape {shape} = {pixels} pixels, "
                f"over the limit of {self.max_pixels}",
            )
