"""Synthetic Galaxy10: physically modelled galaxies rendered like Legacy Survey viewer cutouts.

Each image is a scene in g, r, z nanomaggies: Sérsic bulges, exponential disks seen at random
inclination and position angle, logarithmic spiral arms with star-forming clumps, bars and
rings, thin edge-on disks with dust lanes, tidal tails of mergers, clumpy irregulars, field
stars and faint background galaxies. The scene is convolved with a per-band Moffat PSF (FFT),
given correlated sky noise and source Poisson noise, and rendered with the viewer's `dr2_rgb`
stretch and north-up flip, exactly as `galmorph.core.cutouts.imaging` does for real FITS cutouts.

Geometry: every image covers the Galaxy10 field (256 x 0.262" = 67"), so `size` sets the pixel
scale (0.262" at 256 px, 1.048" at 64 px), as if Galaxy10 were resized. Pixel values are
surface brightness in nanomaggies per native 0.262" pixel, so a resampled cutout looks the same
under the stretch at any scale; the `pxscale` column and the FITS WCS give the real scale.

Every image draws from its own random generator seeded by (seed, index): the output is
identical whatever the number of workers.

With `votes`, the file also gets Galaxy Zoo-style vote counts (`votes`, (N, 10)): each galaxy's
vote fractions are drawn from a Dirichlet around its class (VOTE_AGREEMENT of the volunteers
choose it on average, VOTE_CONCENTRATION sets how much that varies between galaxies) and
that many volunteers vote by those fractions, so a few galaxies' most-voted class is not their
label, as in real Galaxy Zoo data.
"""

from __future__ import annotations

import csv
import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from galmorph.core.cutouts.imaging import dr2_rgb, flip_north_up, to_uint8
from galmorph.core.data.galaxy10 import GALAXY10_CLASS_NAMES
from galmorph.core.files import atomic_write
from galmorph.core.inputspec import LEGACY_SURVEY_PIXEL_SCALE

FIELD_PIXELS = 256  # Galaxy10 images: 256 px at the Legacy Survey scale
MIN_SIZE, MAX_SIZE = 64, 256
BANDS = "grz"
# Galaxy10 DECaLS class counts (DESIGN.md section 3), for Galaxy10-like class frequencies.
GALAXY10_COUNTS = (1081, 1853, 2645, 2027, 334, 2043, 1829, 2628, 1423, 1873)
CLASS_BALANCES = ("balanced", "galaxy10")
# Per-pixel sky noise in nanomaggies at 0.262" (DECaLS DR8-like depth), and a source
# "gain" (counts per nanomaggy) for Poisson noise.
SKY_SIGMA = np.array([0.0016, 0.0028, 0.0050], np.float32)
SOURCE_GAIN = 300.0
# PSF seeing (r-band FWHM, arcsec) is drawn from these values so PSF transforms can be cached.
SEEING_BINS = np.round(np.linspace(1.1, 1.6, 6), 3)
PSF_BAND_FACTOR = np.array([1.08, 1.0, 0.93])  # seeing is worse in g, better in z
MOFFAT_BETA = 3.5
NOISE_CORRELATION_PX = 0.9  # native-pixel correlation of coadd noise (resampling)
CHUNK = 32  # images per worker task
VOTE_AGREEMENT = 0.7  # mean share of volunteers who choose the galaxy's class
VOTE_CONCENTRATION = 10.0  # Dirichlet concentration of each galaxy's vote fractions


@dataclass(frozen=True)
class SynthOptions:
    n: int
    size: int = 256
    seed: int = 0
    class_balance: str = "balanced"  # "balanced" or "galaxy10" frequencies
    votes: int = 0  # volunteers per galaxy in a `votes` dataset; 0 writes none
    fits_dir: Path | None = None
    num_workers: int = 1
    progress: bool = True

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}")
        if not MIN_SIZE <= self.size <= MAX_SIZE:
            raise ValueError(f"size must be in {MIN_SIZE}..{MAX_SIZE}, got {self.size}")
        if self.seed < 0:
            raise ValueError(f"seed must be non-negative, got {self.seed}")
        if self.class_balance not in CLASS_BALANCES:
            raise ValueError(f"class_balance must be one of {CLASS_BALANCES}")
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be at least 1, got {self.num_workers}")
        if self.votes < 0:
            raise ValueError(f"votes (volunteers per galaxy) must be >= 0, got {self.votes}")


@dataclass(frozen=True)
class Galaxy:
    """One rendered galaxy: the grz flux cube (FITS orientation, row 0 south) and its RGB."""

    cube: np.ndarray  # float32 (3, S, S) nanomaggies
    rgb: np.ndarray  # uint8 (S, S, 3), north up
    redshift: float


def pixel_scale(size: int) -> float:
    """Arcsec per pixel of a `size`-pixel synthetic image (the Galaxy10 field at any size)."""
    return LEGACY_SURVEY_PIXEL_SCALE * FIELD_PIXELS / size


