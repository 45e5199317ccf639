"""HTTP status codes for the core's refusals: the kinds are the core's, the codes are HTTP's."""

from __future__ import annotations

from galmorph.core.cutouts.limits import CutoutError, CutoutErrorKind

STATUS_BY_KIND = {
    CutoutErrorKind.TOO_LARGE: 413,
    CutoutErrorKind.UNSUPPORTED: 415,
    CutoutErrorKind.INVALID: 422,
}


def cutout_status(exc: CutoutError) -> int:
    return STATUS_BY_KIND[exc.kind]
