"""Training configuration: one dataclass with nested sections, loadable from YAML or TOML.

The defaults reproduce the Galaxy10 recipe of the official Astroformer code (timm 0.9 train
script, DESIGN.md section 2); every departure is a field a config file can change.
Augmentation and mixup are sections (`TrainConfig.augment`, `TrainConfig.mixup`) whose
defaults live in their own dataclasses: nested mappings in a file (`augment: {hflip: 0.5}`),
dotted keys on the command line (`--set augment.hflip=0.5`).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import logging
import math
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from galmorph.core.files import atomic_write_text
from galmorph.core.modelfile.contract import TARGETS
from galmorph.model.registry import model_entry
from galmorph.training.augment import ROTATIONS, AugmentSettings
from galmorph.training.distill import DISTILL_KINDS, DistillSettings
from galmorph.training.mixup import MixupSettings
from galmorph.training.precision import PRECISIONS
from galmorph.training.sam import SAM_KINDS

logger = logging.getLogger(__name__)

AUGMENT_POLICIES = ("paper", "galaxy", "none")
LR_SCALINGS = ("sqrt", "linear", "none")
DEVICES = ("auto", "cpu", "cuda")
LOSS_WEIGHTINGS = ("none", "balanced")
SAMPLINGS = ("uniform", "balanced")

# Flat keys of the config before it had sections whose name in the section differs; every
# other section field kept its name (`hflip` became `augment.hflip`).
RENAMED_FLAT_KEYS = {
    "augment": "augment.policy",
    "mixup_prob": "mixup.prob",
    "mixup_switch_prob": "mixup.switch_prob",
}


# Keys of the config before `precision`, still read (with a warning) so that older config
# files and run folders (config.json, checkpoints) load and resume.
LEGACY_KEYS = {
    "amp": "replaced by 'precision' (amp: true -> precision: auto, amp: false -> precision: fp32)",
    "channels_last": "no longer read: training uses channels_last on CUDA, where it is faster, "
    "and not on a CPU, where it measured no faster",
}


class ConfigError(ValueError):
    """A configuration value or file is wrong; the message names the key."""


# init_from's value for the synthetic starting point (training/synthetic_pretrain.py).
SYNTHETIC_INIT = "synthetic"


@dataclass(frozen=True)
class SyntheticPretrain:
    """How `init_from: synthetic` builds its starting point; the defaults are the measured one
    (docs/small_data.md): 6000 balanced synthetic galaxies rendered with seed 7, 3 epochs."""

    images: int = 6000
    epochs: int = 3
    seed: int = 7  # the synthetic images' seed
    # Filled in when the run resolves its start, so config.json and model.json name the cached
    # folder and its key, and a resume reuses that folder instead of building again.
    folder: str | None = None
    key: str | None = None


@dataclass
class TrainConfig:
    # What to train on and where to write.
    data: str = ""
    model: str = "astroformer_4"
    out: str = ""
    img_size: int | None = None  # None: the model's registered input size (model/registry.py)
    num_classes: int | None = None  # None: taken from the data file
    # Names of labels 0..K-1 for a file that names none (else they must equal the file's).
    class_names: tuple[str, ...] | None = None
    split_seed: int = 0
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)  # train, val, test; val may be 0
    split_file: str | None = None  # an existing split.json to reuse (must match the data)
    # What the loss fits: labels (cross-entropy on `ans`) or votes (the Dirichlet-multinomial
    # likelihood of the file's `votes` counts, training/votes.py; probabilities become the
    # expected vote fractions). Accuracy and the other metrics stay against the labels.
    targets: str = "labels"

    # Schedule. lr is derived from lr_base as timm does unless given explicitly.
    epochs: int = 300
    batch_size: int = 256  # per process, per micro-batch
    grad_accum_steps: int = 1
    lr: float | None = None
    lr_base: float = 2e-5
    lr_base_size: int = 256
    lr_base_scale: str = "sqrt"  # timm uses sqrt scaling for Adam-family optimizers
    warmup_epochs: float = 5.0
    warmup_lr: float = 1e-5
    min_lr: float = 0.0
    weight_decay: float = 2e-5
    betas: tuple[float, float] = (0.9, 0.999)
    clip_grad: float | None = None  # max global grad norm; None disables clipping

    # Regularisation.
    drop_rate: float = 0.1
    drop_path_rate: float = 0.0
    ema: bool = False
    ema_decay: float = 0.9998
    # Stochastic weight averaging (Izmailov et al. 2018): the cosine reaches swa_lr
    # swa_epochs before the end, the lr stays there, and the run publishes the mean of those
    # epochs' end weights with BatchNorm statistics recomputed for it. 0 = off.
    swa_epochs: int = 0
    swa_lr: float | None = None  # None: a tenth of the peak lr
    # Mixup, CutMix and label smoothing (training/mixup.py).
    mixup: MixupSettings = field(default_factory=MixupSettings)

    # Augmentation, applied on the collated uint8 batch (training/augment.py).
    augment: AugmentSettings = field(default_factory=AugmentSettings)

    # Sharpness-aware minimisation around AdamW (training/sam.py): two passes per step.
    sam: str = "none"  # none | sam | asam
    sam_rho: float = 0.05  # neighbourhood radius (ASAM's scale-invariant radius is ~10x larger)
    sam_eta: float = 0.01  # ASAM: T = |w| + eta

    # Fine-tuning (training/finetune.py).
    # A galmorph run folder, timm / official Astroformer weights, or "synthetic": a start
    # trained on synthetic galaxies, built once per (model, img_size) and cached.
    init_from: str | None = None
    synthetic_pretrain: SyntheticPretrain = field(default_factory=SyntheticPretrain)
    freeze_stages: int = 0  # keep the stem and this many first stages frozen
    layer_decay: float = 1.0  # layer-wise lr decay; 1 = off

    # Distillation from a trained teacher (training/distill.py).
    distill: DistillSettings = field(default_factory=DistillSettings)

    # Class imbalance.
    sampling: str = "uniform"  # balanced: draw classes equally often (with replacement)
    loss_weighting: str = "none"  # balanced: weight classes by inverse frequency

    # Engineering.
    seed: int = 42
    device: str = "auto"
    # auto: bf16 autocast where the device computes bf16 natively (CUDA, or a CPU with
    # avx512_bf16 / amx_bf16), else fp32; or bf16 / fp32 (training/precision.py). A run
    # records what it resolved to. Replaces `amp` and `channels_last` (LEGACY_KEYS).
    precision: str = "auto"
    compile: bool = False
    sync_batchnorm: bool = False  # CUDA DDP only: torch's SyncBatchNorm has no CPU kernel
    num_workers: int = 4
    threads: int | None = None  # torch intra-op threads per process; None leaves the default
    eval_batch_size: int | None = None
    checkpoint_every_steps: int = 0  # 0: checkpoint at the end of each epoch only
    stop_after_step: int | None = None  # checkpoint and stop at this global step
    log_every_steps: int = 50
    progress: bool = True
    tensorboard: bool = False

    def __post_init__(self) -> None:
        # Values from YAML/TOML arrive as lists: keep tuples so equality and hashing hold.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                setattr(self, f.name, tuple(value))

    def validate(self) -> None:
        """Raise ConfigError naming the first wrong key."""
        _check(bool(self.data), "data", "is required (a Galaxy10-layout HDF5 file)")
        _check(bool(self.out), "out", "is required (the run folder)")
        # An unknown model raises here too, naming the key.
        _check(self.model_img_size() >= 16, "img_size", "must be at least 16")
        _check(self.epochs >= 1, "epochs", "must be at least 1")
        _check(self.batch_size >= 1, "batch_size", "must be at least 1")
        _check(self.grad_accum_steps >= 1, "grad_accum_steps", "must be at least 1")
        _check(self.lr is None or self.lr > 0, "lr", "must be positive")
        _check(self.lr_base > 0, "lr_base", "must be positive")
        _check(self.lr_base_scale in LR_SCALINGS, "lr_base_scale", f"must be one of {LR_SCALINGS}")
        _check(0 <= self.warmup_epochs < self.epochs, "warmup_epochs", "must be in [0, epochs)")
        _check(self.clip_grad is None or self.clip_grad > 0, "clip_grad", "must be positive")
        _check(0 < self.ema_decay < 1, "ema_decay", "must be in (0, 1)")
        _check(
            0 <= self.swa_epochs < self.epochs - self.warmup_epochs,
            "swa_epochs",
            f"must be in [0, {self.epochs - self.warmup_epochs:g}) (epochs - warmup_epochs): "
            "the cosine needs epochs of its own before the averaged ones",
        )
        _check(self.swa_lr is None or self.swa_lr > 0, "swa_lr", "must be positive")
        _check(
            not (self.ema and self.swa_epochs),
            "swa_epochs",
            "cannot be combined with 'ema': a run publishes one kind of averaged weights",
        )
        _check(self.sampling in SAMPLINGS, "sampling", f"must be one of {SAMPLINGS}")
        _check(self.loss_weighting in LOSS_WEIGHTINGS, "loss_weighting", "balanced or none")
        _check(self.targets in TARGETS, "targets", f"must be one of {TARGETS}")
        _check(
            self.targets == "labels" or not self.distill.enabled,
            "targets",
            "votes cannot be combined with distillation (distill.teacher): the teacher's "
            "term is a cross-entropy on labels, not a likelihood of vote counts",
        )
        _check(self.device in DEVICES, "device", f"must be one of {DEVICES}")
        _check(self.precision in PRECISIONS, "precision", f"must be one of {PRECISIONS}")
        _check(len(self.split_fractions) == 3, "split_fractions", "needs train, val, test")
        _check(math.isclose(sum(self.split_fractions), 1.0), "split_fractions", "must sum to 1")
        _check(min(self.split_fractions) >= 0, "split_fractions", "must not be negative")
        _check(self.split_fractions[0] > 0, "split_fractions", "needs a positive train share")
        _check(
            self.class_names is None or len(self.class_names) >= 2,
            "class_names",
            "needs at least two names",
        )
        _check(self.sam in SAM_KINDS, "sam", f"must be one of {SAM_KINDS}")
        _check(self.sam_rho > 0, "sam_rho", "must be positive")
        _check(self.sam_eta >= 0, "sam_eta", "must be >= 0")
        _check(self.freeze_stages >= 0, "freeze_stages", "must be >= 0")
        _check(0 < self.layer_decay <= 1, "layer_decay", "must be in (0, 1]")
        _check(
            self.freeze_stages == 0 or self.init_from is not None,
            "freeze_stages",
            "needs init_from (freezing untrained stages keeps them random)",
        )
        _validate_distill(self.distill)
        _validate_synthetic_pretrain(self.synthetic_pretrain)
        _check(self.num_workers >= 0, "num_workers", "must be >= 0")
        _check(self.checkpoint_every_steps >= 0, "checkpoint_every_steps", "must be >= 0")
        _validate_mixup(self.mixup)
        _validate_augment(self.augment)
        if self.mixup.enabled:
            _check(self.batch_size % 2 == 0, "batch_size", "must be even when mixing images")

    def model_img_size(self) -> int:
        """img_size, or the registered model's input size when img_size is None."""
        if self.img_size is not None:
            return self.img_size
        try:
            return model_entry(self.model).default_img_size
        except ValueError as exc:
            raise ConfigError(f"config key 'model': {exc}") from exc

    def global_batch_size(self, world_size: int) -> int:
        return self.batch_size * self.grad_accum_steps * world_size

    def swa_learning_rate(self, world_size: int) -> float:
        """The lr the SWA epochs hold (swa_epochs > 0)."""
        return self.swa_lr if self.swa_lr is not None else self.learning_rate(world_size) / 10

    def learning_rate(self, world_size: int) -> float:
        """Peak lr; timm's rule: lr_base x (global batch / lr_base_size), sqrt for AdamW."""
        if self.lr is not None:
            return self.lr
        ratio = self.global_batch_size(world_size) / self.lr_base_size
        if self.lr_base_scale == "sqrt":
            ratio = math.sqrt(ratio)
        elif self.lr_base_scale == "none":
            ratio = 1.0
        return self.lr_base * ratio

    def to_dict(self) -> dict[str, Any]:
        """Nested: each section is a mapping of its own keys (the form config.json holds)."""
        return dataclasses.asdict(self)

    def to_flat_dict(self) -> dict[str, Any]:
        """Section keys dotted (`augment.hflip`): the form `--set` takes."""
        return flatten_keys(self.to_dict())

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        """Build from nested section mappings, dotted keys or both; values are type-checked."""
        flat = migrate_legacy_keys(flatten_keys(values))
        _check_keys(flat)
        key_types = _key_types()
        top: dict[str, Any] = {}
        sections: dict[str, dict[str, Any]] = {name: {} for name in _section_types()}
        for key, value in flat.items():
            coerced = _coerce(key, value, key_types[key])
            section, dot, name = key.partition(".")
            if dot:
                sections[section][name] = coerced
            else:
                top[key] = coerced
        built = {name: kind(**sections[name]) for name, kind in _section_types().items()}
        return cls(**top, **built)