def synthesize(
    out: Path,
    *,
    n: int,
    size: int = 256,
    seed: int = 0,
    fits_dir: Path | None = None,
    num_workers: int = 1,
    class_balance: str = "balanced",
    votes: int = 0,
    progress: bool = True,
) -> Path:
    """Write a Galaxy10-layout HDF5 file of `n` synthetic galaxies (and optional FITS cutouts).

    `votes`: also write a `votes` dataset of that many volunteers' votes per galaxy.
    """
    options = SynthOptions(
        n=n,
        size=size,
        seed=seed,
        class_balance=class_balance,
        votes=votes,
        fits_dir=None if fits_dir is None else Path(fits_dir),
        num_workers=num_workers,
        progress=progress,
    )
    return _write(Path(out), options)


def class_labels(n: int, seed: int, class_balance: str = "balanced") -> np.ndarray:
    """Labels in a seeded random order with balanced or Galaxy10-like class frequencies."""
    k = len(GALAXY10_CLASS_NAMES)
    weights = np.ones(k) if class_balance == "balanced" else np.asarray(GALAXY10_COUNTS, float)
    ideal = n * weights / weights.sum()
    counts = np.floor(ideal).astype(np.int64)
    counts[np.argsort(-(ideal - counts), kind="stable")[: n - counts.sum()]] += 1
    labels = np.repeat(np.arange(k, dtype=np.int64), counts)
    return np.random.default_rng([seed, 0x6A1]).permutation(labels)


def vote_counts(labels: np.ndarray, volunteers: int, seed: int) -> np.ndarray:
    """Integer votes (N, 10) of `volunteers` per galaxy, drawn around each galaxy's class."""
    k = len(GALAXY10_CLASS_NAMES)
    rng = np.random.default_rng([seed, 0x707E])
    mean = np.full((labels.size, k), (1 - VOTE_AGREEMENT) / (k - 1))
    mean[np.arange(labels.size), labels] = VOTE_AGREEMENT
    # A Dirichlet draw per row, from gammas (numpy's dirichlet takes one alpha for all rows).
    shares = rng.gamma(VOTE_CONCENTRATION * mean)
    fractions = shares / shares.sum(axis=1, keepdims=True)
    return rng.multinomial(volunteers, fractions).astype(np.int32)


