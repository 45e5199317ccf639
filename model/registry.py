"""Model registry (timm-like): `@register_model` on a factory, `create_model(name, ...)`.

Factories live beside their architectures (model/astroformer.py, model/vit_small.py); those
modules are imported on first lookup so that importing the registry (e.g. from a CLI module)
stays free of torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from galmorph.core.inputspec import InputSpec

if TYPE_CHECKING:
    from torch import nn

# Modules whose import registers models.
_MODEL_MODULES = ("galmorph.model.astroformer", "galmorph.model.vit_small")

ModelFactory = Callable[..., "nn.Module"]


@dataclass(frozen=True)
class ModelEntry:
    name: str
    factory: ModelFactory
    layout: str  # e.g. "C-C-C-T", or "ViT"
    source: str  # where the configuration comes from (paper, or "galmorph")
    # How images are fed to the variant (timm's pretrained cfg): its input size, normalisation
    # inside the graph, and the resize of rendered images; the default a training run starts
    # from (galmorph.core.inputspec.resolve_input_spec).
    input_spec: InputSpec

    @property
    def default_img_size(self) -> int:
        return self.input_spec.input_size[0]


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(
    name: str | None = None,
    *,
    default_img_size: int,
    layout: str,
    source: str,
    input_spec: InputSpec | None = None,
) -> Callable[[ModelFactory], ModelFactory]:
    """Register `factory(*, num_classes, img_size, drop_rate, drop_path_rate)`.

    `default_img_size` is the variant's input size: what training and `create_model` use
    when no size is given. `input_spec` sets the rest of how the variant is fed (mean, std,
    interpolation; ImageNet's mean/std and bicubic when None); its size is default_img_size.

    The name defaults to the factory's own name, as with timm's `@register_model`.
    """

    def decorate(factory: ModelFactory) -> ModelFactory:
        nonlocal name
        name = name or factory.__name__
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        spec = replace(input_spec or InputSpec(), input_size=(default_img_size, default_img_size))
        _REGISTRY[name] = ModelEntry(name, factory, layout, source, spec)
        return factory

    return decorate


def _load_model_modules() -> None:
    for module in _MODEL_MODULES:
        importlib.import_module(module)


def list_models() -> list[str]:
    _load_model_modules()
    return sorted(_REGISTRY)


def model_entry(name: str) -> ModelEntry:
    _load_model_modules()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; known models: {', '.join(sorted(_REGISTRY))}"
        ) from None


def create_model(
    name: str,
    num_classes: int = 10,
    img_size: int | None = None,
    drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
) -> nn.Module:
    """Build a registered model; forward takes normalised float NCHW and returns logits.

    `img_size` defaults to the variant's registered input size.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    entry = model_entry(name)
    return entry.factory(
        num_classes=num_classes,
        img_size=entry.default_img_size if img_size is None else img_size,
        drop_rate=drop_rate,
        drop_path_rate=drop_path_rate,
    )
