"""Model checkpoints without pickle: weights in safetensors, everything else in JSON.

A run folder holds `model.safetensors` (the state dict) and `model.json` (the ModelSpec:
which registered model to build, with what input size, classes and normalisation, plus the
SHA-256 of the weights file so a mismatched or damaged pair is caught at load time). Both
files are written with galmorph.core.files.atomic_write, so a crash never leaves a half-written
checkpoint under the final name; and since the two are replaced one after the other, a spec
rewritten over the same model first names both the weights file there and the one about to
replace it (`previous_weights_sha256`), so a kill between the two renames leaves a pair that
loads (the old weights or the new), never a hash mismatch.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from galmorph.core.files import atomic_write, atomic_write_text, sha256_file
from galmorph.core.inputspec import (
    DEFAULT_INTERPOLATION,
    GALAXY10_DECALS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    InputSpec,
)

if TYPE_CHECKING:
    from torch import nn

FORMAT_VERSION = 1
MAX_SPEC_BYTES = 1 << 20  # a spec is a few kB; refuse to parse anything absurd


class CheckpointError(ValueError):
    """A model or training-state checkpoint is missing, damaged, or does not fit its model/run."""


@dataclass
class ModelSpec:
    """How to rebuild a model and feed it: the JSON half of a checkpoint.

    The input fields are the run's InputSpec (`input_spec`), stored one by one as model.json
    has always had them (square: one img_size).
    """

    name: str
    num_classes: int
    img_size: int
    class_names: tuple[str, ...]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    # The imaging of the training images at img_size (galmorph.core.inputspec.Imaging).
    stretch: str = GALAXY10_DECALS.stretch
    pixel_scale: float = GALAXY10_DECALS.pixel_scale
    training_data: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    bands: dict[str, str] = field(default_factory=lambda: dict(GALAXY10_DECALS.bands))
    interpolation: str = DEFAULT_INTERPOLATION

    def __post_init__(self) -> None:
        self.class_names = tuple(self.class_names)
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {self.num_classes} classes")
        checked = self.input_spec  # the input fields obey the InputSpec's rules
        self.mean, self.std = checked.mean, checked.std

    @property
    def input_spec(self) -> InputSpec:
        return InputSpec(
            input_size=(self.img_size, self.img_size),
            mean=self.mean,
            std=self.std,
            stretch=self.stretch,
            bands=dict(self.bands),
            pixel_scale=self.pixel_scale,
            interpolation=self.interpolation,
        )

    @classmethod
    def fed_as(cls, input_spec: InputSpec, **rest: Any) -> ModelSpec:
        """The spec of a model fed as `input_spec` (square); `rest` are the other fields."""
        height, width = input_spec.input_size
        if height != width:
            raise ValueError(f"a checkpoint's input is square, got {height}x{width}")
        values = input_spec.values()
        del values["input_size"]
        return cls(img_size=height, **values, **rest)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as exc:
            raise ValueError(f"invalid model spec: {exc}") from exc

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("model spec JSON must be an object")
        return cls.from_dict(data)

    def build(self) -> nn.Module:
        """The registered architecture, freshly initialised, at this spec's size."""
        from galmorph.model.registry import create_model

        return create_model(
            self.name,
            num_classes=self.num_classes,
            img_size=self.img_size,
            drop_rate=self.drop_rate,
            drop_path_rate=self.drop_path_rate,
        )


def checkpoint_paths(run_dir: str | os.PathLike[str], filename: str = "model") -> tuple[Path, Path]:
    """(weights, spec) paths of a checkpoint inside run_dir."""
    run = Path(run_dir)
    return run / f"{filename}.safetensors", run / f"{filename}.json"


def save_model(
    run_dir: str | os.PathLike[str],
    model: nn.Module,
    spec: ModelSpec,
    *,
    filename: str = "model",
) -> Path:
    """Write run_dir/{filename}.safetensors and .json atomically; returns the weights path."""
    from safetensors.torch import save_file

    weights_path, spec_path = checkpoint_paths(run_dir, filename)
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    document: dict[str, Any] = {**spec.to_dict(), "format_version": FORMAT_VERSION}
    previous = _weights_hash_of_same_model(spec_path, document)
    with atomic_write(weights_path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
        document["weights_sha256"] = sha256_file(tmp)
        if previous is not None and previous != document["weights_sha256"]:
            transition = {**document, "previous_weights_sha256": previous}
            atomic_write_text(spec_path, json.dumps(transition, indent=2))
    atomic_write_text(spec_path, json.dumps(document, indent=2))
    return weights_path


def _weights_hash_of_same_model(spec_path: Path, document: dict[str, Any]) -> str | None:
    """The weights hash the spec at `spec_path` holds, if it describes the same model as
    `document` (another model's weights must never pass for this one's)."""
    try:
        current = _read_spec_document(spec_path)
    except CheckpointError:
        return None
    described = {k: v for k, v in current.items() if not k.endswith("weights_sha256")}
    weights = current.get("weights_sha256")
    # As JSON (tuples read back as lists), and without what a run's next checkpoint changes.
    same = _but_progress(described) == _but_progress(json.loads(json.dumps(document)))
    return weights if same and isinstance(weights, str) else None


def _but_progress(document: dict[str, Any]) -> dict[str, Any]:
    """A spec document without the metrics and the steps and epochs completed: the same run's
    earlier checkpoint is the same model."""
    training = {
        k: v
        for k, v in document.get("training_data", {}).items()
        if k not in ("epochs_completed", "steps_completed")
    }
    return {k: v for k, v in document.items() if k != "metrics"} | {"training_data": training}


def load_spec(run_dir: str | os.PathLike[str], filename: str = "model") -> ModelSpec:
    return ModelSpec.from_dict(_read_spec_document(checkpoint_paths(run_dir, filename)[1]))


def _read_spec_document(spec_path: Path) -> dict[str, Any]:
    if not spec_path.is_file():
        raise CheckpointError(f"checkpoint spec not found: {spec_path}")
    size = spec_path.stat().st_size
    if size > MAX_SPEC_BYTES:
        raise CheckpointError(f"{spec_path} is {size} bytes, larger than any model spec")
    try:
        document = json.loads(spec_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{spec_path} is not valid JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise CheckpointError(f"{spec_path} must hold a JSON object")
    version = document.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{spec_path}: unsupported checkpoint format_version {version!r}")
    return document


def load_model(
    run_dir: str | os.PathLike[str], *, filename: str = "model"
) -> tuple[nn.Module, ModelSpec]:
    """Rebuild the model named in the spec and load its weights (strict); model is in eval mode."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights_path, spec_path = checkpoint_paths(run_dir, filename)
    document = _read_spec_document(spec_path)
    try:
        spec = ModelSpec.from_dict(document)
    except ValueError as exc:
        raise CheckpointError(f"{spec_path}: {exc}") from exc
    if not weights_path.is_file():
        raise CheckpointError(f"checkpoint weights not found: {weights_path}")
    accepted = {document.get("weights_sha256"), document.get("previous_weights_sha256")}
    if sha256_file(weights_path) not in accepted - {None}:
        raise CheckpointError(
            f"{weights_path} does not match {spec_path.name} (SHA-256 differs): "
            "the weights file is damaged or from another run"
        )
    try:
        state = load_file(str(weights_path))
    except SafetensorError as exc:
        raise CheckpointError(f"{weights_path} is not a valid safetensors file: {exc}") from exc
    model = spec.build()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{weights_path} does not fit model {spec.name!r}: {exc}") from exc
    model.eval()
    return model, spec
