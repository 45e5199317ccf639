"""Read the first image of an untrusted FITS file (plain, gzip or fpack) with limits first.

The file is walked HDU by HDU: each header is parsed alone (astropy `Header.fromstring`), the
declared shape is checked against `DecodeLimits` (413) and only then are the data bytes
read or decompressed. At most `max_fits_hdus` HDUs and `max_fits_header_cards` header cards
(`MAX_HEADER_CARDS` in one header) are walked before the image (413 beyond), so a flood of
empty extensions costs little. gzip is decompressed incrementally, never past what the
headers declare or `max_decompressed_bytes`, so a gzip bomb costs at most the cap.

Before any pixel is read, the bands are picked by name from the header, the caller chooses
the window of the image it needs (`window`, e.g. the model's field of view) and is told the
most memory the read will take (`reserve`). Plain float images (the Legacy Survey's, HST's,
SDSS's) are then read as a section: only the rows of the window, of the planes used, are
read or decompressed and converted; the rest of a gzip stream is inflated and discarded, only
to prove the file whole. Other images (BSCALE/BZERO, BLANK, tile compression) are read whole
by astropy and cut to the window.

Policies:
- Bands: `BANDn` keys (n = 0..planes-1), else `BANDS` ('grz' or 'g,r,z'); g, r and z are
  picked by name (griz cubes work); a missing one is a 422 naming it. A 3-plane cube without
  names is read as g, r, z with a warning; other unnamed cubes are a 422. Leading axes of
  length 1 are dropped, so (1, H, W) and (1, 1, H, W) are single-band images.
- NaN/inf pixels become 0 flux (the Legacy Survey "no coverage" value) with a warning giving
  the fraction; an image with no finite pixel is a 422.
- Pixel scale: astropy WCS (celestial part, `proj_plane_pixel_scales`), in arcsec per pixel
  along x and y; None when the header has no usable celestial WCS.
"""

from __future__ import annotations

import math
import re
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache, lru_cache

import numpy as np
from astropy.io import fits
from astropy.io.fits.verify import VerifyError

from galmorph.core.cutouts.formats import FITS_MAGIC, GZIP_MAGIC
from galmorph.core.cutouts.limits import (
    CutoutError,
    CutoutErrorKind,
    DecodeLimits,
    Reserve,
    reserve_nothing,
)

BLOCK = 2880
CARD = 80
MAX_HEADER_BLOCKS = 200  # one header's cap; HST drizzled headers have ~1600 cards
MAX_HEADER_CARDS = MAX_HEADER_BLOCKS * BLOCK // CARD  # 7200
VALID_BITPIX = {8, 16, 32, 64, -32, -64}
_PLAIN_FLOAT_DTYPES = {-32: ">f4", -64: ">f8"}
COLOUR_BANDS = ("g", "r", "z")
# Cards astropy needs to interpret an uncompressed image HDU, plus the band names.
_STRUCTURE_KEYS = re.compile(
    r"SIMPLE|XTENSION|BITPIX|NAXIS\d*|PCOUNT|GCOUNT|GROUPS|BSCALE|BZERO|BLANK|"
    r"BANDS|BAND\d+|FILTER|ZIMAGE|ZBITPIX|ZNAXIS\d*"
)
# The projection-plane pixel scale depends only on the linear part of the WCS (CD, or CDELT
# with PC/CROTA) and on which axes are celestial (CTYPE) in which units (CUNIT); not on where
# the cutout points (CRVAL, CRPIX), nor on distortions. Keying on these cards alone lets one
# survey's cutouts share a single cached WCS parse, which otherwise costs ~3 ms per cutout.
_SCALE_KEYS = re.compile(r"WCSAXES|CTYPE\d|CUNIT\d|CDELT\d|CROTA\d|CD\d_\d|PC\d_\d")
_GZIP_INPUT_CHUNK = 1 << 16
_INFLATE_CHUNK = 1 << 20  # most bytes one inflate call may produce