def sky_positions(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """RA, Dec (degrees) spread over a DECaLS-like footprint (-20 < Dec < +33)."""
    rng = np.random.default_rng([seed, 0x5C1])
    ra = rng.uniform(0.0, 360.0, n)
    sin_dec = rng.uniform(math.sin(math.radians(-20.0)), math.sin(math.radians(33.0)), n)
    return ra, np.degrees(np.arcsin(sin_dec))


def render_galaxy(label: int, size: int, rng: np.random.Generator) -> Galaxy:
    """Draw a galaxy of class `label` and render it as a `size`-pixel cutout."""
    grid = _grid(size)
    scene = _Scene(grid)
    redshift = float(rng.uniform(0.02, 0.12))
    _CLASS_RENDERERS[label](scene, rng, redshift)
    _add_field(scene, rng)
    cube = scene.render(rng)
    rgb = to_uint8(flip_north_up(dr2_rgb({b: cube[i] for i, b in enumerate(BANDS)})))
    return Galaxy(cube=cube, rgb=rgb, redshift=redshift)


# ---------------------------------------------------------------- geometry and rendering


@dataclass(frozen=True)
class _Grid:
    size: int
    pad: int  # light outside the stamp still falls in; also keeps FFT wrap-around off it
    scale: float  # arcsec per pixel
    x: np.ndarray  # (G, G) pixel offsets from the stamp centre, x east-west (columns)
    y: np.ndarray  # (G, G), y south->north (rows; row 0 south as in FITS)

    @property
    def full(self) -> int:
        return self.size + 2 * self.pad

    def px(self, arcsec: float) -> float:
        return arcsec / self.scale


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> _Grid:
    pad = max(8, size // 8)
    full = size + 2 * pad
    axis = np.arange(full, dtype=np.float32) - pad - (size - 1) / 2.0
    y, x = np.meshgrid(axis, axis, indexing="ij")
    return _Grid(size, pad, pixel_scale(size), x, y)


def _wrapped_radius2(size: int) -> np.ndarray:
    """Squared distance from pixel (0, 0) with wrap-around, for kernels used via FFT."""
    full = _grid(size).full
    offsets = np.fft.fftfreq(full, 1.0 / full).astype(np.float32)
    return offsets[:, None] ** 2 + offsets[None, :] ** 2


@functools.lru_cache(maxsize=64)
def _psf_transform(size: int, seeing: float) -> np.ndarray:
    """Moffat PSF per band, as rfft2 transforms (3, G, G//2+1), normalised to unit flux."""
    grid = _grid(size)
    r2 = _wrapped_radius2(size)
    transforms = []
    for factor in PSF_BAND_FACTOR:
        fwhm = grid.px(seeing * factor)
        alpha = fwhm / (2.0 * math.sqrt(2.0 ** (1.0 / MOFFAT_BETA) - 1.0))
        psf = (1.0 + r2 / alpha**2) ** -MOFFAT_BETA
        transforms.append(np.fft.rfft2(psf / psf.sum()))
    return np.stack(transforms).astype(np.complex64)


@functools.lru_cache(maxsize=256)
def _gaussian(size: int, sigma_px: float) -> tuple[np.ndarray, float]:
    """Unit-sum Gaussian kernel sampled in real space, as an rfft2 transform, and its noise gain.

    Sampling in real space, not Fourier space, matters for sub-pixel widths: a Gaussian cut off
    at the Nyquist frequency rings across the whole image next to bright sources.
    """
    r2 = _wrapped_radius2(size)
    kernel = np.exp(-r2 / np.float32(2.0 * max(sigma_px, 0.05) ** 2))
    kernel /= kernel.sum()
    return np.fft.rfft2(kernel).astype(np.complex64), float(np.sqrt((kernel**2).sum()))


def _blur(size: int, sigma_arcsec: float) -> np.ndarray:
    # Widths are rounded to 0.05" so a few cached kernels serve every image.
    sigma = round(sigma_arcsec * 20.0) / 20.0
    return _gaussian(size, sigma / pixel_scale(size))[0]


class _Scene:
    """Light of one cutout in g, r, z, in four layers that get different blurs."""

    def __init__(self, grid: _Grid) -> None:
        self.grid = grid
        self.smooth = np.zeros((3, grid.full, grid.full), np.float32)  # analytic profiles
        # Deposited sources: PSF only, PSF + compact blur (clumps, distant galaxies),
        # PSF + diffuse blur (tidal tails, plumes).
        self.deposits: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {
            "point": [],
            "compact": [],
            "diffuse": [],
        }
        self.compact_sigma = 0.45  # arcsec
        self.diffuse_sigma = 1.8  # arcsec
        # Surface-brightness convention: light per native 0.262" pixel.
        self.flux_to_pixel = (LEGACY_SURVEY_PIXEL_SCALE / grid.scale) ** 2

    def add_profile(self, profile: np.ndarray, flux: np.ndarray) -> None:
        """Add a unit-sum profile (G, G), or per-band profiles (3, G, G), with grz `flux`."""
        weights = flux.astype(np.float32)[:, None, None] * self.flux_to_pixel
        self.smooth += weights * profile

    def add_sources(self, layer: str, x: np.ndarray, y: np.ndarray, flux: np.ndarray) -> None:
        """Add sources at pixel offsets (x, y) with grz fluxes (M, 3) to a deposit layer."""
        self.deposits[layer].append((np.atleast_1d(x), np.atleast_1d(y), np.atleast_2d(flux)))

    def render(self, rng: np.random.Generator) -> np.ndarray:
        grid = self.grid
        full = grid.full
        seeing = float(rng.choice(SEEING_BINS))
        total = np.fft.rfft2(self.smooth + self._deposit("point"))
        for layer, sigma in (("compact", self.compact_sigma), ("diffuse", self.diffuse_sigma)):
            if self.deposits[layer]:
                total += np.fft.rfft2(self._deposit(layer)) * _blur(grid.size, sigma)
        total *= _psf_transform(grid.size, seeing)
        # Sky noise: white noise given the coadd's pixel correlation, at this image's depth.
        # Coarser pixels average more native pixels: sigma falls with the linear scale.
        depth = rng.uniform(0.75, 1.3) * grid.size / FIELD_PIXELS
        noise_filter, noise_gain = _gaussian(
            grid.size, NOISE_CORRELATION_PX * grid.size / FIELD_PIXELS
        )
        white = rng.standard_normal((3, full, full), dtype=np.float32)
        sky_sigma = SKY_SIGMA * depth / noise_gain
        total += np.fft.rfft2(white) * noise_filter * sky_sigma[:, None, None]
        image = np.fft.irfft2(total, s=(full, full)).astype(np.float32)
        p, s = grid.pad, grid.size
        cube = image[:, p : p + s, p : p + s]
        source = np.maximum(cube, 0.0) / SOURCE_GAIN * (grid.size / FIELD_PIXELS) ** 2
        cube += np.sqrt(source) * rng.standard_normal(cube.shape, dtype=np.float32)
        # Imperfect sky subtraction: a small residual pedestal per band.
        cube += (SKY_SIGMA * rng.normal(0.0, 0.03, 3)).astype(np.float32)[:, None, None]
        return np.ascontiguousarray(cube)

    def _deposit(self, layer: str) -> np.ndarray:
        """Bilinear deposit of a layer's sources onto the padded grid, per band."""
        full = self.grid.full
        out = np.zeros((3, full * full), np.float32)
        if not self.deposits[layer]:
            return out.reshape(3, full, full)
        x = np.concatenate([d[0] for d in self.deposits[layer]])
        y = np.concatenate([d[1] for d in self.deposits[layer]])
        flux = np.concatenate([d[2] for d in self.deposits[layer]]) * self.flux_to_pixel
        col = x + self.grid.pad + (self.grid.size - 1) / 2.0
        row = y + self.grid.pad + (self.grid.size - 1) / 2.0
        c0, r0 = np.floor(col).astype(np.int64), np.floor(row).astype(np.int64)
        fc, fr = col - c0, row - r0
        for dr, dc, weight in (
            (0, 0, (1 - fr) * (1 - fc)),
            (0, 1, (1 - fr) * fc),
            (1, 0, fr * (1 - fc)),
            (1, 1, fr * fc),
        ):
            rr, cc = r0 + dr, c0 + dc
            inside = (rr >= 0) & (rr < full) & (cc >= 0) & (cc < full)
            index = rr[inside] * full + cc[inside]
            for band in range(3):
                out[band] += np.bincount(
                    index, weights=flux[inside, band] * weight[inside], minlength=full * full
                ).astype(np.float32)
        return out.reshape(3, full, full)


# ---------------------------------------------------------------- light profiles


def _rotated(grid: _Grid, x0: float, y0: float, pa: float) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates along (u) and across (v) a major axis at position angle `pa` (radians)."""
    dx, dy = grid.x - np.float32(x0), grid.y - np.float32(y0)
    c, s = np.float32(math.cos(pa)), np.float32(math.sin(pa))
    return dx * c + dy * s, dy * c - dx * s


def _unit(profile: np.ndarray) -> np.ndarray:
    total = float(profile.sum())
    return profile / np.float32(total) if total > 0 else profile


def _sersic_b(n: float) -> float:
    return 2.0 * n - 1.0 / 3.0 + 4.0 / (405.0 * n) + 46.0 / (25515.0 * n * n)


def sersic(
    grid: _Grid, x0: float, y0: float, re_px: float, n: float, q: float, pa: float
) -> np.ndarray:
    """Unit-sum Sérsic profile; the radius is softened by half a pixel to tame the cusp."""
    u, v = _rotated(grid, x0, y0, pa)
    r = np.sqrt(u * u + (v / np.float32(q)) ** 2 + np.float32(0.25))
    return _unit(np.exp(np.float32(-_sersic_b(n)) * (r / np.float32(re_px)) ** np.float32(1 / n)))


def _disk_plane(
    grid: _Grid, x0: float, y0: float, pa: float, axis_ratio: float
) -> tuple[np.ndarray, np.ndarray]:
    """Radius and azimuth in the plane of a disk seen with apparent `axis_ratio`."""
    u, v = _rotated(grid, x0, y0, pa)
    v = v / np.float32(axis_ratio)
    return np.sqrt(u * u + v * v + np.float32(0.25)), np.arctan2(v, u)


def _apparent_axis_ratio(cos_i: float, thickness: float = 0.12) -> float:
    return math.sqrt(cos_i**2 + thickness**2 * (1.0 - cos_i**2))


def _plane_to_sky(
    radius: np.ndarray, azimuth: np.ndarray, x0: float, y0: float, pa: float, axis_ratio: float
) -> tuple[np.ndarray, np.ndarray]:
    u, v = radius * np.cos(azimuth), radius * np.sin(azimuth) * axis_ratio
    c, s = math.cos(pa), math.sin(pa)
    return x0 + u * c - v * s, y0 + u * s + v * c


# ---------------------------------------------------------------- colours and scales


def _flux(rng: np.random.Generator, mag_r: float, g_r: float, r_z: float) -> np.ndarray:
    """grz fluxes (nanomaggies) of a source of r magnitude `mag_r` and the given colours."""
    f_r = 10.0 ** ((22.5 - mag_r) / 2.5)
    return np.array([f_r * 10.0 ** (-0.4 * g_r), f_r, f_r * 10.0 ** (0.4 * r_z)])


# (g-r, r-z) mean colours of stellar populations at low redshift; redshift reddens a little.
_COLOURS = {
    "old": (0.80, 0.47),
    "disk": (0.58, 0.38),
    "young": (0.28, 0.18),
    "irregular": (0.42, 0.26),
}


def _colour(rng: np.random.Generator, kind: str, redshift: float) -> tuple[float, float]:
    g_r, r_z = _COLOURS[kind]
    return (
        g_r + 1.2 * redshift + rng.normal(0.0, 0.05),
        r_z + 0.5 * redshift + rng.normal(0.0, 0.04),
    )


@dataclass(frozen=True)
class _Host:
    """Where and how big the main galaxy is, in pixels of this grid."""

    x: float
    y: float
    pa: float
    scale: float  # disk scale length in pixels
    mag_r: float


def _host(scene: _Scene, rng: np.random.Generator, redshift: float, size: float = 1.0) -> _Host:
    """Closer galaxies look bigger and brighter; Galaxy10 galaxies are r < 17.8."""
    distance = 0.06 / redshift
    arcsec = float(np.clip(5.2 * size * distance**0.55 * rng.lognormal(0.0, 0.2), 2.0, 10.0))
    mag_r = 15.7 - 2.5 * math.log10(distance**2) * 0.6 + rng.normal(0.0, 0.35)
    offset = rng.normal(0.0, 1.0, 2) / scene.grid.scale
    return _Host(
        x=float(offset[0]),
        y=float(offset[1]),
        pa=float(rng.uniform(0.0, math.pi)),
        scale=scene.grid.px(arcsec),
        mag_r=float(min(mag_r, 17.6)),
    )


def _split_flux(mag_r: float, fraction: float) -> float:
    return mag_r - 2.5 * math.log10(max(fraction, 1e-4))


# ---------------------------------------------------------------- class recipes


def _smooth_galaxy(
    scene: _Scene,
    rng: np.random.Generator,
    redshift: float,
    axis_ratio: tuple[float, float],
    sersic_n: tuple[float, float],
    size: float = 1.0,
) -> None:
    host = _host(scene, rng, redshift, size)
    n = rng.uniform(*sersic_n)
    q = rng.uniform(*axis_ratio)
    re_px = host.scale * rng.uniform(0.9, 1.4)
    colour = _colour(rng, "old", redshift)
    profile = sersic(scene.grid, host.x, host.y, re_px, n, q, host.pa)
    scene.add_profile(profile, _flux(rng, host.mag_r, *colour))


def _round_smooth(scene: _Scene, rng: np.random.Generator, redshift: float) -> None:
    _smooth_galaxy(scene, rng, redshift, (0.8, 1.0), (2.5, 5.0))


def _in_between_smooth(scene: _Scene, rng: np.random.Generator, redshift: float) -> None:
    _smooth_galaxy(scene, rng, redshift, (0.45, 0.78), (1.5, 4.0))


def _cigar_smooth(scene: _Scene, rng: np.random.Generator, redshift: float) -> None:
    _smooth_galaxy(scene, rng, redshift, (0.2, 0.42), (0.8, 2.5), size=0.9)


@dataclass(frozen=True)
class _SpiralRecipe:
    bulge_fraction: tuple[float, float]
    arm_fraction: tuple[float, float]
    pitch_deg: tuple[float, float]
    arm_counts: tuple[int, ...]
    barred: bool
    clumps: tuple[int, int]


def _spiral(
    scene: _Scene, rng: np.random.Generator, redshift: float, recipe: _SpiralRecipe
) -> None:
    grid = scene.grid
    host = _host(scene, rng, redshift, size=1.0)
    cos_i = rng.uniform(0.45, 1.0)
    q = _apparent_axis_ratio(cos_i)
    radius, azimuth = _disk_plane(grid, host.x, host.y, host.pa, q)
    h = np.float32(host.scale)
    disk = np.exp(-radius / h)
    bulge_fraction = rng.uniform(*recipe.bulge_fraction)
    arm_fraction = rng.uniform(*recipe.arm_fraction)
    bar_fraction = rng.uniform(0.08, 0.18) if recipe.barred else 0.0
    disk_fraction = 1.0 - bulge_fraction - arm_fraction - bar_fraction

    # Logarithmic arms; a bar's arms start at its ends.
    arms = int(rng.choice(recipe.arm_counts))
    pitch = math.radians(rng.uniform(*recipe.pitch_deg))
    inner = host.scale * rng.uniform(0.5, 0.9)
    bar_angle = float(rng.uniform(0.0, math.pi))
    phase0 = -arms * bar_angle if recipe.barred else rng.uniform(0.0, 2 * math.pi)
    winding = np.log(radius / np.float32(inner)) / np.float32(math.tan(pitch))
    phase = arms * (azimuth - winding) + np.float32(phase0)
    sharpness = np.float32(rng.uniform(2.0, 5.0))
    ridge = (np.float32(0.5) * (np.float32(1.0) + np.cos(phase))) ** sharpness
    taper = np.float32(1.0) - np.exp(-((radius / np.float32(inner)) ** 2))
    arm_light = disk * ridge * taper * np.exp(-radius / np.float32(2.5 * host.scale))

    scene.add_profile(
        _unit(disk),
        _flux(rng, _split_flux(host.mag_r, disk_fraction), *_colour(rng, "disk", redshift)),
    )
    young = _colour(rng, "young", redshift)
    scene.add_profile(_unit(arm_light), _flux(rng, _split_flux(host.mag_r, arm_fraction), *young))
    bulge = sersic(
        grid,
        host.x,
        host.y,
        host.scale * rng.uniform(0.25, 0.45),
        rng.uniform(1.5, 3.5),
        max(q, rng.uniform(0.7, 1.0)),
        host.pa,
    )
    scene.add_profile(
        bulge, _flux(rng, _split_flux(host.mag_r, bulge_fraction), *_colour(rng, "old", redshift))
    )
    if recipe.barred:
        length = np.float32(inner)
        along = radius * np.cos(azimuth - np.float32(bar_angle))
        across = radius * np.sin(azimuth - np.float32(bar_angle))
        r_bar = np.sqrt(along**2 + (across / np.float32(rng.uniform(0.2, 0.32))) ** 2)
        bar = np.exp(-((r_bar / length) ** np.float32(3.0)))
        scene.add_profile(
            _unit(bar),
            _flux(rng, _split_flux(host.mag_r, bar_fraction), *_colour(rng, "old", redshift)),
        )
    # Star-forming clumps along the arm ridges.
    count = int(rng.integers(*recipe.clumps))
    if count:
        r_clump = inner + rng.gamma(2.0, host.scale * 0.8, count)
        arm_index = rng.integers(0, arms, count)
        theta = (
            np.log(r_clump / inner) / math.tan(pitch)
            + (2 * math.pi * arm_index - phase0) / arms
            + rng.normal(0.0, 0.12, count)
        )
        x, y = _plane_to_sky(r_clump, theta, host.x, host.y, host.pa, q)
        weights = rng.dirichlet(np.ones(count)) * arm_fraction * 0.3
        mags = np.array([_split_flux(host.mag_r, w) for w in weights])
        fluxes = np.stack([_flux(rng, m, *_colour(rng, "young", redshift)) for m in mags])
        scene.add_sources("compact", x, y, fluxes)


def _barred_spiral(scene: _Scene, rng: np.random.Generator, redshift: float) -> None:
    _spiral(
        scene, rng, redshift, _SpiralRecipe((0.08, 0.3), (0.15, 0.3), (12, 26), (2,), True, (0, 12))
    )


def _tight_spiral(scene: _Scene, rng: np.random.Generator, redshift: float) -> None:
    _spiral(
        scene,
        rng,
        redshift,
        _SpiralRecipe((0.12, 0.35), (0.15, 0.3), (6, 13), (2, 3), False, (0, 15)),
    )


def _loose_spiral(scene: _Scene, rng: np.random.Generator, redshift: float) -> None:
    _spiral(
        scene,
        rng,
        redshift,
        _SpiralRecipe((0.03, 0.18), (0.25, 0.45), (20, 34), (2, 2, 3), False, (5, 25)),
    )


def _edge_on(scene: _Scene, rng: np.random.Generator, redshift: float, bulge: bool) -> None:
    grid = scene.grid
    host = _host(scene, rng, redshift, size=1.1)
    u, v = _rotated(grid, host.x, host.y, host.pa)
    h = np.float32(host.scale)
    z0 = np.float32(host.scale * (rng.uniform(0.12, 0.25) if bulge else rng.uniform(0.08, 0.18)))
    radial = np.exp(-np.sqrt(u * u + (0.3 * h) ** 2) / h)
    decay = np.exp(-2.0 * np.abs(v / z0))
    disk = _unit(radial * decay / (1.0 + decay) ** 2)  # sech^2 without overflow
    bulge_fraction = rng.uniform(0.35, 0.65) if bulge else rng.uniform(0.0, 0.04)
    # A dust lane along the mid-plane dims blue light most.
    lane = np.float32(0.0)
    if rng.random() < (0.7 if bulge else 0.4):
        width = z0 * np.float32(rng.uniform(0.4, 0.8))
        offset = z0 * np.float32(rng.normal(0.0, 0.3))
        lane = np.exp(-(((v - offset) / width) ** 2)) * np.exp(-np.abs(u) / (np.float32(3.0) * h))
    tau = np.float32(rng.uniform(0.3, 0.8)) * np.array([1.0, 0.72, 0.45], np.float32)
    attenuation = np.float32(1.0) - tau[:, None, None] * lane
    disk_kind = "old" if bulge and rng.random() < 0.5 else "disk"
    scene.add_profile(
        disk * attenuation,
        _flux(rng, _split_flux(host.mag_r, 1 - bulge_fraction), *_colour(rng, disk_kind, redshift)),
    )
    if bulge_fraction > 0:
        profile = sersic(
            grid,
            host.x,
            host.y,
            host.scale * rng.uniform(0.5, 0.9),
            rng.uniform(1.5, 4.0),
            rng.uniform(0.6, 0.9),
            host.pa,
        )
        scene.add_profile(
            profile * attenuation,
            _flux(rng, _split_flux(host.mag_r, bulge_fraction), *_colour(rng, "old", redshift)),
        )


def _edge_on_without_bulge(scene: _Scene, rng: np.random.Generator, redshift: float) -> None:
    _edge_on(scene, rng, redshift, bulge=False)


def _edge_on_with_bulge(scene: _Scene, rng: np.random.Generator, redshift: float) -> None:
    _edge_on(scene, rng, redshift, bulge=True)


def _disturbed(scene: _Scene, rng: np.random.Generator, redshift: float) -> None:
    """Irregular: a lopsided, warped low-surface-brightness disk broken into blue clumps."""
    grid = scene.grid
    host = _host(scene, rng, redshift, size=1.0)
    q = _apparent_axis_ratio(rng.uniform(0.3, 1.0))
    u, v = _rotated(grid, host.x, host.y, host.pa)
    h = np.float32(host.scale)
    v = (v - np.float32(rng.normal(0.0, 0.25)) * u * u / h) / np.float32(q)  # warp
    radius = np.sqrt(u * u + v * v + np.float32(0.25))
    azimuth = np.arctan2(v, u)
    lopsided = np.float32(1.0) + np.float32(rng.uniform(0.2, 0.5)) * np.cos(
        azimuth - np.float32(rng.uniform(0, 2 * math.pi))
    )
    mag_r = host.mag_r + rng.uniform(0.3, 1.0)  # irregulars are fainter for their size
    clump_fraction = rng.uniform(0.2, 0.4)
    scene.add_profile(
        _unit(np.exp(-radius * lopsided / h)),
        _flux(rng, _split_flux(mag_r, 1 - clump_fraction), *_colour(rng, "irregular", redshift)),
    )
    count = int(rng.integers(4, 14))
    r_clump = rng.gamma(1.8, host.scale * 0.8, count)
    theta = rng.uniform(0.0, 2 * math.pi, count)
    x, y = _plane_to_sky(r_clump, theta, host.x, host.y, host.pa, q)
    weights = rng.dirichlet(np.full(count, 0.7)) * clump_fraction
    fluxes = np.stack(
        [_flux(rng, _split_flux(mag_r, w), *_colour(rng, "young", redshift)) for w in weights]
    )
    layer = rng.random(count) < 0.5
    scene.add_sources("compact", x[layer], y[layer], fluxes[layer])
    scene.add_sources("diffuse", x[~layer], y[~layer], fluxes[~layer])
    scene.compact_sigma = float(rng.uniform(0.6, 1.1))  # star-forming knots, not point-like
    scene.diffuse_sigma = float(rng.uniform(1.0, 1.8))


def _merging(scene: _Scene, rng: np.random.Generator, redshift: float) -> None:
    """Two systems close together, with tidal tails and a shared envelope."""
    grid = scene.grid
    host = _host(scene, rng, redshift, size=1.0)
    separation = host.scale * rng.uniform(1.0, 3.5)
    angle = rng.uniform(0.0, 2 * math.pi)
    ratio = rng.uniform(0.25, 1.0)  # secondary / primary flux
    centres = [
        (
            host.x - separation * ratio / (1 + ratio) * math.cos(angle),
            host.y - separation * ratio / (1 + ratio) * math.sin(angle),
        ),
        (
            host.x + separation / (1 + ratio) * math.cos(angle),
            host.y + separation / (1 + ratio) * math.sin(angle),
        ),
    ]
    tail_fraction = rng.uniform(0.15, 0.35)
    shares = np.array([1.0, ratio]) / (1 + ratio) * (1 - tail_fraction)
    for (x0, y0), share, scale in zip(centres, shares, (1.0, math.sqrt(ratio)), strict=True):
        kind = "old" if rng.random() < 0.5 else "disk"
        n = rng.uniform(2.0, 4.0) if kind == "old" else rng.uniform(0.8, 1.5)
        profile = sersic(
            grid,
            x0,
            y0,
            host.scale * scale * rng.uniform(0.6, 1.1),
            n,
            rng.uniform(0.5, 1.0),
            rng.uniform(0.0, math.pi),
        )
        scene.add_profile(
            profile, _flux(rng, _split_flux(host.mag_r, share), *_colour(rng, kind, redshift))
        )
    # Tidal tails: curved streams of points leaving each nucleus, fading outwards.
    tails = int(rng.integers(1, 3))
    for tail in range(tails):
        x0, y0 = centres[tail % 2]
        steps = 80
        t = np.linspace(0.0, 1.0, steps)
        start = rng.uniform(0.0, 2 * math.pi)
        sweep = rng.uniform(0.8, 2.2) * rng.choice([-1.0, 1.0])
        length = host.scale * rng.uniform(3.0, 6.0)
        radius = host.scale * 0.6 + length * t
        theta = start + sweep * t
        x = x0 + radius * np.cos(theta) + rng.normal(0.0, 0.5, steps)
        y = y0 + radius * np.sin(theta) + rng.normal(0.0, 0.5, steps)
        weights = np.exp(-3.0 * t)
        weights *= tail_fraction / tails / weights.sum()
        colour = _colour(rng, "disk", redshift)
        fluxes = np.stack([_flux(rng, _split_flux(host.mag_r, w), *colour) for w in weights])
        scene.add_sources("diffuse", x, y, fluxes)
    scene.diffuse_sigma = float(rng.uniform(1.2, 2.6))


_CLASS_RENDERERS = (
    _disturbed,
    _merging,
    _round_smooth,
    _in_between_smooth,
    _cigar_smooth,
    _barred_spiral,
    _tight_spiral,
    _loose_spiral,
    _edge_on_without_bulge,
    _edge_on_with_bulge,
)


def _add_field(scene: _Scene, rng: np.random.Generator) -> None:
    """Foreground stars and faint background galaxies over the 67" field."""
    half = scene.grid.size / 2.0 + scene.grid.pad
    stars = int(rng.poisson(6.0))
    if stars:
        x, y = rng.uniform(-half, half, (2, stars))
        mags = 23.5 - rng.exponential(1.6, stars)  # mostly faint
        mags = np.maximum(mags, 15.0)
        g_r = rng.uniform(0.2, 1.5, stars)
        r_z = np.where(g_r > 1.2, rng.uniform(0.8, 2.0, stars), 0.4 * g_r + rng.normal(0, 0.05))
        fluxes = np.stack([_flux(rng, m, a, b) for m, a, b in zip(mags, g_r, r_z, strict=True)])
        scene.add_sources("point", x, y, fluxes)
    distant = int(rng.poisson(12.0))
    if distant:
        x, y = rng.uniform(-half, half, (2, distant))
        mags = np.maximum(23.8 - rng.exponential(1.2, distant), 19.5)
        red = rng.random(distant) < 0.6
        g_r = np.where(red, rng.uniform(1.0, 1.8, distant), rng.uniform(0.3, 0.7, distant))
        r_z = np.where(red, rng.uniform(0.7, 1.3, distant), rng.uniform(0.2, 0.5, distant))
        fluxes = np.stack([_flux(rng, m, a, b) for m, a, b in zip(mags, g_r, r_z, strict=True)])
        scene.add_sources("compact", x, y, fluxes)


# ---------------------------------------------------------------- output files


def _render_chunk(
    task: tuple[int, np.ndarray, np.ndarray, np.ndarray, SynthOptions],
) -> tuple[int, np.ndarray, np.ndarray]:
    """Render a run of images (worker entry point); writes their FITS cutouts if asked."""
    start, labels, ra, dec, options = task
    images = np.empty((labels.size, options.size, options.size, 3), np.uint8)
    redshifts = np.empty(labels.size, np.float32)
    for offset, label in enumerate(labels):
        index = start + offset
        galaxy = render_galaxy(
            int(label), options.size, np.random.default_rng([options.seed, index])
        )
        images[offset] = galaxy.rgb
        redshifts[offset] = galaxy.redshift
        if options.fits_dir is not None:
            _write_fits(
                options.fits_dir / _fits_name(options.seed, index),
                galaxy,
                ra=float(ra[offset]),
                dec=float(dec[offset]),
                label=int(label),
                scale=pixel_scale(options.size),
            )
    return start, images, redshifts


def _id_str(seed: int, index: int) -> str:
    return f"synth{seed}-{index:07d}"


def _fits_name(seed: int, index: int) -> str:
    return _id_str(seed, index) + ".fits"


def _write_fits(
    path: Path, galaxy: Galaxy, *, ra: float, dec: float, label: int, scale: float
) -> None:
    """A Legacy Survey style cutout: grz cube, BANDS/BANDn, TAN WCS, row 0 south."""
    from astropy.io import fits

    size = galaxy.cube.shape[-1]
    header = fits.Header()
    header["BUNIT"] = ("nanomaggy", "surface brightness per 0.262 arcsec pixel")
    header["BANDS"] = BANDS
    for i, band in enumerate(BANDS):
        header[f"BAND{i}"] = band
    header["CTYPE1"] = "RA---TAN"
    header["CTYPE2"] = "DEC--TAN"
    header["CRVAL1"] = ra
    header["CRVAL2"] = dec
    header["CRPIX1"] = (size + 1) / 2.0
    header["CRPIX2"] = (size + 1) / 2.0
    header["CD1_1"] = -scale / 3600.0
    header["CD1_2"] = 0.0
    header["CD2_1"] = 0.0
    header["CD2_2"] = scale / 3600.0
    header["PIXSCALE"] = (scale, "arcsec per pixel")
    header["GMLABEL"] = (label, "galmorph synthetic Galaxy10 class")
    header["GMCLASS"] = GALAXY10_CLASS_NAMES[label]
    hdu = fits.PrimaryHDU(data=galaxy.cube.astype(np.float32), header=header)
    with atomic_write(path) as tmp:
        hdu.writeto(tmp)


def _tasks(
    options: SynthOptions, labels: np.ndarray, ra: np.ndarray, dec: np.ndarray
) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray, SynthOptions]]:
    for start in range(0, options.n, CHUNK):
        stop = min(start + CHUNK, options.n)
        yield start, labels[start:stop], ra[start:stop], dec[start:stop], options


