"""What a model's input is: one `InputSpec`, its one resolver, and the constants behind both.

An InputSpec says how pixels must look when they reach a model: size, normalisation (applied
inside the exported graph), the resize of rendered images, and how survey flux became 8-bit RGB
(stretch, bands, pixel scale). It plays the part of timm's pretrained config: a model variant
registers a default one, a training run records the one it trained with, the model card carries
it in the ONNX file, and `resolve_input_spec` merges them with what a caller asks for
(explicit argument > model card or run > registry default).

Core's floor: it imports no core sub-package, so cutouts, sky, data and the model file can all
read it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

# ImageNet statistics (0..1 scale): the Astroformer recipe registers no normalisation of its own,
# so timm used these; every registered variant defaults to them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Legacy Survey pixel scale in arcsec/pixel; Galaxy10 DECaLS images are rendered at it.
LEGACY_SURVEY_PIXEL_SCALE = 0.262
# Viewer colour mapping of dr2_rgb: image channel <- survey band.
DR2_RGB_BANDS = {"R": "z", "G": "r", "B": "g"}
DEFAULT_STRETCH = "dr2_rgb"
# Galaxy10 DECaLS images are 256 px wide; a model trained at N px from them sees 256/N times
# the pixel scale over the same field.
GALAXY10_IMAGE_SIZE = 256

# How rendered images are resized to a model's input: the names a model card may give (the
# Pillow filters behind them live in galmorph.core.cutouts.resample).
INTERPOLATIONS = ("bicubic", "bilinear", "lanczos", "box")
DEFAULT_INTERPOLATION = "bicubic"  # timm's eval interpolation

# A float32's precision: a scale read from a float32 HDF5 attribute (0.262 stored as
# 0.2619999945...) is the scale its file meant, so a card, `--pixscale 1.048` and a cache key
# name the same number.
SCALE_DIGITS = 7


def canonical_scale(arcsec_per_pixel: float) -> float:
    """A pixel scale rounded to SCALE_DIGITS significant digits (1.0479999780654907 -> 1.048)."""
    return float(f"{float(arcsec_per_pixel):.{SCALE_DIGITS}g}")


@dataclass(frozen=True)
class Imaging:
    """How survey flux became the 8-bit RGB images a model learns from: the part of an
    InputSpec a training file states (HDF5 attributes, else Galaxy10 DECaLS's), at the file's
    own image size."""

    pixel_scale: float = LEGACY_SURVEY_PIXEL_SCALE  # arcsec/pixel
    stretch: str = DEFAULT_STRETCH
    bands: dict[str, str] = field(default_factory=lambda: dict(DR2_RGB_BANDS))

    def resized(self, from_size: int, to_size: int) -> Imaging:
        """The same field of view at another image size: the pixel scale grows as size shrinks."""
        return replace(self, pixel_scale=self.pixel_scale * from_size / to_size)


GALAXY10_DECALS = Imaging()


@dataclass(frozen=True)
class InputSpec:
    """Everything about the pixels a model takes; the model card stores each field under its
    own metadata key (`galmorph.input_size`, `galmorph.mean`, ...)."""

    input_size: tuple[int, int] = (GALAXY10_IMAGE_SIZE, GALAXY10_IMAGE_SIZE)  # (H, W)
    mean: tuple[float, float, float] = IMAGENET_MEAN  # on the 0..1 scale, inside the graph
    std: tuple[float, float, float] = IMAGENET_STD
    stretch: str = GALAXY10_DECALS.stretch
    bands: dict[str, str] = field(default_factory=lambda: dict(GALAXY10_DECALS.bands))
    pixel_scale: float = GALAXY10_DECALS.pixel_scale  # arcsec/pixel at input_size
    interpolation: str = DEFAULT_INTERPOLATION  # how rendered images are resized to input_size

    def __post_init__(self) -> None:
        size = tuple(int(side) for side in self.input_size)
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"input_size must be (height, width) in pixels, got {self.input_size}")
        mean, std = _triple(self.mean, "mean"), _triple(self.std, "std")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {std}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"interpolation {self.interpolation!r} is not one of {', '.join(INTERPOLATIONS)}"
            )
        if not self.pixel_scale > 0:
            raise ValueError(f"pixel_scale must be positive, got {self.pixel_scale!r}")
        object.__setattr__(self, "input_size", size)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        # A float32 training-file scale (1.0479999780654907) must not leak into cutout URLs,
        # cache keys, the manifest or messages: the spec holds the scale its file meant.
        object.__setattr__(self, "pixel_scale", canonical_scale(self.pixel_scale))

    @property
    def field_of_view(self) -> tuple[float, float]:
        """Arcseconds the input covers, (height, width)."""
        return (self.input_size[0] * self.pixel_scale, self.input_size[1] * self.pixel_scale)

    @property
    def imaging(self) -> Imaging:
        return Imaging(self.pixel_scale, self.stretch, dict(self.bands))

    def with_imaging(self, imaging: Imaging) -> InputSpec:
        """This spec with the stretch, bands and pixel scale of `imaging`."""
        return replace(
            self,
            stretch=imaging.stretch,
            bands=dict(imaging.bands),
            pixel_scale=imaging.pixel_scale,
        )

    def values(self) -> dict[str, Any]:
        """Field -> value (bands copied): the keyword arguments of records that store a spec
        field by field, such as the model card."""
        return {f.name: getattr(self, f.name) for f in fields(self)} | {"bands": dict(self.bands)}

    @classmethod
    def of(cls, record: object) -> InputSpec:
        """The spec of any record with the spec's fields as attributes (a model card)."""
        return cls(**{f.name: getattr(record, f.name) for f in fields(cls)})


INPUT_SPEC_FIELDS = tuple(f.name for f in fields(InputSpec))


def _triple(values: Any, what: str) -> tuple[float, float, float]:
    items = tuple(float(v) for v in values)
    if len(items) != 3:
        raise ValueError(f"{what} needs 3 values (R, G, B), got {len(items)}")
    return items[0], items[1], items[2]


def resolve_input_spec(
    explicit: Mapping[str, Any] | None = None,
    card_or_run: InputSpec | None = None,
    variant_default: InputSpec | None = None,
) -> InputSpec:
    """The spec to use (timm's resolve_data_config): explicit values that are not None, over the
    model card's or training run's spec, else the registered variant's, else InputSpec().

    A card or run states every field, so the variant's default only fills in where there is
    neither (a model about to be trained). `explicit` may give `input_size` as one int (a
    square side); any other key must be an InputSpec field.
    """
    chosen = {key: value for key, value in (explicit or {}).items() if value is not None}
    unknown = sorted(set(chosen) - set(INPUT_SPEC_FIELDS))
    if unknown:
        raise ValueError(f"not input spec fields: {', '.join(unknown)}")
    if isinstance(chosen.get("input_size"), int):
        chosen["input_size"] = (chosen["input_size"], chosen["input_size"])
    base = card_or_run or variant_default or InputSpec()
    return replace(base, **chosen)