Window = Callable[[tuple[int, int], tuple[float, float] | None], tuple[slice, slice]]
"""`window((height, width), pixel_scale)`: the rows and columns of each plane the caller
needs, chosen from the header before any pixel is read; it may raise CutoutError."""


@dataclass
class FitsImage:
    """The planes of the first image HDU, cleaned, in FITS row order (row 0 = south)."""

    planes: dict[str, np.ndarray]  # {"g","r","z"} for colour, or {name: plane} for one band
    original_shape: tuple[int, ...]  # as declared, before any window
    pixel_scale: tuple[float, float] | None  # arcsec/px along x (columns) and y (rows)
    compressed: str | None  # "gzip", "fpack" or None
    warnings: list[str] = field(default_factory=list)

    @property
    def single_band(self) -> bool:
        return len(self.planes) == 1


class _PlainSource:
    def __init__(self, data: bytes) -> None:
        self._view = memoryview(data)
        self._pos = 0

    def read(self, n: int) -> bytes:
        chunk = bytes(self._view[self._pos : self._pos + n])
        self._pos += len(chunk)
        return chunk

    def read_array(self, n: int, dtype: str) -> np.ndarray:
        """The next n bytes as an array of `dtype`, without copying; shorter at the end."""
        chunk = self._view[self._pos : self._pos + n]
        self._pos += len(chunk)
        usable = len(chunk) - len(chunk) % np.dtype(dtype).itemsize
        return np.frombuffer(chunk[:usable], dtype)

    def skip(self, n: int) -> int:
        skipped = max(0, min(n, len(self._view) - self._pos))
        self._pos += skipped
        return skipped


class _GzipSource:
    """Incremental gzip reader that refuses (413) to expand past `cap` bytes in total."""

    def __init__(self, data: bytes, cap: int) -> None:
        self._view = memoryview(data)
        self._pos = 0
        self._tail = b""
        self._inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self._cap = cap
        self._produced = 0

    def _reserve(self, n: int) -> None:
        if self._produced + n > self._cap:
            raise CutoutError(
                CutoutErrorKind.TOO_LARGE,
                f"gzip-compressed FITS would expand past the limit of {self._cap} bytes "
                "(its headers declare more data than allowed)",
            )

    def _inflate(self, most: int) -> bytes:
        """Up to `most` (at most _INFLATE_CHUNK) more bytes; b"" at the end of the stream."""
        try:
            while not self._inflater.eof:
                if not self._tail:
                    if self._pos >= len(self._view):
                        return b""
                    self._tail = bytes(self._view[self._pos : self._pos + _GZIP_INPUT_CHUNK])
                    self._pos += len(self._tail)
                out = self._inflater.decompress(self._tail, min(most, _INFLATE_CHUNK))
                self._tail = self._inflater.unconsumed_tail
                if out:
                    self._produced += len(out)
                    return out
        except zlib.error as exc:
            raise CutoutError(CutoutErrorKind.INVALID, f"corrupt gzip stream: {exc}") from None
        return b""

    def read(self, n: int) -> bytes:
        self._reserve(n)
        parts: list[bytes] = []
        need = n
        while need > 0 and (out := self._inflate(need)):
            parts.append(out)
            need -= len(out)
        return b"".join(parts)

    def read_array(self, n: int, dtype: str) -> np.ndarray:
        """The next n bytes as an array of `dtype`, inflated straight into it."""
        self._reserve(n)
        buffer = np.empty(n, np.uint8)
        filled = 0
        while filled < n and (out := self._inflate(n - filled)):
            buffer[filled : filled + len(out)] = np.frombuffer(out, np.uint8)
            filled += len(out)
        usable = filled - filled % np.dtype(dtype).itemsize
        return buffer[:usable].view(dtype)

    def skip(self, n: int) -> int:
        self._reserve(n)
        skipped = 0
        while skipped < n and (out := self._inflate(n - skipped)):
            skipped += len(out)
        return skipped


_Source = _PlainSource | _GzipSource


