"""Bad and awkward inputs at the decode level: each gets its status code and a clear message."""

from __future__ import annotations

import io
import tracemalloc

import numpy as np
import pytest
from astropy.io import fits
from PIL import Image

from galmorph.core.cutouts.decode import CutoutError, DecodeLimits, decode_cutout
from galmorph.core.inputspec import InputSpec
from galmorph.service.errors import cutout_status
from tests.support.cutout_factory import (
    BadInput,
    bad_inputs,
    fits_bytes,
    fits_header_only,
    galaxy_planes,
    gzip_bomb,
    make_grz_fits,
    make_jpeg,
    make_png,
)
from tests.support.hostile_inputs import extension_flood, flat_jpeg, scan_bomb_jpeg

SPEC = InputSpec(input_size=(64, 64))
MIB = 2**20


def status_of(data: bytes, filename: str | None = None, **kwargs) -> tuple[int, str]:
    try:
        decoded = decode_cutout(data, spec=SPEC, filename=filename, **kwargs)
    except CutoutError as error:
        assert error.message and str(error) == error.message
        return cutout_status(error), error.message
    assert decoded.image.shape == (64, 64, 3) and decoded.image.dtype == np.uint8
    return 200, "; ".join(decoded.info.warnings)


CASES = bad_inputs()


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_table(case: BadInput) -> None:
    status, message = status_of(case.data, case.filename)
    assert status == case.status, message
    assert message  # refusals explain themselves; accepted oddities carry a warning


def test_bad_input_table_covers_the_issue_list() -> None:
    names = {case.name for case in CASES}
    required = {
        "truncated_fits", "wrong_magic", "zero_bytes", "huge_declared_naxis", "four_d_cube",
        "text_named_fits", "rgba_png", "png_16bit", "decompression_bomb_png", "gzip_bomb",
        "all_nan_fits", "missing_band",
    }  # fmt: skip
    assert required <= names


@pytest.mark.parametrize(
    ("name", "data", "needle"),
    [
        ("huge NAXIS", fits_header_only((4, 8000, 8000)), "over the limit"),
        ("gzip bomb", gzip_bomb(), "expand past the limit"),
    ],
)
def test_limits_refuse_without_allocating(name: str, data: bytes, needle: str) -> None:
    tracemalloc.start()
    try:
        status, message = status_of(data, "x.fits")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert status == 413 and needle in message, message
    assert peak < 4 * MIB, f"{name}: {peak} bytes allocated before refusing"


def test_declared_size_checked_before_truncation() -> None:
    # Header only, declaring a modest image: nothing to refuse, so it is truncated (422).
    status, message = status_of(fits_header_only((3, 64, 64)), "x.fits")
    assert status == 422 and "truncated" in message


def test_gzip_cap_applies_to_valid_files_too() -> None:
    data = make_grz_fits(size=64, gz=True)
    limits = DecodeLimits(max_decompressed_bytes=20_000)
    status, message = status_of(data, "x.fits.gz", limits=limits)
    assert status == 413 and "20000 bytes" in message