def load_config(
    path: str | Path | None = None,
    overrides: Iterable[str] = (),
    **explicit: Any,
) -> TrainConfig:
    """Defaults <- config file <- explicit keyword values <- `key=value` overrides.

    Sources merge key by key, section keys included: `--set augment.hflip=0` keeps the
    file's other `augment` keys.
    """
    values: dict[str, Any] = {}
    if path is not None:
        try:
            from_file = migrate_legacy_keys(flatten_keys(_read_file(Path(path))))
            _check_keys(from_file)
        except ConfigError as exc:
            raise ConfigError(f"config file {path}: {exc}") from exc
        values.update(from_file)
    values.update(flatten_keys({k: v for k, v in explicit.items() if v is not None}))
    values.update(migrate_legacy_keys(flatten_keys(parse_overrides(overrides))))
    return TrainConfig.from_dict(values)


def migrate_legacy_keys(flat: Mapping[str, Any], *, warn: bool = True) -> dict[str, Any]:
    """`amp` -> `precision`, `channels_last` dropped (LEGACY_KEYS); one source at a time, so
    a later source's `precision` overrides an earlier one's `amp`."""
    migrated = dict(flat)
    for key, what in LEGACY_KEYS.items():
        if key not in migrated:
            continue
        value = migrated.pop(key)
        if warn:
            logger.warning("config key %r is %s", key, what)
        if key != "amp":
            continue
        if not isinstance(value, bool):
            raise ConfigError(f"config key 'amp' must be true or false, got {value!r}")
        if "precision" in migrated:
            raise ConfigError("config keys 'amp' and 'precision' are both given: keep 'precision'")
        migrated["precision"] = "auto" if value else "fp32"
    return migrated


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """`key=value` pairs, values parsed as YAML (`lr=1e-3`, `betas=[0.9,0.99]`, `ema=true`).

    Section keys are dotted: `augment.hflip=0.5`.
    """
    import yaml

    parsed: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value")
        parsed[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
    return parsed


def _read_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".toml":
        import tomllib  # Python >= 3.11

        try:
            loaded: Any = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    elif path.suffix.lower() in (".yaml", ".yml", ".json"):
        import yaml

        try:
            loaded = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    else:
        raise ConfigError(f"config file {path} must end in .yaml, .yml, .toml or .json")
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values")
    return loaded


def flatten_keys(values: Mapping[str, Any]) -> dict[str, Any]:
    """Nested mappings to dotted keys (`{"augment": {"hflip": 0}}` -> `augment.hflip`).

    Dashes become underscores, so `--set warmup-epochs=2` and `warmup_epochs` agree.
    """
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = str(key).strip().replace("-", "_")
        if isinstance(value, Mapping):
            flat.update({f"{name}.{sub}": v for sub, v in flatten_keys(value).items()})
        else:
            flat[name] = value
    return flat


@functools.cache
def _section_types() -> dict[str, type]:
    """Section name -> its dataclass: the TrainConfig fields that are dataclasses."""
    hints = typing.get_type_hints(TrainConfig)
    return {
        f.name: hints[f.name]
        for f in dataclasses.fields(TrainConfig)
        if dataclasses.is_dataclass(hints[f.name])
    }


@functools.cache
def _key_types() -> dict[str, Any]:
    """Every valid key, dotted for section fields, with its annotation."""
    hints = typing.get_type_hints(TrainConfig)
    sections = _section_types()
    types_by_key: dict[str, Any] = {}
    for f in dataclasses.fields(TrainConfig):
        if f.name in sections:
            section_hints = typing.get_type_hints(sections[f.name])
            for sub in dataclasses.fields(sections[f.name]):
                types_by_key[f"{f.name}.{sub.name}"] = section_hints[sub.name]
        else:
            types_by_key[f.name] = hints[f.name]
    return types_by_key


@functools.cache
def _moved_keys() -> dict[str, str]:
    """A section key's flat spelling (the config before sections) -> its dotted key."""
    moved = {key.partition(".")[2]: key for key in _key_types() if "." in key}
    return moved | RENAMED_FLAT_KEYS


def _check_keys(flat: Mapping[str, Any]) -> None:
    """Refuse moved keys naming their new key, and unknown keys naming the valid ones."""
    valid = _key_types()
    sections = _section_types()
    moved = _moved_keys()
    problems: list[str] = []
    unknown: list[str] = []
    for key in flat:
        if key in valid:
            continue
        section = key.partition(".")[0]
        close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.8)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        if key in moved:
            problems.append(f"config key {key!r} has moved: use {moved[key]}")
        elif section in sections:
            keys = ", ".join(k for k in valid if k.startswith(f"{section}."))
            what = "is a section, not a value" if key == section else f"is unknown{hint}"
            problems.append(f"config key {key!r} {what}; {section} keys: {keys}")
        else:
            unknown.append(f"{key!r}{hint}")
    if unknown:
        problems.append(
            f"unknown config key(s) {', '.join(unknown)}; valid keys: {', '.join(valid)}"
        )
    if problems:
        raise ConfigError("; ".join(problems))


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check and convert one value against its annotation (int -> float allowed, not back)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(key, value, option)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if origin is tuple and typing.get_args(annotation)[-1] is Ellipsis:
        item_type = typing.get_args(annotation)[0]
        if isinstance(value, str):  # `--set class_names=a,b,c`
            value = [part.strip() for part in value.split(",")]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"config key {key!r} needs a list of values")
        return tuple(_coerce(key, v, item_type) for v in value)
    if origin is tuple:
        item_types = typing.get_args(annotation)
        if not isinstance(value, list | tuple) or len(value) != len(item_types):
            raise ConfigError(f"config key {key!r} needs a list of {len(item_types)} values")
        return tuple(_coerce(key, v, t) for v, t in zip(value, item_types, strict=True))
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key {key!r} must be true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key {key!r} must be an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key {key!r} must be a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key {key!r} must be a string, got {value!r}")
    raise ConfigError(f"config key {key!r} has an unsupported type {annotation!r}")


