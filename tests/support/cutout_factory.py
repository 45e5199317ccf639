"""Cutout fixtures built in memory: Legacy Survey style FITS, PNG/JPEG, and bad inputs.

Import-safe (numpy, astropy, Pillow only; nothing runs at import) and deterministic by seed.
Every builder returns the file's bytes; pass a directory as `tmp_path` to also write the
file there (named after its content unless `name` is given). Reused by the decode tests,
the HTTP service tests and the scorer tests:

    from tests.support.cutout_factory import make_grz_fits, make_png, bad_inputs
    data = make_grz_fits(size=64, bands="griz", gz=True)
    for case in bad_inputs():  # BadInput(name, data, filename, status)
        ...
"""

from __future__ import annotations

import gzip
import io
import struct
import zlib
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
from astropy.io import fits
from PIL import Image

LEGACY_PIXEL_SCALE = 0.262
# Typical DECaLS per-pixel sky noise (nanomaggies) and a red-ish galaxy's colour (flux ratio
# to r) per band.
SKY_NOISE = {"g": 0.005, "r": 0.0074, "i": 0.01, "z": 0.015}
COLOUR = {"g": 0.55, "r": 1.0, "i": 1.3, "z": 1.5}


class BadInput(NamedTuple):
    name: str
    data: bytes
    filename: str
    status: int  # expected HTTP status (200 = accepted, possibly with warnings)


def galaxy_planes(
    size: int = 64,
    *,
    pixel_scale: float = LEGACY_PIXEL_SCALE,
    bands: str = "grz",
    seed: int = 0,
    noise: bool = True,
) -> dict[str, np.ndarray]:
    """An inclined exponential disk + bulge in nanomaggies per pixel, one plane per band.

    Sizes are in arcsec, so the same galaxy spans more pixels at a finer pixel scale; pixel
    values are surface brightness (the same level at any scale).
    """
    rng = np.random.default_rng(seed)
    offset = (np.arange(size) - (size - 1) / 2) * pixel_scale
    y, x = np.meshgrid(offset, offset, indexing="ij")
    angle = 0.6
    u = x * np.cos(angle) + y * np.sin(angle)
    v = (-x * np.sin(angle) + y * np.cos(angle)) / 0.55
    radius = np.hypot(u, v)
    profile = 0.6 * np.exp(-radius / 2.5) + 2.0 * np.exp(-((radius / 0.8) ** 0.5) * 3.0)
    planes = {}
    for band in bands:
        plane = profile * COLOUR.get(band, 1.0)
        if noise:
            plane = plane + rng.normal(0.0, SKY_NOISE.get(band, 0.01), plane.shape)
        planes[band] = plane.astype(np.float32)
    return planes


def tan_wcs_header(shape: tuple[int, int], pixel_scale: float) -> fits.Header:
    """Legacy Survey style TAN WCS: CD1_1 = -scale, CD2_2 = +scale (degrees), north up."""
    height, width = shape
    header = fits.Header()
    header["CTYPE1"], header["CTYPE2"] = "RA---TAN", "DEC--TAN"
    header["CRVAL1"], header["CRVAL2"] = 150.1, 2.2
    header["CRPIX1"], header["CRPIX2"] = (width + 1) / 2, (height + 1) / 2
    header["CD1_1"], header["CD1_2"] = -pixel_scale / 3600, 0.0
    header["CD2_1"], header["CD2_2"] = 0.0, pixel_scale / 3600
    header["CUNIT1"], header["CUNIT2"] = "deg", "deg"
    return header


def fits_bytes(
    data: np.ndarray,
    header: fits.Header | None = None,
    *,
    gz: bool = False,
    fpack: bool = False,
) -> bytes:
    """Serialise an array as primary HDU (or fpack: empty primary + RICE CompImageHDU)."""
    buffer = io.BytesIO()
    if fpack:
        hdus = fits.HDUList(
            [fits.PrimaryHDU(), fits.CompImageHDU(data, header, compression_type="RICE_1")]
        )
    else:
        hdus = fits.HDUList([fits.PrimaryHDU(data, header)])
    hdus.writeto(buffer)
    raw = buffer.getvalue()
    return gzip.compress(raw, compresslevel=6, mtime=0) if gz else raw


def _save(tmp_path: Path | None, name: str, data: bytes) -> bytes:
    if tmp_path is not None:
        Path(tmp_path, name).write_bytes(data)
    return data


def make_grz_fits(
    tmp_path: Path | None = None,
    *,
    size: int = 64,
    pixel_scale: float = LEGACY_PIXEL_SCALE,
    bands: str = "grz",
    gz: bool = False,
    fpack: bool = False,
    seed: int = 0,
    band_keys: bool = True,
    noise: bool = True,
    name: str | None = None,
) -> bytes:
    """A Legacy Survey style float32 (nbands, H, W) cutout with BANDS/BANDn and a TAN WCS."""
    planes = galaxy_planes(size, pixel_scale=pixel_scale, bands=bands, seed=seed, noise=noise)
    cube = np.stack([planes[band] for band in bands])
    header = tan_wcs_header((size, size), pixel_scale)
    if band_keys:
        header["BANDS"] = bands
        for i, band in enumerate(bands):
            header[f"BAND{i}"] = band
    data = fits_bytes(cube, header, gz=gz, fpack=fpack)
    suffix = ".fits.fz" if fpack else ".fits.gz" if gz else ".fits"
    return _save(tmp_path, name or f"cutout_{bands}_{size}{suffix}", data)