def _write(out: Path, options: SynthOptions) -> Path:
    import multiprocessing

    import h5py
    from tqdm import tqdm

    labels = class_labels(options.n, options.seed, options.class_balance)
    ra, dec = sky_positions(options.n, options.seed)
    if options.fits_dir is not None:
        options.fits_dir.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    size = options.size
    # The pool is started before any HDF5 handle exists, so no worker inherits one.
    pool = (
        multiprocessing.get_context().Pool(options.num_workers) if options.num_workers > 1 else None
    )
    try:
        results = (
            pool.imap(_render_chunk, _tasks(options, labels, ra, dec))
            if pool is not None
            else map(_render_chunk, _tasks(options, labels, ra, dec))
        )
        with (
            atomic_write(out) as tmp,
            h5py.File(tmp, "w") as handle,
            tqdm(total=options.n, unit="img", desc="synth", disable=not options.progress) as bar,
        ):
            images = handle.create_dataset(
                "images", (options.n, size, size, 3), np.uint8, chunks=(1, size, size, 3)
            )
            redshift = handle.create_dataset("redshift", (options.n,), np.float32)
            for start, chunk, chunk_z in results:
                images[start : start + len(chunk)] = chunk
                redshift[start : start + len(chunk)] = chunk_z
                bar.update(len(chunk))
            handle.create_dataset("ans", data=labels.astype(np.uint8))
            if options.votes:
                votes = vote_counts(labels, options.votes, options.seed)
                handle.create_dataset("votes", data=votes)
                handle.attrs["volunteers"] = options.votes
            handle.create_dataset("ra", data=ra)
            handle.create_dataset("dec", data=dec)
            handle.create_dataset("pxscale", data=np.full(options.n, pixel_scale(size), np.float32))
            handle.attrs["class_names"] = list(GALAXY10_CLASS_NAMES)
            handle.attrs["generator"] = "galmorph synth"
            handle.attrs["seed"] = options.seed
            handle.attrs["class_balance"] = options.class_balance
    except BaseException:
        if pool is not None:
            pool.terminate()
        raise
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    if options.fits_dir is not None:
        _write_catalog(options, labels, ra, dec)
    return out


def _write_catalog(
    options: SynthOptions, labels: np.ndarray, ra: np.ndarray, dec: np.ndarray
) -> Path:
    assert options.fits_dir is not None
    path = options.fits_dir / "catalog.csv"
    with atomic_write(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id_str", "file_loc", "ra", "dec", "label"])
        for index in range(options.n):
            writer.writerow(
                [
                    _id_str(options.seed, index),
                    _fits_name(options.seed, index),
                    f"{ra[index]:.7f}",
                    f"{dec[index]:.7f}",
                    int(labels[index]),
                ]
            )
    return path