def _validate_mixup(m: MixupSettings) -> None:
    _check(m.mixup_alpha >= 0, "mixup.mixup_alpha", "must be >= 0")
    _check(m.cutmix_alpha >= 0, "mixup.cutmix_alpha", "must be >= 0")
    _check(0 <= m.prob <= 1, "mixup.prob", "must be in [0, 1]")
    _check(0 <= m.switch_prob <= 1, "mixup.switch_prob", "must be in [0, 1]")
    _check(0 <= m.label_smoothing < 1, "mixup.label_smoothing", "must be in [0, 1)")


def _validate_distill(d: DistillSettings) -> None:
    _check(d.kind in DISTILL_KINDS, "distill.kind", f"must be one of {DISTILL_KINDS}")
    _check(0 <= d.alpha <= 1, "distill.alpha", "must be in [0, 1]")
    _check(d.tau > 0, "distill.tau", "must be positive")


def _validate_synthetic_pretrain(p: SyntheticPretrain) -> None:
    # One galaxy of each of the 10 Galaxy10 classes at least.
    _check(p.images >= 10, "synthetic_pretrain.images", "must be at least 10")
    _check(p.epochs >= 1, "synthetic_pretrain.epochs", "must be at least 1")
    _check(p.seed >= 0, "synthetic_pretrain.seed", "must be >= 0")


