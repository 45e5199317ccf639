"""The cutout formats galmorph reads: one registry for the decoder, the HTTP service, the web
page, the CLI and the batch scorer.

A format is recognised by its magic bytes; file suffixes and content types are only hints (a
mismatch is a warning, see `galmorph.core.cutouts.decode`). Everything that lists formats (the 415
message, the OpenAPI description, the page's file-input `accept` list, the scorer's folder
scan) asks this module at the time it needs the list, so an entry added here appears
everywhere; decoding it needs only a `Reader` that can read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

FITS_MAGIC = b"SIMPLE  ="  # plain FITS, and fpack (.fz), whose primary HDU is plain
GZIP_MAGIC = b"\x1f\x8b"  # gzip-compressed FITS (.fits.gz)
# The start of a file that says what it is: its magic bytes, or whether it reads as text (for
# the refusal). The server judges a raw body on these before reading the rest of it.
SNIFF_BYTES = 1024


class Reader(StrEnum):
    """The decoder that reads a format."""

    FITS = "fits_io"  # flux planes (galmorph.core.cutouts.fits_io), stretched to RGB by the decoder
    PILLOW = "pillow"  # an image already rendered to 8 bits (galmorph.core.cutouts.raster_io)


@dataclass(frozen=True)
class CutoutFormat:
    name: str  # reported as `preprocessing.format`
    label: str  # the name people know it by, in messages
    magics: tuple[bytes, ...]  # the content starts with one of these
    signature: str  # what a file named like this format lacks when no magic matches
    suffixes: tuple[str, ...]  # lower case, compound ones (".fits.gz") included
    content_types: tuple[str, ...]  # media types that agree with the content
    reader: Reader
    pillow_format: str | None = None  # Image.open(formats=[...]) name, for Reader.PILLOW

    def __post_init__(self) -> None:
        if not self.magics or not self.suffixes:
            raise ValueError(f"format {self.name!r} needs magic bytes and file suffixes")
        if max(map(len, self.magics)) > SNIFF_BYTES:
            raise ValueError(f"format {self.name!r}: magic bytes longer than SNIFF_BYTES")
        bad = [s for s in self.suffixes if not s.startswith(".") or s != s.lower()]
        if bad:
            raise ValueError(f"format {self.name!r}: suffixes must be lower case '.x': {bad}")
        if (self.reader is Reader.PILLOW) != (self.pillow_format is not None):
            raise ValueError(f"format {self.name!r}: pillow_format goes with Reader.PILLOW only")

    def matches_filename(self, filename: str) -> bool:
        return filename.lower().endswith(self.suffixes)

    def matches_content_type(self, content_type: str) -> bool:
        media_type = content_type.split(";", 1)[0].strip().lower()
        return media_type in self.content_types


FORMATS: tuple[CutoutFormat, ...] = (
    CutoutFormat(
        name="fits",
        label="FITS",
        magics=(FITS_MAGIC, GZIP_MAGIC),
        signature="the 'SIMPLE  =' card",
        suffixes=(".fits", ".fit", ".fts", ".fz", ".fits.gz", ".fit.gz"),
        content_types=("application/fits", "image/fits", "image/x-fits"),
        reader=Reader.FITS,
    ),
    CutoutFormat(
        name="png",
        label="PNG",
        magics=(b"\x89PNG\r\n\x1a\n",),
        signature="the PNG signature",
        suffixes=(".png",),
        content_types=("image/png", "image/x-png"),
        reader=Reader.PILLOW,
        pillow_format="PNG",
    ),
    CutoutFormat(
        name="jpeg",
        label="JPEG",
        magics=(b"\xff\xd8\xff",),
        signature="the JPEG start-of-image marker",
        suffixes=(".jpg", ".jpeg"),
        content_types=("image/jpeg", "image/jpg", "image/pjpeg"),
        reader=Reader.PILLOW,
        pillow_format="JPEG",
    ),
)

# Formats galmorph does not read, named in the refusal so the sender learns what they sent.
UNSUPPORTED_MAGIC = (
    (b"GIF8", "GIF image"),
    (b"II*\x00", "TIFF image"),
    (b"MM\x00*", "TIFF image"),
    (b"RIFF", "RIFF/WebP file"),
    (b"BM", "BMP image"),
    (b"%PDF", "PDF document"),
    (b"PK\x03\x04", "zip archive"),
    (b"BZh", "bzip2 stream"),
    (b"\xfd7zXZ", "xz stream"),
    (b"\x89HDF", "HDF5 file"),
)


def identify(data: bytes) -> CutoutFormat | None:
    """The registered format whose magic bytes start `data`, or None."""
    return next((fmt for fmt in FORMATS if data.startswith(fmt.magics)), None)


def identify_unsupported(data: bytes) -> str | None:
    """What an unreadable file is, when its magic bytes say so ("TIFF image"), else None."""
    return next((what for magic, what in UNSUPPORTED_MAGIC if data.startswith(magic)), None)


def named_like(filename: str) -> CutoutFormat | None:
    """The registered format whose suffix the file name has, or None."""
    return next((fmt for fmt in FORMATS if fmt.matches_filename(filename)), None)


def cutout_suffixes() -> tuple[str, ...]:
    """Every registered suffix, for finding cutouts among files."""
    return tuple(suffix for fmt in FORMATS for suffix in fmt.suffixes)


def raster_suffixes() -> tuple[str, ...]:
    """Suffixes of the already-rendered formats (PNG, JPEG): images to show a model as they are."""
    return tuple(
        suffix for fmt in FORMATS if fmt.reader is Reader.PILLOW for suffix in fmt.suffixes
    )


def accept_list() -> str:
    """The file input's `accept` value: browsers match only the last extension, so
    ".fits.gz" is offered as ".gz"."""
    last = ("." + suffix.rsplit(".", 1)[-1] for suffix in cutout_suffixes())
    return ",".join(dict.fromkeys(last))


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} or {items[-1]}"


def format_labels() -> str:
    """'FITS, PNG or JPEG'."""
    return _join([fmt.label for fmt in FORMATS])


def supported_formats() -> str:
    """'FITS (.fits, ...), PNG (.png) or JPEG (.jpg, .jpeg)', for refusals."""
    return _join([f"{fmt.label} ({', '.join(fmt.suffixes)})" for fmt in FORMATS])
