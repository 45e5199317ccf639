"""The colour stretches, checked against arithmetic written out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from galmorph.core.cutouts.imaging import (
    DR2_RGB_SCALES,
    SINGLE_BAND_NOISE_NMGY,
    STRETCHES,
    dr2_grey,
    dr2_rgb,
    flip_north_up,
    get_stretch,
    lupton_grey,
    lupton_rgb,
    normalise_single_band,
    to_uint8,
)


def pixel(g: float, r: float, z: float) -> dict[str, np.ndarray]:
    return {
        band: np.full((1, 1), value, np.float32)
        for band, value in zip("grz", (g, r, z), strict=True)
    }


def test_dr2_rgb_blank_sky_is_grey_0127() -> None:
    # x = 0 in every band: x*s + m = 0.03 for g, r and z, so I = 0.03 and
    # f = asinh(20 * 0.03) / sqrt(20) = 0.568825 / 4.472136 = 0.127193;
    # each plane = 0.03 * f / I = f = 0.127193  ->  uint8 round(32.43) = 32.
    rgb = dr2_rgb(pixel(0.0, 0.0, 0.0))[0, 0]
    np.testing.assert_allclose(rgb, [0.127193] * 3, atol=1e-6)
    assert to_uint8(rgb).tolist() == [32, 32, 32]


def test_dr2_rgb_hand_computed_colour_pixel() -> None:
    # g = 0.01, r = 0.02, z = 0.05 nanomaggies:
    #   g: 0.01*6.0 + 0.03 = 0.090   r: 0.02*3.4 + 0.03 = 0.098   z: 0.05*2.2 + 0.03 = 0.140
    #   I = (0.090 + 0.098 + 0.140) / 3 = 0.109333
    #   f = asinh(20 * 0.109333) / sqrt(20) = asinh(2.186667) / 4.472136 = 1.524129 / 4.472136
    #     = 0.340806;  f / I = 3.117125
    #   R (z) = 0.140 * 3.117125 = 0.436397
    #   G (r) = 0.098 * 3.117125 = 0.305478
    #   B (g) = 0.090 * 3.117125 = 0.280541
    rgb = dr2_rgb(pixel(0.01, 0.02, 0.05))[0, 0]
    np.testing.assert_allclose(rgb, [0.436397, 0.305478, 0.280541], atol=2e-6)
    assert to_uint8(rgb).tolist() == [111, 78, 72]  # round(111.28), round(77.90), round(71.54)


def test_dr2_rgb_negative_band_clips_to_zero_and_bright_band_saturates() -> None:
    # g = -0.01: -0.06 + 0.03 = -0.03, excluded from I by max(0, .) and clipped to 0 in B.
    # z = 10: 22.03 dominates, R = clip(22.03 * f / I) = 1.
    rgb = dr2_rgb(pixel(-0.01, 0.0, 10.0))[0, 0]
    assert rgb[2] == 0.0
    assert rgb[0] == 1.0
    assert 0.0 < rgb[1] < 1.0


def test_dr2_rgb_zero_intensity_is_black() -> None:
    # All x*s + m < 0: I = 0 is replaced by 1e-6 and every plane clips to 0 (no division by 0).
    rgb = dr2_rgb(pixel(-1.0, -1.0, -1.0))[0, 0]
    assert rgb.tolist() == [0.0, 0.0, 0.0]


def test_dr2_rgb_maps_z_to_red_r_to_green_g_to_blue() -> None:
    for band, channel in (("z", 0), ("r", 1), ("g", 2)):
        values = {"g": 0.0, "r": 0.0, "z": 0.0, band: 0.3}
        rgb = dr2_rgb(pixel(values["g"], values["r"], values["z"]))[0, 0]
        assert int(np.argmax(rgb)) == channel, (band, rgb)
        assert DR2_RGB_SCALES[band][0] == channel


def test_dr2_rgb_is_per_pixel_and_float32() -> None:
    rng = np.random.default_rng(0)
    bands = {b: rng.normal(0, 0.5, (5, 7)).astype(np.float32) for b in "grz"}
    rgb = dr2_rgb(bands)
    assert rgb.shape == (5, 7, 3) and rgb.dtype == np.float32
    assert rgb.min() >= 0.0 and rgb.max() <= 1.0
    single = dr2_rgb({b: bands[b][2:3, 4:5] for b in "grz"})
    np.testing.assert_allclose(rgb[2, 4], single[0, 0], rtol=1e-6)


def test_dr2_grey_matches_dr2_rgb_on_colourless_flux() -> None:
    # Fluxes that give every band the same x*s (x_r * 3.4) make dr2_rgb grey; dr2_grey must
    # reproduce that grey, including the 0.127 of blank sky.
    x = np.array([[0.0, 0.01, 0.1, 1.0, -0.02]], np.float32)
    colourless = {b: x * 3.4 / DR2_RGB_SCALES[b][1] for b in "grz"}
    expected = dr2_rgb(colourless)
    grey = dr2_grey(x)
    for channel in range(3):
        np.testing.assert_allclose(grey, expected[..., channel], atol=1e-6)
    assert abs(float(grey[0, 0]) - 0.127193) < 1e-6


def test_lupton_blank_sky_black_monotonic_and_mapped() -> None:
    zero = lupton_rgb(pixel(0.0, 0.0, 0.0))[0, 0]
    assert zero.tolist() == [0.0, 0.0, 0.0]
    levels = [float(lupton_grey(np.full((1, 1), v, np.float32))[0, 0]) for v in (0.01, 0.1, 1)]
    assert levels == sorted(levels) and levels[0] > 0 and levels[-1] <= 1
    red = lupton_rgb(pixel(0.0, 0.0, 0.5))[0, 0]
    assert int(np.argmax(red)) == 0 and red[1] == 0 and red[2] == 0


def test_stretch_registry_by_name() -> None:
    assert {"dr2_rgb", "lupton"} <= set(STRETCHES)
    for name, stretch in STRETCHES.items():
        assert stretch.name == name and stretch.description
        rgb = stretch.render_bands(pixel(0.02, 0.05, 0.1))
        grey = stretch.render_grey(np.full((2, 2), 0.05, np.float32))
        assert rgb.shape == (1, 1, 3) and grey.shape == (2, 2)
    with pytest.raises(KeyError, match="valid stretches: dr2_rgb, lupton"):
        get_stretch("zscale")


def test_flip_north_up_reverses_rows_only() -> None:
    image = np.arange(12).reshape(3, 4)
    flipped = flip_north_up(image)
    assert flipped[0].tolist() == [8, 9, 10, 11]
    assert flipped[:, 0].tolist() == [8, 4, 0]


def test_to_uint8_rounds_and_clips() -> None:
    values = np.array([-0.1, 0.0, 0.5 / 255, 0.127193, 1.0, 1.5])
    assert to_uint8(values).tolist() == [0, 0, 0, 32, 255, 255]  # round-half-even at 0.5


def test_normalise_single_band_sets_sky_and_noise() -> None:
    rng = np.random.default_rng(1)
    image = (1000.0 + rng.normal(0, 25.0, (200, 200))).astype(np.float32)
    image[90:110, 90:110] += 5000.0  # a galaxy must not bias the robust estimates
    out = normalise_single_band(image)
    sky = out[:80, :80]
    assert abs(float(np.median(sky))) < 0.1 * SINGLE_BAND_NOISE_NMGY
    assert abs(float(sky.std()) / SINGLE_BAND_NOISE_NMGY - 1) < 0.05
    assert float(out[100, 100]) > 100 * SINGLE_BAND_NOISE_NMGY


def test_normalise_single_band_flat_image_is_blank() -> None:
    flat = np.full((8, 8), 7.0, np.float32)
    assert not normalise_single_band(flat).any()