def _validate_augment(a: AugmentSettings) -> None:
    _check(a.policy in AUGMENT_POLICIES, "augment.policy", f"must be one of {AUGMENT_POLICIES}")
    _check(a.rotation in ROTATIONS, "augment.rotation", f"must be one of {ROTATIONS}")
    _check(0 < a.rrc_scale[0] <= a.rrc_scale[1] <= 1, "augment.rrc_scale", "must be in (0, 1]")
    _check(0 < a.rrc_ratio[0] <= a.rrc_ratio[1], "augment.rrc_ratio", "must be increasing")
    _check(0 <= a.hflip <= 1, "augment.hflip", "must be a probability")
    _check(0 <= a.color_jitter < 1, "augment.color_jitter", "must be in [0, 1)")
    _check(0 <= a.shift_fraction < 1, "augment.shift_fraction", "must be in [0, 1)")
    _check(0 < a.scale_range[0] <= a.scale_range[1], "augment.scale_range", "must be increasing")
    _check(0 <= a.randaugment_ops <= 8, "augment.randaugment_ops", "must be in 0..8")
    _check(0 <= a.randaugment_magnitude <= 10, "augment.randaugment_magnitude", "is on 0..10")


def _check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"config key {key!r} {message}")


def dump_config(config: TrainConfig, path: Path) -> None:
    """Write the resolved config as JSON (what the run actually used)."""
    atomic_write_text(path, json.dumps(config.to_dict(), indent=2) + "\n")
