"""decode_cutout on real HST and Galaxy10 files and on synthetic Legacy Survey cubes."""

from __future__ import annotations

import io
import json
import os
import re
import tracemalloc
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from PIL import Image

from galmorph.core.cutouts.decode import (
    CutoutError,
    DecodeLimits,
    PreprocessInfo,
    decode_cutout,
    decode_path,
    fit_rgb,
)
from galmorph.core.cutouts.fits_io import read_fits
from galmorph.core.cutouts.imaging import dr2_rgb, to_uint8
from galmorph.core.cutouts.limits import CutoutErrorKind
from galmorph.core.inputspec import InputSpec
from tests.support.cutout_factory import (
    fits_bytes,
    galaxy_planes,
    make_grz_fits,
    make_png,
    make_single_band_fits,
    tan_wcs_header,
)


def spec_of(size: int) -> InputSpec:
    return InputSpec(input_size=(size, size))


SPEC_64 = spec_of(64)
SPEC_256 = spec_of(256)


def expected_dr2(planes: dict[str, np.ndarray]) -> np.ndarray:
    """The render decode must produce for a cube already at the model's scale and size."""
    return to_uint8(dr2_rgb({b: planes[b][::-1] for b in "grz"}))


def cube_bytes(planes: dict[str, np.ndarray], order: str, scale: float = 0.262, **keys) -> bytes:
    size = next(iter(planes.values())).shape[0]
    header = tan_wcs_header((size, size), scale)
    for key, value in keys.items():
        header[key] = value
    return fits_bytes(np.stack([planes[b] for b in order]), header)


# --- real inputs -------------------------------------------------------------------------


HST_SIDES = {
    "abell_2744_cd_galaxy_f105w.fits.gz": 400,
    "abell_2744_spiral_galaxy_f105w.fits.gz": 150,
    "abell_2744_dwarf_galaxy_f105w.fits.gz": 200,
    "abell_2744_group_of_galaxies_f105w.fits.gz": 100,
}