def make_single_band_fits(
    tmp_path: Path | None = None,
    *,
    size: int = 64,
    pixel_scale: float | None = LEGACY_PIXEL_SCALE,
    bitpix: int = -32,
    seed: int = 0,
    name: str | None = None,
) -> bytes:
    """A 2-D r-band image; integer `bitpix` stores it with BSCALE/BZERO; no WCS if scale None."""
    plane = galaxy_planes(size, pixel_scale=pixel_scale or LEGACY_PIXEL_SCALE, bands="r")["r"]
    header = fits.Header() if pixel_scale is None else tan_wcs_header((size, size), pixel_scale)
    hdu = fits.PrimaryHDU(plane, header)
    if bitpix > 0:
        hdu.scale({16: "int16", 32: "int32", 8: "uint8"}[bitpix], option="minmax")
    buffer = io.BytesIO()
    hdu.writeto(buffer)
    return _save(tmp_path, name or f"single_{size}.fits", buffer.getvalue())


def make_png(
    tmp_path: Path | None = None,
    *,
    size: tuple[int, int] = (64, 64),
    mode: str = "RGB",
    seed: int = 0,
    name: str | None = None,
) -> bytes:
    """A random PNG of (H, W) in a Pillow mode: RGB, RGBA, L, LA, P or I;16 (16-bit grey)."""
    rng = np.random.default_rng(seed)
    height, width = size
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    else:
        channels = {"RGB": 3, "RGBA": 4, "L": 1, "LA": 2, "P": 3}[mode]
        pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
        if mode == "RGBA":
            pixels[..., 3] = 255
            pixels[: height // 2, :, 3] = 128  # the top half translucent
        image = Image.fromarray(pixels.squeeze(axis=2) if channels == 1 else pixels)
        if mode == "LA":
            image = Image.fromarray(pixels, mode="LA")
        if mode == "P":
            image = image.convert("P", palette=Image.Palette.ADAPTIVE)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return _save(tmp_path, name or f"image_{mode.replace(';', '')}.png", buffer.getvalue())


def make_jpeg(
    tmp_path: Path | None = None,
    *,
    size: tuple[int, int] = (64, 64),
    grey: bool = False,
    seed: int = 0,
    name: str | None = None,
) -> bytes:
    rng = np.random.default_rng(seed)
    shape = size if grey else (*size, 3)
    image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return _save(tmp_path, name or "image.jpg", buffer.getvalue())


def fits_header_only(shape: tuple[int, ...], bitpix: int = -32) -> bytes:
    """A primary header declaring `shape` (numpy order) with no data at all."""
    header = fits.Header()
    header["SIMPLE"] = True
    header["BITPIX"] = bitpix
    header["NAXIS"] = len(shape)
    for axis, side in enumerate(reversed(shape), start=1):
        header[f"NAXIS{axis}"] = side
    return header.tostring().encode("ascii")


def png_bomb(side: int = 100_000) -> bytes:
    """A valid PNG signature + IHDR declaring side x side RGB pixels, with a tiny IDAT."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@lru_cache(maxsize=2)
def gzip_bomb(expanded_mib: int = 300) -> bytes:
    """A .fits.gz: empty primary, then a binary table of `expanded_mib` MiB of zeros.

    Compresses ~230:1 (zlib level 1 builds fast), so a decoder that inflates everything (or
    skips the table by inflating it) allocates or burns through it all; a bounded one stops.
    """
    table = fits.Header()
    table["XTENSION"] = "BINTABLE"
    table["BITPIX"] = 8
    table["NAXIS"] = 2
    table["NAXIS1"] = 1 << 20
    table["NAXIS2"] = expanded_mib
    table["PCOUNT"] = 0
    table["GCOUNT"] = 1
    table["TFIELDS"] = 1
    table["TFORM1"] = f"{1 << 20}B"
    compressor = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    parts = [compressor.compress(fits_header_only(()) + table.tostring().encode("ascii"))]
    zeros = b"\0" * (1 << 20)
    parts.extend(compressor.compress(zeros) for _ in range(expanded_mib))
    parts.append(compressor.flush())
    return b"".join(parts)


def bad_inputs() -> list[BadInput]:
    """Problem files with the status the service must answer (200 = accepted with a warning)."""
    good = make_grz_fits(size=32)
    nan_cube = np.full((3, 16, 16), np.nan, np.float32)
    nan_header = fits.Header({"BANDS": "grz"})
    four_d = np.zeros((2, 3, 16, 16), np.float32)
    no_z = make_grz_fits(size=16, bands="gri")
    return [
        BadInput("truncated_fits", good[: len(good) // 2], "cut.fits", 422),
        BadInput("wrong_magic", b"NOTFITS!" + good[8:], "cutout.fits", 415),
        BadInput("zero_bytes", b"", "empty.fits", 422),
        BadInput("huge_declared_naxis", fits_header_only((3, 100_000, 100_000)), "huge.fits", 413),
        BadInput("four_d_cube", fits_bytes(four_d), "cube4d.fits", 422),
        BadInput("text_named_fits", b"ra,dec\n150.1,2.2\n", "catalog.fits", 415),
        BadInput("all_nan_fits", fits_bytes(nan_cube, nan_header), "nan.fits", 422),
        BadInput("missing_band", no_z, "gri.fits", 422),
        BadInput("gzip_bomb", gzip_bomb(), "bomb.fits.gz", 413),
        BadInput("decompression_bomb_png", png_bomb(), "bomb.png", 413),
        BadInput("truncated_png", make_png(size=(64, 64))[:300], "cut.png", 422),
        BadInput("gif", b"GIF89a" + b"\0" * 64, "image.gif", 415),
        BadInput("rgba_png", make_png(mode="RGBA"), "rgba.png", 200),
        BadInput("png_16bit", make_png(mode="I;16"), "deep.png", 200),
    ]