@dataclass(frozen=True)
class _Structure:
    """What the decoder needs from one HDU's structural cards.

    Parsed once per distinct set of cards (`_structure` is cached): a survey's cutouts share
    their structural cards, and astropy's card parsing costs more than reading the pixels.
    """

    header: fits.Header  # the structural cards only; shared between files, never modified
    data_size: int  # unpadded bytes of the data unit
    shape: tuple[int, ...]  # declared numpy-order shape (ZNAXISn for tile-compressed HDUs)
    compressed: bool
    is_image: bool
    random_groups: bool
    # Big-endian float data without scaling or groups is exactly its bytes: numpy reads it
    # directly; anything else (BSCALE/BZERO, BLANK, tiles) is left to astropy.
    plain_dtype: str | None


@dataclass
class _Hdu:
    index: int
    structure: _Structure
    header_text: str  # the whole header, as read


def read_fits(
    data: bytes,
    limits: DecodeLimits,
    *,
    window: Window | None = None,
    reserve: Reserve = reserve_nothing,
) -> FitsImage:
    """Decode the first HDU with image data; raises CutoutError (413/415/422).

    `window` picks the part of each plane to read (default: all of it); `reserve` is told
    the most memory the pixel read will take before it starts (see `Reserve`).
    """
    try:
        return _read_fits(data, limits, window, reserve)
    except VerifyError as exc:  # astropy parses a card's value only when it is read
        reason = re.sub(r",? fix it first with .*", "", str(exc)).rstrip(".")
        raise CutoutError(CutoutErrorKind.INVALID, f"corrupt FITS header: {reason}") from None


def _read_fits(
    data: bytes, limits: DecodeLimits, window: Window | None, reserve: Reserve
) -> FitsImage:
    gzipped = data[:2] == GZIP_MAGIC
    source: _Source = (
        _GzipSource(data, limits.max_decompressed_bytes) if gzipped else _PlainSource(data)
    )
    hdu = _find_image_hdu(source, limits)
    structure = hdu.structure
    scale = pixel_scale_arcsec(select_cards(hdu.header_text, _SCALE_KEYS))
    layout = _band_layout(structure.shape, structure.header)
    rows, cols = (
        window(layout.plane_shape, scale)
        if window is not None
        else (slice(0, layout.plane_shape[0]), slice(0, layout.plane_shape[1]))
    )
    if structure.plain_dtype is not None:
        reserve(_section_bytes(structure, layout, rows, cols, gzipped), "FITS image")
        planes = _read_section(source, hdu, layout, rows, cols)
    else:
        reserve(_whole_read_bytes(structure, layout, rows, cols), "FITS image")
        raw = source.read(structure.data_size)
        _check_complete(len(raw), hdu)
        array = _load_hdu(hdu, raw).reshape(layout.squeezed_shape)
        planes = {
            name: (array[index] if array.ndim == 3 else array)[rows, cols]
            for name, index in layout.planes.items()
        }
    cleaned, fraction = _replace_non_finite(planes)
    notes = list(layout.notes)
    if fraction > 0:
        notes.append(f"{fraction:.2%} of pixels were NaN or infinite and were set to 0 flux")
    compressed = "gzip" if gzipped else ("fpack" if structure.compressed else None)
    return FitsImage(cleaned, structure.shape, scale, compressed, notes)


def _check_complete(got: int, hdu: _Hdu) -> None:
    if got < hdu.structure.data_size:
        raise CutoutError(
            CutoutErrorKind.INVALID,
            f"FITS file is truncated: HDU {hdu.index} declares {hdu.structure.data_size} "
            f"data bytes but only {got} are present",
        )


