"""One InputSpec: its rules, its resolver, and the model card and checkpoint that carry it."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from galmorph.core.cutouts.resample import resize_rgb
from galmorph.core.inputspec import (
    DEFAULT_INTERPOLATION,
    GALAXY10_DECALS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    INTERPOLATIONS,
    Imaging,
    InputSpec,
    resolve_input_spec,
)
from galmorph.core.modelfile.contract import ModelCard
from galmorph.model import registry
from galmorph.model.checkpoint import ModelSpec

FLOAT32_SCALE = float(np.float32(0.262)) * 4  # 1.0479999780654907, as a float32 HDF5 attribute
CLASSES = ("a", "b", "c")

# A model variant that registers its own normalisation, a training run, a model card.
VARIANT = InputSpec(input_size=(96, 96), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
RUN = InputSpec(
    input_size=(64, 64),
    mean=(0.1, 0.2, 0.3),
    std=(0.4, 0.5, 0.6),
    stretch="lupton",
    bands={"R": "i", "G": "r", "B": "g"},
    pixel_scale=0.396,
    interpolation="lanczos",
)


def test_explicit_values_win_over_the_card_which_wins_over_the_variant() -> None:
    assert resolve_input_spec(card_or_run=RUN, variant_default=VARIANT) == RUN
    assert resolve_input_spec(variant_default=VARIANT) == VARIANT
    assert resolve_input_spec() == InputSpec()
    chosen = resolve_input_spec(
        {"input_size": 32, "interpolation": "box", "stretch": None},
        card_or_run=RUN,
        variant_default=VARIANT,
    )
    # None means "not chosen": the card's stretch stays; one int is a square side.
    assert chosen == replace(RUN, input_size=(32, 32), interpolation="box")
    fresh = resolve_input_spec({"input_size": 48}, variant_default=VARIANT)
    assert fresh.mean == VARIANT.mean and fresh.input_size == (48, 48)


def test_the_resolver_names_a_key_that_is_not_a_field() -> None:
    with pytest.raises(ValueError, match="not input spec fields: img_size"):
        resolve_input_spec({"img_size": 64})


def test_field_of_view_is_size_times_pixel_scale() -> None:
    spec = InputSpec(input_size=(64, 128), pixel_scale=FLOAT32_SCALE)
    assert spec.pixel_scale == 1.048  # canonical: no float32 noise in URLs or messages
    assert spec.field_of_view == pytest.approx((64 * 1.048, 128 * 1.048))
    assert InputSpec().field_of_view == pytest.approx((256 * 0.262, 256 * 0.262))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"interpolation": "nearest"}, "interpolation 'nearest' is not one of bicubic"),
        ({"std": (0.2, 0.0, 0.2)}, "std must be positive"),
        ({"mean": (0.5, 0.5)}, "mean needs 3 values"),
        ({"pixel_scale": 0.0}, "pixel_scale must be positive"),
        ({"input_size": (64, 0)}, "input_size must be"),
    ],
)
def test_a_spec_refuses_what_no_model_can_take(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        InputSpec(**change)
    with pytest.raises(ValueError, match=message):  # and so does a card claiming it
        ModelCard("m", CLASSES, **(InputSpec().values() | change))


@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
def test_every_interpolation_a_spec_may_name_resizes(interpolation: str) -> None:
    image = np.random.default_rng(0).integers(0, 256, (20, 30, 3), np.uint8)
    assert resize_rgb(image, (8, 12), interpolation).shape == (8, 12, 3)


def test_a_card_written_with_the_spec_reads_back_equal() -> None:
    spec = replace(RUN, pixel_scale=FLOAT32_SCALE)
    card = ModelCard("m", CLASSES, **spec.values())
    again = ModelCard.from_metadata(card.to_metadata())
    assert again.input_spec == card.input_spec == spec
    assert again.field_of_view == spec.field_of_view
    assert again.imaging == Imaging(1.048, "lupton", {"R": "i", "G": "r", "B": "g"})


def test_the_card_writes_each_input_field_under_the_keys_every_version_reads() -> None:
    card = ModelCard("m", CLASSES, **InputSpec(input_size=(64, 64)).values())
    props = card.to_metadata()
    input_keys = [k for k in props if k.removeprefix("galmorph.") in InputSpec().values()]
    assert input_keys == [
        "galmorph.input_size",
        "galmorph.mean",
        "galmorph.std",
        "galmorph.stretch",
        "galmorph.bands",
        "galmorph.pixel_scale",
        "galmorph.interpolation",
    ]
    assert props["galmorph.input_size"] == "[64, 64]"
    assert props["galmorph.mean"] == "[0.485, 0.456, 0.406]"
    assert props["galmorph.bands"] == '{"R": "z", "G": "r", "B": "g"}'
    assert props["galmorph.pixel_scale"] == "0.262"
    assert props["galmorph.field_of_view"] == "[16.768, 16.768]"


def test_an_old_card_without_the_newer_keys_still_loads() -> None:
    """The first model files had only the required keys: the rest are Galaxy10 DECaLS's."""
    old = {
        "galmorph.model_name": '"old"',
        "galmorph.class_names": '["a", "b", "c"]',
        "galmorph.input_size": "[64, 64]",
        "galmorph.mean": "[0.5, 0.5, 0.5]",
        "galmorph.std": "[0.25, 0.25, 0.25]",
    }
    spec = ModelCard.from_metadata(old).input_spec
    assert spec == InputSpec(input_size=(64, 64), mean=(0.5,) * 3, std=(0.25,) * 3)
    assert spec.imaging == GALAXY10_DECALS and spec.interpolation == DEFAULT_INTERPOLATION


def test_a_checkpoint_spec_carries_the_input_spec_it_was_fed() -> None:
    spec = replace(RUN, input_size=(48, 48))
    model_spec = ModelSpec.fed_as(spec, name="m", num_classes=3, class_names=CLASSES)
    assert model_spec.img_size == 48 and model_spec.input_spec == spec
    assert ModelSpec.from_json(model_spec.to_json()).input_spec == spec
    with pytest.raises(ValueError, match="square"):
        ModelSpec.fed_as(
            InputSpec(input_size=(48, 64)), name="m", num_classes=3, class_names=CLASSES
        )


def test_a_variant_registers_its_own_normalisation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_REGISTRY", {})
    monkeypatch.setattr(registry, "_MODEL_MODULES", ())

    @registry.register_model(default_img_size=96, layout="test", source="test", input_spec=VARIANT)
    def own_stats(**kwargs: object) -> None: ...

    @registry.register_model(default_img_size=32, layout="test", source="test")
    def imagenet_stats(**kwargs: object) -> None: ...

    own = registry.model_entry("own_stats")
    assert own.input_spec == VARIANT and own.default_img_size == 96
    plain = registry.model_entry("imagenet_stats").input_spec
    assert (plain.mean, plain.std, plain.input_size) == (IMAGENET_MEAN, IMAGENET_STD, (32, 32))
    # A run of the variant starts from its spec: the size is the run's, the statistics its own.
    run = resolve_input_spec({"input_size": 64}, variant_default=own.input_spec)
    assert run == replace(VARIANT, input_size=(64, 64))