def test_truncated_gzip_is_422() -> None:
    data = make_grz_fits(size=64, gz=True)
    status, message = status_of(data[: len(data) // 2], "x.fits.gz")
    assert status == 422 and "truncated" in message


def test_corrupt_gzip_stream_is_422() -> None:
    data = bytearray(make_grz_fits(size=64, gz=True))
    data[30:60] = b"\xff" * 30
    status, message = status_of(bytes(data), "x.fits.gz")
    assert status == 422 and "gzip" in message


@pytest.mark.parametrize(
    ("card", "value", "needle"),
    [
        ("BITPIX", 7, "BITPIX = 7"),
        ("NAXIS1", -5, "NAXIS1 = -5"),
        ("NAXIS", "two", "NAXIS = 'two'"),
    ],
)
def test_corrupt_header_values_are_422(card: str, value: object, needle: str) -> None:
    header = fits.Header()
    header["SIMPLE"] = True
    header["BITPIX"] = -32
    header["NAXIS"] = 2
    header["NAXIS1"] = 8
    header["NAXIS2"] = 8
    header[card] = value
    data = header.tostring().encode("ascii") + b"\0" * 2880
    status, message = status_of(data, "x.fits")
    assert status == 422 and needle in message, message


def test_header_without_end_card_is_422() -> None:
    data = fits_header_only((8, 8)).replace(b"END" + b" " * 77, b" " * 80) + b" " * 2880 * 3
    status, message = status_of(data, "x.fits")
    assert status == 422 and ("END" in message or "truncated" in message), message


def test_pixel_and_side_limits_apply_to_fits_and_png() -> None:
    small = DecodeLimits(max_pixels=64 * 64 * 3 - 1)
    assert status_of(make_grz_fits(size=64), limits=small)[0] == 413
    assert status_of(make_png(size=(64, 100)), limits=DecodeLimits(max_side=99))[0] == 413
    assert status_of(make_png(size=(64, 64)), limits=DecodeLimits(max_pixels=4095))[0] == 413
    assert status_of(b"x" * 101, limits=DecodeLimits(max_bytes=100))[0] == 413


def test_png_modes_convert_with_warnings() -> None:
    rgba = make_png(mode="RGBA")
    decoded = decode_cutout(rgba, spec=SPEC)
    expected = np.asarray(Image.open(io.BytesIO(rgba)))[..., :3]
    np.testing.assert_array_equal(decoded.image, expected)
    assert "alpha channel dropped (50.0% of pixels not opaque)" in decoded.info.warnings

    grey = make_png(mode="L")
    decoded = decode_cutout(grey, spec=SPEC)
    plane = np.asarray(Image.open(io.BytesIO(grey)))
    assert all(np.array_equal(decoded.image[..., c], plane) for c in range(3))
    assert decoded.info.bands_used == ["L"] and "single band: no colour" in decoded.info.warnings

    for mode in ("LA", "P"):
        status, message = status_of(make_png(mode=mode))
        assert status == 200 and message, mode


def test_sixteen_bit_png_scales_full_range_to_eight_bit() -> None:
    values = np.tile(np.array([[0, 257, 32896, 65535]], np.uint16), (64, 16))  # 64 x 64
    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, format="PNG")
    decoded = decode_cutout(buffer.getvalue(), spec=SPEC)
    # round(v * 255 / 65535): 0 -> 0, 257 -> 1, 32896 -> 128, 65535 -> 255
    assert decoded.image[0, :4, 0].tolist() == [0, 1, 128, 255]
    assert any("16-bit" in w for w in decoded.info.warnings)


def test_grey_and_cmyk_jpeg() -> None:
    status, message = status_of(make_jpeg(grey=True))
    assert status == 200 and "single band: no colour" in message
    buffer = io.BytesIO()
    Image.new("CMYK", (64, 64), (0, 255, 255, 0)).save(buffer, format="JPEG")
    decoded = decode_cutout(buffer.getvalue(), spec=SPEC)
    assert "CMYK image converted to RGB" in decoded.info.warnings
    assert decoded.image[..., 0].mean() > 200 and decoded.image[..., 1].mean() < 50


@pytest.mark.parametrize(
    ("data", "filename", "needle"),
    [
        (b"II*\x00" + b"\0" * 100, "x.tiff", "TIFF"),
        (b"hello, I am a catalogue\n", None, "text"),
        (bytes(range(256)), "x.bin", "unrecognised binary"),
        (b"BZh91AY&SY", "x.fits.bz2", "bzip2"),
    ],
)
def test_unsupported_formats_are_415(data: bytes, filename: str | None, needle: str) -> None:
    status, message = status_of(data, filename)
    assert status == 415 and needle in message and "send FITS" in message, message


def test_fits_with_only_a_table_is_422() -> None:
    table = fits.BinTableHDU.from_columns([fits.Column(name="x", format="E", array=np.ones(5))])
    buffer = io.BytesIO()
    fits.HDUList([fits.PrimaryHDU(), table]).writeto(buffer)
    status, message = status_of(buffer.getvalue(), "x.fits")
    assert status == 422 and "no HDU with image data" in message


def test_unnamed_cube_with_more_than_three_planes_is_422() -> None:
    status, message = status_of(fits_bytes(np.zeros((4, 16, 16), np.float32)), "x.fits")
    assert status == 422 and "no BANDS/BANDn" in message


def test_bands_header_disagreeing_with_plane_count_is_422() -> None:
    header = fits.Header({"BANDS": "grz"})
    status, message = status_of(fits_bytes(np.zeros((4, 16, 16), np.float32), header), "x.fits")
    assert status == 422 and "names 3 bands but the cube has 4 planes" in message


def test_fits_structure_walked_before_the_image_is_capped() -> None:
    flood = extension_flood(500)
    status, message = status_of(flood, "x.fits.gz")
    assert status == 413 and "no image in its first 64 HDUs" in message, message
    # An image after a few empty extensions is found; after too many it is not.
    image = fits.ImageHDU(np.stack(list(galaxy_planes(16).values())), fits.Header({"BANDS": "grz"}))
    hdus = [fits.PrimaryHDU(), *(fits.ImageHDU() for _ in range(5)), image]
    buffer = io.BytesIO()
    fits.HDUList(hdus).writeto(buffer)
    assert status_of(buffer.getvalue(), "x.fits")[0] == 200
    few = DecodeLimits(max_fits_hdus=6)
    status, message = status_of(buffer.getvalue(), "x.fits", limits=few)
    assert status == 413 and "first 6 HDUs" in message, message


def test_jpeg_scans_are_counted_before_decoding() -> None:
    progressive = flat_jpeg(256, progressive=True)  # libjpeg's own script: 10 scans
    assert status_of(progressive, "x.jpg")[0] == 200
    assert status_of(flat_jpeg(256), "x.jpg", limits=DecodeLimits(max_jpeg_scans=1))[0] == 200
    status, message = status_of(progressive, "x.jpg", limits=DecodeLimits(max_jpeg_scans=9))
    assert status == 413 and "JPEG has 10 scans, over the limit of 9" in message, message
    status, message = status_of(scan_bomb_jpeg(256, repeats=40), "x.jpg")
    assert status == 413 and "50 scans" in message, message


def test_fits_header_cards_are_capped_across_hdus() -> None:
    cards = fits.Header([("COMMENT", "x" * 60)] * 3000)  # 3000 cards in each extension
    hdus = [fits.PrimaryHDU(), *(fits.ImageHDU(header=cards) for _ in range(4))]
    buffer = io.BytesIO()
    fits.HDUList(hdus).writeto(buffer)
    status, message = status_of(buffer.getvalue(), "x.fits", limits=DecodeLimits())
    assert status == 422 and "no HDU with image data" in message  # 12,000 cards: walked
    small = DecodeLimits(max_fits_header_cards=5000)
    status, message = status_of(buffer.getvalue(), "x.fits", limits=small)
    assert status == 413 and "more than 5000 cards" in message, message