@pytest.mark.parametrize("name", sorted(HST_SIDES))
def test_real_hst_single_band_is_resampled_to_model_scale(real_data: Path, name: str) -> None:
    decoded = decode_path(real_data / "hst-fits" / name, spec=SPEC_256)
    info = decoded.info
    side = HST_SIDES[name]
    assert decoded.image.shape == (256, 256, 3) and decoded.image.dtype == np.uint8
    assert info.format == "fits" and info.compression == "gzip" and info.flipped
    assert info.pixel_scale == pytest.approx(0.06, rel=1e-3)
    assert info.resampled_from_scale == pytest.approx(0.06, rel=1e-3)
    # 0.06"/px -> 0.262"/px: the field shrinks by 4.37 and is padded to 256 with blank sky
    resampled = round(side * 0.06 / 0.262)
    assert info.crop_pad_from == (resampled, resampled)
    assert any("single band: no colour" in w for w in info.warnings)
    assert any("resampled from 0.06" in w for w in info.warnings)
    image = decoded.image.astype(int)
    assert np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(
        image[..., 1], image[..., 2]
    )
    assert (image[:20, :20] == 32).all()  # padding renders as the viewer's blank-sky grey
    centre = image[128 - resampled // 2 : 128 + resampled // 2, 128 - resampled // 2 :]
    assert centre.max() > 150  # the galaxies are bright after sky/noise normalisation


def test_real_hst_without_wcs_assumes_model_scale(real_data: Path) -> None:
    path = real_data / "hst-fits" / "abell_2744_dwarf_galaxy_f105w_rms.fits.gz"
    decoded = decode_path(path, spec=SPEC_256)
    assert decoded.info.pixel_scale is None and decoded.info.resampled_from_scale is None
    assert any("no celestial WCS" in w for w in decoded.info.warnings)
    assert decoded.info.crop_pad_from == (200, 200)


def test_real_hst_resize_fills_the_input(real_data: Path) -> None:
    path = real_data / "hst-fits" / "abell_2744_spiral_galaxy_f105w.fits.gz"
    decoded = decode_path(path, spec=SPEC_64, fit="resize")
    assert decoded.info.resized_from == (150, 150) and decoded.info.crop_pad_from is None
    assert decoded.info.resampled_from_scale is None
    assert decoded.image.shape == (64, 64, 3)
    assert not (decoded.image[:4, :4] == 32).all()  # real sky, not padding


@pytest.mark.parametrize("pattern", ["class*.png", "sample_*.jpg"])
def test_real_galaxy10_images_pass_through_unchanged(real_data: Path, pattern: str) -> None:
    paths = sorted((real_data / "galaxy10-real").glob(pattern))
    assert len(paths) == 10
    for path in paths:
        decoded = decode_path(path, spec=SPEC_256)
        with Image.open(path) as reference:
            expected = np.asarray(reference.convert("RGB"))
        assert decoded.image.shape == (256, 256, 3)
        np.testing.assert_array_equal(decoded.image, expected)
        assert decoded.info.warnings == [] and decoded.info.resized_from is None
        assert decoded.info.format == ("png" if path.suffix == ".png" else "jpeg")
        assert decoded.info.stretch is None and not decoded.info.flipped


def test_real_png_resized_for_a_smaller_model(real_data: Path) -> None:
    path = real_data / "galaxy10-real" / "class2_Round_Smooth.png"
    decoded = decode_path(path, spec=SPEC_64)
    assert decoded.image.shape == (64, 64, 3)
    assert decoded.info.resized_from == (256, 256)
    with Image.open(path) as reference:
        small = np.asarray(reference.convert("RGB").resize((64, 64), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(decoded.image, small)


# --- synthetic Legacy Survey cubes ---------------------------------------------------------


def test_grz_cube_renders_exactly_dr2_rgb_flipped(tmp_path: Path) -> None:
    data = make_grz_fits(tmp_path, size=64, seed=3)
    planes = galaxy_planes(64, seed=3)
    decoded = decode_path(tmp_path / "cutout_grz_64.fits", spec=SPEC_64)
    np.testing.assert_array_equal(decoded.image, expected_dr2(planes))
    info = decoded.info
    assert info.bands_used == ["g", "r", "z"] and info.original_shape == (3, 64, 64)
    assert info.pixel_scale == pytest.approx(0.262) and info.stretch == "dr2_rgb"
    assert info.flipped and info.warnings == [] and info.resampled_from_scale is None
    assert decode_cutout(data, spec=SPEC_64).image.tobytes() == decoded.image.tobytes()
    json.dumps(info.to_dict())


def test_vertical_flip_puts_fits_row_zero_at_the_bottom() -> None:
    planes = {b: np.zeros((64, 64), np.float32) for b in "grz"}
    planes["z"][0] = 5.0  # FITS row 0 (south) bright in z
    image = decode_cutout(cube_bytes(planes, "grz"), spec=SPEC_64).image
    assert image[-1, :, 0].min() == 255 and image[0, :, 0].max() == 32


def test_band_order_is_read_by_name_not_position() -> None:
    planes = galaxy_planes(64, bands="griz", seed=5)
    expected = expected_dr2(planes)
    variants = {
        "griz BANDS+BANDn": cube_bytes(
            planes, "griz", BANDS="griz", BAND0="g", BAND1="r", BAND2="i", BAND3="z"
        ),
        "zrg BANDn only": cube_bytes(planes, "zrg", BAND0="z", BAND1="r", BAND2="g"),
        "rzg BANDS only": cube_bytes(planes, "rzg", BANDS="rzg"),
        "comma BANDS": cube_bytes(planes, "zgr", BANDS="z,g,r"),
    }
    for label, data in variants.items():
        decoded = decode_cutout(data, spec=SPEC_64)
        np.testing.assert_array_equal(decoded.image, expected, err_msg=label)
        assert decoded.info.bands_used == ["g", "r", "z"]
    griz = decode_cutout(variants["griz BANDS+BANDn"], spec=SPEC_64)
    assert any("band(s) i not used" in w for w in griz.info.warnings)


def test_unnamed_three_plane_cube_is_assumed_grz() -> None:
    planes = galaxy_planes(64, seed=2)
    decoded = decode_cutout(make_grz_fits(size=64, seed=2, band_keys=False), spec=SPEC_64)
    np.testing.assert_array_equal(decoded.image, expected_dr2(planes))
    assert any("assumed to be g, r, z" in w for w in decoded.info.warnings)


def test_gzip_and_fpack_decode_like_plain() -> None:
    plain = decode_cutout(make_grz_fits(size=64), spec=SPEC_64).image
    gzipped = decode_cutout(make_grz_fits(size=64, gz=True), spec=SPEC_64)
    np.testing.assert_array_equal(gzipped.image, plain)
    assert gzipped.info.compression == "gzip"
    packed = decode_cutout(make_grz_fits(size=64, fpack=True), spec=SPEC_64)
    assert packed.info.compression == "fpack" and packed.info.pixel_scale == pytest.approx(0.262)
    # RICE quantises floats to ~noise/16: a few grey levels at most
    assert np.abs(packed.image.astype(int) - plain.astype(int)).max() <= 3


def test_fine_pixel_scale_is_resampled_to_the_same_sky_per_pixel() -> None:
    # The same noise-free galaxy (sizes in arcsec) at 0.262"/px and at 0.131"/px.
    reference = decode_cutout(make_grz_fits(size=64, noise=False), spec=SPEC_64).image
    fine_planes = galaxy_planes(128, pixel_scale=0.131, noise=False)
    fine = cube_bytes(fine_planes, "grz", scale=0.131, BANDS="grz")
    decoded = decode_cutout(fine, spec=SPEC_64)
    assert decoded.info.resampled_from_scale == pytest.approx(0.131)
    assert decoded.info.crop_pad_from is None and decoded.image.shape == (64, 64, 3)
    error = np.abs(decoded.image.astype(int) - reference).mean()
    # Read as if it were 0.262"/px, the centre 64 px would show the galaxy twice as large.
    naive = expected_dr2({b: p[32:96, 32:96] for b, p in fine_planes.items()})
    naive_error = np.abs(naive.astype(int) - reference).mean()
    assert error < 0.5 and naive_error > 10 * error + 2, (error, naive_error)


def test_coarse_pixel_scale_is_upsampled_from_the_field_straight_to_the_input() -> None:
    coarse = make_grz_fits(size=400, pixel_scale=0.524, seed=4)
    reserved: dict[str, int] = {}
    decoded = decode_cutout(
        coarse, spec=SPEC_64, reserve=lambda n, what: reserved.update({what: n})
    )
    # The model's 64 px at 0.262 cover 32 px at 0.524: that field of the 400 px (read with a
    # 2 px margin) is resampled straight to the 64 px input, nothing to crop afterwards.
    match = re.search(r"\(([\d.]+)x\1 -> (\d+)x\2 pixels\)", " ".join(decoded.info.warnings))
    assert match is not None, decoded.info.warnings
    assert float(match[1]) == pytest.approx(32, abs=0.1) and int(match[2]) == 64
    assert decoded.info.crop_pad_from is None and decoded.image.shape == (64, 64, 3)
    # Only the field plus 2 px margins (36-38 px: WCS rounding) of three planes is converted:
    # float32 copies of 3 planes and the finite masks are 15 bytes a pixel.
    assert reserved.keys() == {"FITS render", "FITS image"}
    assert reserved["FITS image"] in {15 * side * side for side in (36, 37, 38)}


def test_small_cutout_is_padded_with_blank_sky_or_resized() -> None:
    data = make_grz_fits(size=40, seed=6)
    padded = decode_cutout(data, spec=SPEC_64)
    assert padded.info.crop_pad_from == (40, 40) and padded.info.resized_from is None
    assert (padded.image[:12] == 32).all() and (padded.image[:, -12:] == 32).all()
    np.testing.assert_array_equal(
        padded.image[12:52, 12:52], expected_dr2(galaxy_planes(40, seed=6))
    )
    resized = decode_cutout(data, spec=SPEC_64, fit="resize")
    assert resized.info.resized_from == (40, 40) and resized.info.crop_pad_from is None
    assert not (resized.image[:12] == 32).all()


def test_large_cutout_is_centre_cropped() -> None:
    planes = galaxy_planes(100, seed=8)
    decoded = decode_cutout(cube_bytes(planes, "grz", BANDS="grz"), spec=SPEC_64)
    assert decoded.info.crop_pad_from == (100, 100)
    centre = {b: p[18:82, 18:82] for b, p in planes.items()}
    np.testing.assert_array_equal(decoded.image, expected_dr2(centre))


def test_nan_and_inf_pixels_become_blank_sky_with_a_warning() -> None:
    planes = galaxy_planes(64, seed=9)
    planes["g"][:8, :] = np.nan  # 8 of 64 rows = 12.50% of pixels
    planes["z"][:8, :4] = np.inf
    decoded = decode_cutout(cube_bytes(planes, "grz", BANDS="grz"), spec=SPEC_64)
    assert any("12.50% of pixels were NaN or infinite" in w for w in decoded.info.warnings)
    assert (decoded.image[-8:] == 32).all()  # FITS rows 0-7 end up at the bottom, blank sky


def test_bscale_bzero_integer_image_matches_float() -> None:
    as_float = decode_cutout(make_single_band_fits(size=64, seed=2), spec=SPEC_64).image
    as_int16 = decode_cutout(make_single_band_fits(size=64, seed=2, bitpix=16), spec=SPEC_64)
    assert as_int16.info.original_shape == (64, 64)
    # int16 quantisation of the float image changes at most a grey level here and there
    diff = np.abs(as_int16.image.astype(int) - as_float.astype(int))
    assert diff.max() <= 2 and diff.mean() < 0.2


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("in_extension", [False, True])
def test_plain_float_pixels_read_directly_equal_astropys(
    dtype: type, in_extension: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(7)
    cube = rng.normal(0, 1, (3, 40, 56)).astype(dtype)
    cube[1, 5, 7] = np.nan
    header = fits.Header({"BANDS": "grz"})
    hdus = (
        [fits.PrimaryHDU(), fits.ImageHDU(cube, header)]
        if in_extension
        else [fits.PrimaryHDU(cube, header)]
    )
    buffer = io.BytesIO()
    fits.HDUList(hdus).writeto(buffer)
    with monkeypatch.context() as patch:  # prove that astropy's data path is not taken
        patch.setattr(fits.HDUList, "fromstring", None)
        ours = read_fits(buffer.getvalue(), DecodeLimits())
    with fits.open(io.BytesIO(buffer.getvalue())) as hdul:
        theirs = np.asarray(hdul[1 if in_extension else 0].data)
    theirs = theirs.astype(np.float32)
    theirs[:, 5, 7] = 0.0  # a pixel missing in one band is blank sky in all (the NaN policy)
    for index, band in enumerate("grz"):
        np.testing.assert_array_equal(ours.planes[band], theirs[index])


def test_scaled_float_pixels_are_left_to_astropy() -> None:
    plane = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    header = fits.Header({"BSCALE": 2.0, "BZERO": 1.0})
    buffer = io.BytesIO()
    hdu = fits.PrimaryHDU(plane, header)
    hdu.header["BSCALE"], hdu.header["BZERO"] = 2.0, 1.0  # stored as is, applied on reading
    hdu.writeto(buffer)
    with fits.open(io.BytesIO(buffer.getvalue())) as hdul:
        expected = np.asarray(hdul[0].data, np.float32)
    assert not np.array_equal(expected, plane)  # the scaling really applies
    (read,) = read_fits(buffer.getvalue(), DecodeLimits()).planes.values()
    np.testing.assert_array_equal(read, expected)


def test_image_in_an_extension_after_a_table() -> None:
    planes = galaxy_planes(64, seed=4)
    table = fits.BinTableHDU.from_columns([fits.Column(name="x", format="E", array=np.ones(500))])
    header = tan_wcs_header((64, 64), 0.262)
    header["BANDS"] = "grz"
    image = fits.ImageHDU(np.stack([planes[b] for b in "grz"]), header)
    buffer = io.BytesIO()
    fits.HDUList([fits.PrimaryHDU(), table, image]).writeto(buffer)
    decoded = decode_cutout(buffer.getvalue(), spec=SPEC_64)
    np.testing.assert_array_equal(decoded.image, expected_dr2(planes))


def test_degenerate_leading_axes_are_single_band() -> None:
    plane = galaxy_planes(32, bands="r")["r"]
    decoded = decode_cutout(fits_bytes(plane[None, None]), spec=spec_of(32))
    assert decoded.info.original_shape == (1, 1, 32, 32)
    assert any("single band" in w for w in decoded.info.warnings)


@pytest.mark.parametrize("stretch", ["dr2_rgb", "lupton"])
def test_stretch_choice_is_recorded(stretch: str) -> None:
    decoded = decode_cutout(make_grz_fits(size=64), spec=SPEC_64, stretch=stretch)
    assert decoded.info.stretch == stretch
    grey = decode_cutout(make_single_band_fits(size=64), spec=SPEC_64, stretch=stretch).image
    assert np.array_equal(grey[..., 0], grey[..., 2])


def test_unknown_stretch_and_fit_are_422_naming_the_valid_ones() -> None:
    data = make_grz_fits(size=32)
    with pytest.raises(CutoutError, match="valid stretches: dr2_rgb, lupton") as error:
        decode_cutout(data, spec=SPEC_64, stretch="zscale")
    assert error.value.kind == CutoutErrorKind.INVALID
    with pytest.raises(CutoutError, match="valid: crop_pad, resize"):
        decode_cutout(data, spec=SPEC_64, fit="stretch")


def test_filename_and_content_type_are_only_hints() -> None:
    png = make_png(size=(64, 64))
    decoded = decode_cutout(png, spec=SPEC_64, filename="x.fits", content_type="image/fits")
    assert decoded.info.format == "png"
    assert any("file name 'x.fits' ignored" in w for w in decoded.info.warnings)
    assert any("content type 'image/fits' ignored" in w for w in decoded.info.warnings)
    np.testing.assert_array_equal(decoded.image, np.asarray(Image.open(io.BytesIO(png))))


def test_decode_path_checks_size_before_reading(tmp_path: Path, monkeypatch) -> None:
    make_grz_fits(tmp_path, size=64, name="big.fits")

    def refuse(descriptor: int, size: int) -> bytes:
        raise AssertionError("read before the size check")

    monkeypatch.setattr(os, "read", refuse)
    with pytest.raises(CutoutError, match="over the limit of 1000 bytes") as error:
        decode_path(tmp_path / "big.fits", spec=SPEC_64, limits=DecodeLimits(max_bytes=1000))
    assert error.value.kind == CutoutErrorKind.TOO_LARGE


def test_decode_path_missing_file_is_a_cutout_error(tmp_path: Path) -> None:
    with pytest.raises(CutoutError, match=r"nope\.fits") as error:
        decode_path(tmp_path / "nope.fits", spec=SPEC_64)
    assert error.value.kind == CutoutErrorKind.INVALID


# --- bounded work: scales, windows, full JPEG decodes -----------------------------------


def test_scale_range_admits_hst_and_sdss_and_refuses_absurd_scales(real_data: Path) -> None:
    coarse_model = replace(spec_of(64), pixel_scale=1.048)  # a 64 px Galaxy10 model
    hst = real_data / "hst-fits" / "abell_2744_spiral_galaxy_f105w.fits.gz"
    decoded = decode_path(hst, spec=coarse_model)
    assert decoded.info.resampled_from_scale == pytest.approx(0.06, rel=1e-3)
    assert decoded.image.shape == (64, 64, 3)
    sdss = decode_cutout(make_grz_fits(size=128, pixel_scale=0.396), spec=SPEC_64)
    assert sdss.info.resampled_from_scale == pytest.approx(0.396, rel=1e-3)
    for scale in (0.262 * 8.5, 0.262 / 70):
        with pytest.raises(CutoutError, match=r'0\.004094 to 2\.096"/px') as error:
            decode_cutout(make_grz_fits(size=32, pixel_scale=scale), spec=SPEC_64)
        assert error.value.kind is CutoutErrorKind.INVALID
        assert f'{scale:.4g}"/px' in error.value.message
    # resize ignores the scale, so it accepts any
    resized = decode_cutout(make_grz_fits(size=32, pixel_scale=50.0), spec=SPEC_64, fit="resize")
    assert resized.info.resized_from == (32, 32)


@pytest.mark.parametrize("scale", [0.262 * 7.9, 0.262 * 3, 0.131, 0.262 / 60])
def test_resampled_output_never_exceeds_the_input(scale: float) -> None:
    reserved: list[int] = []
    data = make_grz_fits(size=300, pixel_scale=scale, noise=False)
    decoded = decode_cutout(data, spec=SPEC_64, reserve=lambda n, what: reserved.append(n))
    note = next(w for w in decoded.info.warnings if w.startswith("resampled from"))
    out = re.search(r"-> (\d+)x(\d+) pixels", note)
    assert out is not None and int(out[1]) <= 64 and int(out[2]) <= 64, note
    assert sum(reserved) < 16 * 2**20  # whatever the ratio, about the input's size of work


def test_section_reads_equal_whole_reads_for_plain_and_gzip() -> None:
    planes = galaxy_planes(150, bands="griz", seed=11)
    planes["r"][70:75, 60:90] = np.nan
    header = tan_wcs_header((150, 150), 0.262)
    header["BANDS"] = "izgr"  # file order differs from band order
    cube = np.stack([planes[b] for b in "izgr"])
    centre = {b: np.where(np.isnan(planes["r"]), 0, p)[43:107, 43:107] for b, p in planes.items()}
    expected = expected_dr2(centre)
    for gz in (False, True):
        decoded = decode_cutout(fits_bytes(cube, header, gz=gz), spec=SPEC_64)
        np.testing.assert_array_equal(decoded.image, expected, err_msg=f"gz={gz}")
        assert decoded.info.crop_pad_from == (150, 150)
        # NaN fraction of the window read: 5 x 30 of its 64 x 64 pixels
        assert any(f"{5 * 30 / 64**2:.2%} of pixels" in w for w in decoded.info.warnings)


def test_reserve_refuses_before_any_pixel_is_read() -> None:
    class Refused(Exception):
        pass

    def refuse(nbytes: int, what: str) -> None:
        if what == "FITS image":
            raise Refused(nbytes)

    data = make_grz_fits(size=1024, gz=True)
    tracemalloc.start()
    try:
        with pytest.raises(Refused):
            decode_cutout(data, spec=SPEC_64, fit="resize", reserve=refuse)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * 2**20, peak  # headers only: 3 x 1024^2 float32 would be 12 MiB


@pytest.mark.parametrize("size", [(2048, 1536), (4096, 3072)])
def test_a_jpeg_of_any_size_is_decoded_in_full(size: tuple[int, int]) -> None:
    """A reduced-scale decode moves a trained model's answer by 0.002-0.20 (jpeg_draft.json),
    so every JPEG gets exactly the pixels a full decode gives, however large."""
    small = np.random.default_rng(4).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(small).resize(size, Image.Resampling.BICUBIC).save(
        buffer, format="JPEG", quality=90
    )
    decoded = decode_cutout(buffer.getvalue(), spec=SPEC_64)
    assert decoded.info.original_shape == (size[1], size[0], 3)
    assert decoded.info.crop_pad_from == (size[1], size[0])  # every pixel, none drafted away
    array = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    info = PreprocessInfo(format="jpeg", bands_used=["R", "G", "B"], original_shape=array.shape)
    np.testing.assert_array_equal(
        fit_rgb(array, (64, 64), "resize", info, "bicubic"), decoded.image
    )


def test_rendered_images_fit_alike_from_arrays_and_files() -> None:
    data = make_png(size=(100, 160), seed=4)
    decoded = decode_cutout(data, spec=SPEC_64)
    assert decoded.info.crop_pad_from == (100, 160) and decoded.info.resized_from == (100, 100)
    array = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    info = PreprocessInfo(format="png", bands_used=["R", "G", "B"], original_shape=(100, 160, 3))
    np.testing.assert_array_equal(
        fit_rgb(array, (64, 64), "resize", info, "bicubic"), decoded.image
    )
    grey = decode_cutout(make_png(size=(100, 160), mode="L", seed=4), spec=SPEC_64)
    assert (grey.image[..., 0] == grey.image[..., 2]).all()


def test_sixteen_bit_scaling_is_exact_for_every_value() -> None:
    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, format="PNG")
    decoded = decode_cutout(buffer.getvalue(), spec=SPEC_256)
    expected = np.clip(np.round(values.astype(np.float64) * 255 / 65535), 0, 255)
    np.testing.assert_array_equal(decoded.image[..., 0], expected.astype(np.uint8))