def _find_image_hdu(source: _Source, limits: DecodeLimits) -> _Hdu:
    """The first HDU with image data, its header read and the source at its data."""
    cards_left = limits.max_fits_header_cards
    for index in range(limits.max_fits_hdus):
        hdu = _read_header(source, index, cards_left, limits.max_fits_header_cards)
        if hdu is None:
            raise CutoutError(CutoutErrorKind.INVALID, "FITS file has no HDU with image data")
        cards_left -= len(hdu.header_text) // CARD
        structure = hdu.structure
        if structure.random_groups:
            raise CutoutError(CutoutErrorKind.INVALID, "FITS random-groups files are not images")
        if structure.is_image or structure.compressed:
            shape = structure.shape
            if shape and all(side > 0 for side in shape):
                limits.check_declared_shape(shape, f"FITS HDU {index}")
                return hdu
        source.skip(_padded(structure.data_size))
    raise CutoutError(
        CutoutErrorKind.TOO_LARGE,
        f"FITS file has no image in its first {limits.max_fits_hdus} HDUs, "
        f"the limit walked before the image",
    )


def _read_header(source: _Source, index: int, cards_left: int, card_limit: int) -> _Hdu | None:
    blocks: list[bytes] = []
    for _ in range(MAX_HEADER_BLOCKS):
        if (len(blocks) + 1) * (BLOCK // CARD) > cards_left:
            raise CutoutError(
                CutoutErrorKind.TOO_LARGE,
                f"FITS headers of HDUs 0-{index} hold more than {card_limit} cards, "
                "the limit walked before the image",
            )
        block = source.read(BLOCK)
        if not block and not blocks and index > 0:
            return None
        if len(block) < BLOCK:
            raise CutoutError(
                CutoutErrorKind.INVALID, f"FITS file is truncated inside the header of HDU {index}"
            )
        if not blocks:
            _check_first_card(block, index)
        blocks.append(block)
        if any(block[i : i + 8] == b"END     " for i in range(0, BLOCK, CARD)):
            break
    else:
        raise CutoutError(
            CutoutErrorKind.TOO_LARGE,
            f"FITS header of HDU {index} holds more than {MAX_HEADER_CARDS} cards, the limit "
            f"for one header (and {card_limit} for all headers before the image)",
        )
    try:
        text = b"".join(blocks).decode("ascii")
    except UnicodeDecodeError as exc:
        raise CutoutError(
            CutoutErrorKind.INVALID, f"corrupt FITS header in HDU {index}: {exc}"
        ) from None
    return _Hdu(index, _structure(select_cards(text, _STRUCTURE_KEYS), index), text)


@lru_cache(maxsize=256)
def _structure(cards: str, index: int) -> _Structure:
    """Parse and check an HDU's structural cards (errors are raised, never cached)."""
    try:
        header = fits.Header.fromstring(cards)
    except ValueError as exc:
        raise CutoutError(
            CutoutErrorKind.INVALID, f"corrupt FITS header in HDU {index}: {exc}"
        ) from None
    compressed = bool(header.get("ZIMAGE", False))
    data_size = _data_size(header, index)
    scaled = "BSCALE" in header or "BZERO" in header
    plain = (
        not compressed
        and not scaled
        and data_size == _bytes_per_value(header) * math.prod(_declared_shape(header))
    )
    return _Structure(
        header=header,
        data_size=data_size,
        shape=_declared_shape(header, "Z" if compressed else ""),
        compressed=compressed,
        is_image=(index == 0 and header.get("NAXIS", 0) > 0)
        or (index > 0 and str(header.get("XTENSION", "")).strip() == "IMAGE"),
        random_groups=index == 0 and bool(header.get("GROUPS", False)),
        plain_dtype=_PLAIN_FLOAT_DTYPES.get(header["BITPIX"]) if plain else None,
    )


def select_cards(header_text: str, keys: re.Pattern[str]) -> str:
    """The 80-character cards whose keyword matches `keys`, in order.

    Parsing and re-serialising a whole header is astropy's slowest step on drizzled HST
    headers (~1600 cards, tens of ms); the decoder needs a dozen structural and WCS cards.
    """
    cards = (header_text[i : i + CARD] for i in range(0, len(header_text), CARD))
    return "".join(card for card in cards if keys.fullmatch(card[:8].rstrip()))


def _check_first_card(block: bytes, index: int) -> None:
    if index == 0 and not block.startswith(FITS_MAGIC):
        raise CutoutError(
            CutoutErrorKind.UNSUPPORTED, "not a FITS file: it does not start with 'SIMPLE  ='"
        )
    if index > 0 and not block.startswith(b"XTENSION"):
        raise CutoutError(
            CutoutErrorKind.INVALID,
            f"corrupt FITS file: HDU {index} does not start with an XTENSION card",
        )


def _int_card(header: fits.Header, key: str, default: int, minimum: int, index: int) -> int:
    value = header.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise CutoutError(
            CutoutErrorKind.INVALID, f"corrupt FITS header in HDU {index}: {key} = {value!r}"
        )
    return value


def _declared_shape(header: fits.Header, prefix: str = "") -> tuple[int, ...]:
    """Numpy-order shape (slowest axis first) from NAXISn (or ZNAXISn for fpack tiles)."""
    naxis = header.get(prefix + "NAXIS", 0)
    if not isinstance(naxis, int) or not 0 <= naxis <= 999:
        raise CutoutError(
            CutoutErrorKind.INVALID, f"corrupt FITS header: {prefix}NAXIS = {naxis!r}"
        )
    sides = []
    for axis in range(naxis, 0, -1):
        side = header.get(f"{prefix}NAXIS{axis}")
        if not isinstance(side, int) or isinstance(side, bool) or side < 0:
            raise CutoutError(
                CutoutErrorKind.INVALID, f"corrupt FITS header: {prefix}NAXIS{axis} = {side!r}"
            )
        sides.append(side)
    return tuple(sides)


def _bytes_per_value(header: fits.Header) -> int:
    return abs(int(header["BITPIX"])) // 8


def _data_size(header: fits.Header, index: int) -> int:
    bitpix = header.get("BITPIX")
    if bitpix not in VALID_BITPIX:
        raise CutoutError(
            CutoutErrorKind.INVALID, f"corrupt FITS header in HDU {index}: BITPIX = {bitpix!r}"
        )
    shape = _declared_shape(header)
    if not shape:
        return 0
    groups = _int_card(header, "GCOUNT", 1, 1, index)
    params = _int_card(header, "PCOUNT", 0, 0, index)
    return _bytes_per_value(header) * groups * (params + math.prod(shape))


def _padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


@cache
def _primary_header_bytes() -> bytes:
    return fits.PrimaryHDU().header.tostring().encode("ascii")


def _load_hdu(hdu: _Hdu, raw: bytes) -> np.ndarray:
    """The HDU's pixels interpreted by astropy (scaling, BLANK, tile decompression).

    Tile-compressed HDUs need their whole header (column and tiling cards); plain images only
    the structural cards, which keeps astropy from re-parsing long headers.
    """
    structure = hdu.structure
    if structure.compressed:
        header_bytes = hdu.header_text.encode("ascii")
    else:
        header_bytes = structure.header.tostring(padding=True).encode("ascii")
    padding = b"\0" * (_padded(len(raw)) - len(raw))
    prefix = _primary_header_bytes() if hdu.index > 0 else b""
    try:
        hdul = fits.HDUList.fromstring(prefix + header_bytes + raw + padding)
        array = np.asarray(hdul[1 if hdu.index > 0 else 0].data)
    except CutoutError:
        raise
    except Exception as exc:  # astropy raises many types for corrupt data and tiles
        kind = "fpack tile-compressed" if structure.compressed else "FITS"
        raise CutoutError(
            CutoutErrorKind.INVALID, f"corrupt {kind} image data in HDU {hdu.index}: {exc}"
        ) from None
    if array.dtype.kind not in "fiu":
        raise CutoutError(
            CutoutErrorKind.INVALID, f"FITS HDU {hdu.index} holds {array.dtype} data, not an image"
        )
    return array


def band_names(header: fits.Header, planes: int) -> list[str] | None:
    """Band of each cube plane from BANDn keys or the BANDS string; None when absent."""
    per_plane = [header.get(f"BAND{i}") for i in range(planes)]
    if all(isinstance(name, str) and name.strip() for name in per_plane):
        return [str(name).strip().lower() for name in per_plane]
    joined = header.get("BANDS")
    if not isinstance(joined, str) or not joined.strip():
        return None
    text = joined.strip().lower()
    names = text.replace(",", " ").split() if ("," in text or " " in text) else list(text)
    if len(names) != planes:
        raise CutoutError(
            CutoutErrorKind.INVALID,
            f"BANDS = {joined!r} names {len(names)} bands but the cube has {planes} planes",
        )
    return names


@dataclass(frozen=True)
class _BandLayout:
    """Which planes of the data hold which band, known from the header alone."""

    planes: dict[str, int]  # band name -> plane index ({name: 0} for a 2-D image)
    squeezed_shape: tuple[int, ...]  # the declared shape without leading axes of length 1
    notes: tuple[str, ...]

    @property
    def plane_shape(self) -> tuple[int, int]:
        return (self.squeezed_shape[-2], self.squeezed_shape[-1])


def _band_layout(shape: tuple[int, ...], header: fits.Header) -> _BandLayout:
    squeezed = shape
    while len(squeezed) > 2 and squeezed[0] == 1:
        squeezed = squeezed[1:]
    if len(squeezed) == 2:
        name = str(header.get("BAND0") or header.get("BANDS") or header.get("FILTER") or "band")
        return _BandLayout({name.strip(): 0}, squeezed, ())
    if len(squeezed) != 3:
        raise CutoutError(
            CutoutErrorKind.INVALID,
            f"FITS image of shape {shape} has {len(squeezed)} dimensions; "
            "expected a 2-D image or a (bands, H, W) cube",
        )
    notes = []
    names = band_names(header, squeezed[0])
    if names is None:
        if squeezed[0] != 3:
            raise CutoutError(
                CutoutErrorKind.INVALID,
                f"FITS cube of shape {shape} has no BANDS/BANDn header naming "
                "its planes; only a 3-plane cube is assumed to be g, r, z",
            )
        names = list(COLOUR_BANDS)
        notes.append("no BANDS/BANDn header: the 3 planes are assumed to be g, r, z")
    if len(set(names)) != len(names):
        raise CutoutError(CutoutErrorKind.INVALID, f"FITS cube names a band twice: {names}")
    missing = [band for band in COLOUR_BANDS if band not in names]
    if missing:
        raise CutoutError(
            CutoutErrorKind.INVALID,
            f"FITS cube lacks band(s) {', '.join(missing)}: it has {', '.join(names)}; "
            "the colour stretch needs g, r and z",
        )
    unused = [name for name in names if name not in COLOUR_BANDS]
    if unused:
        notes.append(f"band(s) {', '.join(unused)} not used (the stretch takes g, r, z)")
    return _BandLayout({band: names.index(band) for band in COLOUR_BANDS}, squeezed, tuple(notes))


def _span(window: slice) -> int:
    return int(window.stop) - int(window.start)


def _window_bytes(layout: _BandLayout, rows: slice, cols: slice) -> tuple[int, int]:
    """(float32 copies of every used plane's window, the finite masks: 3 bytes a pixel)."""
    window = _span(rows) * _span(cols)
    return len(layout.planes) * 4 * window, 3 * window


def _section_bytes(
    structure: _Structure, layout: _BandLayout, rows: slice, cols: slice, gzipped: bool
) -> int:
    """Peak bytes of a section read. gzip: the inflated rows, turned into native floats in
    place. Plain: the data is viewed where it lies and only the window is copied."""
    assert structure.plain_dtype is not None
    itemsize = np.dtype(structure.plain_dtype).itemsize
    copies, masks = _window_bytes(layout, rows, cols)
    if not gzipped:
        return copies + masks
    inflated = len(layout.planes) * _span(rows) * layout.plane_shape[1] * itemsize
    return inflated + (copies if itemsize != 4 else 0) + masks


def _whole_read_bytes(structure: _Structure, layout: _BandLayout, rows: slice, cols: slice) -> int:
    """Peak bytes of a read through astropy: the data bytes, the FITS text astropy parses
    (a second copy), its raw and its scaled arrays (float64 at worst), then the windows."""
    pixels = math.prod(structure.shape)
    stored = abs(int(structure.header.get("ZBITPIX", structure.header["BITPIX"]))) // 8
    copies, masks = _window_bytes(layout, rows, cols)
    return 2 * structure.data_size + pixels * (stored + 8) + copies + masks


def _read_section(
    source: _Source, hdu: _Hdu, layout: _BandLayout, rows: slice, cols: slice
) -> dict[str, np.ndarray]:
    """The window of each used plane of a plain float image, reading only its rows, then
    consuming the rest of the data unit to prove the file is whole."""
    structure = hdu.structure
    assert structure.plain_dtype is not None
    dtype = structure.plain_dtype
    height, width = layout.plane_shape
    row_bytes = width * np.dtype(dtype).itemsize
    position = 0
    planes: dict[str, np.ndarray] = {}
    for name, index in sorted(layout.planes.items(), key=lambda item: item[1]):
        start = (index * height + int(rows.start)) * row_bytes
        position += source.skip(start - position)
        length = _span(rows) * row_bytes
        section = source.read_array(length, dtype)
        position += section.nbytes
        if section.nbytes < length:
            _check_complete(position, hdu)
        if section.flags.writeable and not section.dtype.isnative:
            # Inflated rows are ours: big-endian to native in place, no second copy.
            section = section.byteswap(inplace=True).view(section.dtype.newbyteorder("="))
        planes[name] = section.reshape(_span(rows), width)[:, cols]
    position += source.skip(structure.data_size - position)
    _check_complete(position, hdu)
    return {name: planes[name] for name in layout.planes}  # in band order, not file order


def _replace_non_finite(planes: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], float]:
    """float32 planes with NaN/inf set to 0 in every plane where any plane has one, and the
    fraction of such pixels. Planes this module made are cleaned in place."""
    cleaned = {name: np.asarray(plane, np.float32) for name, plane in planes.items()}
    finite = np.ones(next(iter(cleaned.values())).shape, bool)
    for plane in cleaned.values():
        finite &= np.isfinite(plane)
    if finite.all():
        return cleaned, 0.0
    if not finite.any():
        raise CutoutError(
            CutoutErrorKind.INVALID, "FITS image has no finite pixel (all NaN or infinite)"
        )
    bad = ~finite
    for name, plane in cleaned.items():
        if plane.flags.writeable:
            plane[bad] = np.float32(0.0)
        else:
            cleaned[name] = np.where(bad, np.float32(0.0), plane)
    return cleaned, float(bad.mean())


@lru_cache(maxsize=256)
def pixel_scale_arcsec(wcs_cards: str) -> tuple[float, float] | None:
    """Pixel scale along x and y in arcsec from WCS header cards, or None if unusable."""
    from astropy.wcs import WCS, FITSFixedWarning
    from astropy.wcs.utils import proj_plane_pixel_scales

    if not wcs_cards:
        return None
    try:
        # catch_warnings swaps process-wide filters; a race between threads can at worst
        # leave this one suppression installed, and it only hides wcslib's fix-up notes.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            celestial = WCS(fits.Header.fromstring(wcs_cards)).celestial
            if celestial.naxis != 2:
                return None
            scales = proj_plane_pixel_scales(celestial)
            units = [str(unit) for unit in celestial.wcs.cunit]
    except Exception:  # a header whose WCS astropy cannot parse simply has no known scale
        return None
    factor = {"deg": 3600.0, "arcmin": 60.0, "arcsec": 1.0}
    if any(unit not in factor for unit in units):
        return None
    sx, sy = (float(s) * factor[u] for s, u in zip(scales, units, strict=True))
    if not (math.isfinite(sx) and math.isfinite(sy) and sx > 0 and sy > 0):
        return None
    return sx, sy
