"""Hostile cutouts: small files that ask a decoder for a lot of memory, CPU or time.

Shared by tests/service/test_hostile.py and benchmarks/bench_hostile.py. Every builder is
deterministic and cached (some take a second to build), and returns the file's bytes.
The large ones are written by hand (PNG chunks, gzip streams) so that building them costs
far less than decoding them would.
"""

from __future__ import annotations

import gzip
import io
import struct
import zlib
from functools import lru_cache

import numpy as np
from astropy.io import fits
from PIL import Image

from tests.support.cutout_factory import fits_header_only, galaxy_planes, tan_wcs_header


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def _repeated_deflate(
    head: bytes, unit: bytes, count: int, tail: bytes = b""
) -> tuple[bytes, list[bytes]]:
    """Raw deflate of head + unit * count + tail, compressing `unit` once: each copy ends in
    a full flush, which resets the compressor, so every copy compresses to the same bytes.
    Returns the deflate stream and the pieces of the uncompressed data (for the checksum)."""
    first = zlib.compressobj(9, zlib.DEFLATED, -15)
    start = first.compress(head) + first.flush(zlib.Z_FULL_FLUSH)
    again = zlib.compressobj(9, zlib.DEFLATED, -15)
    packed = again.compress(unit) + again.flush(zlib.Z_FULL_FLUSH)
    last = zlib.compressobj(9, zlib.DEFLATED, -15)
    end = last.compress(tail) + last.flush()
    return start + packed * count + end, [head, *([unit] * count), tail]


def _zlib_of(head: bytes, unit: bytes, count: int) -> bytes:
    body, pieces = _repeated_deflate(head, unit, count)
    checksum = 1
    for piece in pieces:
        checksum = zlib.adler32(piece, checksum)
    return b"\x78\xda" + body + struct.pack(">I", checksum)


def _gzip_of(head: bytes, unit: bytes, count: int, tail: bytes = b"") -> bytes:
    body, pieces = _repeated_deflate(head, unit, count, tail)
    crc = 0
    for piece in pieces:
        crc = zlib.crc32(piece, crc)
    size = len(head) + len(unit) * count + len(tail)
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
    return header + body + struct.pack("<II", crc, size & 0xFFFFFFFF)


@lru_cache(maxsize=4)
def flat_png(side: int = 8192, colour_type: int = 2, bit_depth: int = 8) -> bytes:
    """A valid side x side PNG of zeros (colour type 2 = RGB, 0 = grey, 6 = RGBA): a few
    hundred KB that decode to side^2 pixels."""
    channels = {0: 1, 2: 3, 6: 4}[colour_type] * bit_depth // 8
    row = b"\0" * (1 + side * channels)  # filter byte 0, then the pixels
    rows_per_unit = next(n for n in (64, 32, 16, 8, 4, 2, 1) if side % n == 0)
    idat = _zlib_of(b"", row * rows_per_unit, side // rows_per_unit)
    ihdr = struct.pack(">IIBBBBB", side, side, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


@lru_cache(maxsize=2)
def flat_jpeg(side: int = 8192, progressive: bool = False) -> bytes:
    """A side x side grey-ish JPEG (baseline or progressive)."""
    image = Image.new("RGB", (side, side), (40, 40, 40))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=50, progressive=progressive)
    return buffer.getvalue()


@lru_cache(maxsize=1)
def scan_bomb_jpeg(side: int = 8192, repeats: int = 2000) -> bytes:
    """A progressive JPEG whose last scan (about 100 bytes) is repeated `repeats` times:
    libjpeg warns and goes on, paying a pass over every coefficient per copy (~1 min at
    8192^2 and 2000 copies)."""
    data = flat_jpeg(side, progressive=True)
    start, end = _jpeg_scans(data)[-1]
    return data[:end] + data[start:end] * repeats + data[end:]


def _jpeg_scans(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of each SOS segment with its entropy-coded data."""
    scans = []
    position = 2  # after SOI
    while data[position + 1] != 0xD9:  # EOI
        marker = data[position + 1]
        end = position + 2 + int.from_bytes(data[position + 2 : position + 4], "big")
        if marker == 0xDA:
            # Entropy data runs to the next marker that is neither a stuffed 0xFF00 nor RSTn.
            while data[end] != 0xFF or data[end + 1] == 0x00 or 0xD0 <= data[end + 1] <= 0xD7:
                end += 1
            scans.append((position, end))
        position = end
    return scans


def scale_bomb_fits(pixel_scale: float, size: int = 64) -> bytes:
    """A small grz cube whose WCS claims `pixel_scale` arcsec per pixel."""
    planes = galaxy_planes(size, seed=1)
    header = tan_wcs_header((size, size), pixel_scale)
    header["BANDS"] = "grz"
    hdu = fits.PrimaryHDU(np.stack([planes[b] for b in "grz"]), header)
    buffer = io.BytesIO()
    hdu.writeto(buffer)
    return buffer.getvalue()


@lru_cache(maxsize=2)
def flat_gzip_cube(side: int = 4096, bands: str = "grz", pixel_scale: float = 0.262) -> bytes:
    """A gzip FITS float32 (len(bands), side, side) cube of zeros with a TAN WCS: under 1 MB
    that expands to 4 x side^2 x bands bytes."""
    header = tan_wcs_header((side, side), pixel_scale)
    header["BANDS"] = bands
    primary = fits.Header()
    primary["SIMPLE"] = True
    primary["BITPIX"] = -32
    primary["NAXIS"] = 3
    primary["NAXIS1"], primary["NAXIS2"], primary["NAXIS3"] = side, side, len(bands)
    primary.extend(header)
    head = primary.tostring().encode("ascii")
    rows = side * len(bands)
    rows_per_unit = next(n for n in (64, 32, 16, 8, 4, 2, 1) if rows % n == 0)
    padding = b"\0" * (-(rows * 4 * side) % 2880)
    return _gzip_of(head, b"\0" * (4 * side * rows_per_unit), rows // rows_per_unit, padding)


@lru_cache(maxsize=2)
def extension_flood(extensions: int = 30_000) -> bytes:
    """A .fits.gz: empty primary, then `extensions` empty IMAGE extensions (no image at all)."""
    empty = fits.Header()
    empty["XTENSION"] = "IMAGE"
    empty["BITPIX"] = 8
    empty["NAXIS"] = 0
    empty["PCOUNT"] = 0
    empty["GCOUNT"] = 1
    per_unit = next(n for n in (100, 10, 1) if extensions % n == 0)
    unit = empty.tostring().encode("ascii") * per_unit
    return _gzip_of(fits_header_only(()), unit, extensions // per_unit)


def header_card_flood(cards: int = 200_000) -> bytes:
    """A primary header with `cards` COMMENT cards before END (no END within the first blocks)."""
    header = fits_header_only(())
    body = header[: header.index(b"END" + b" " * 77)]
    comment = b"COMMENT " + b"x" * 72
    data = body + comment * cards + b"END" + b" " * 77
    return gzip.compress(data + b" " * (-len(data) % 2880), compresslevel=9, mtime=0)
