"""Fine-tuning: start from trained weights, optionally freeze early stages, decay lr by depth.

`init_from` is a galmorph run folder (model.json + model.safetensors, any class count), or a
weights file trained elsewhere: timm / the official Astroformer code (`.safetensors`, or a
`.pth`/`.pt`/`.bin` state dict read with `torch.load(weights_only=True)`, never unpickling
code), renamed through model/timm_compat.py. Then:

- The classifier (the model's `classifier` Linear) is kept when the source's classes are this
  run's classes; the same names in another order are permuted into place; any other class
  set re-initialises it.
- Relative-position tables (and a ViT's position embedding) are interpolated when the input
  size differs, as timm does, so a model trained at 128 px can start a 64 px run.
- Every other tensor must match by name and shape: a mismatch names the keys.

Layer-wise lr decay (BEiT, as in timm's `param_groups_layer_decay`): the stem/patch embedding
is layer 0, block i is layer i + 1, the head layer L + 1; layer l trains at
lr x decay^(L + 1 - l), so the head keeps the full lr and early layers move least.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
# A parameter inside block b of stage s (Astroformer/CoAtNet) or block i (ViT).
_BLOCK = re.compile(r"^(stages\.\d+\.\d+|blocks\.\d+)\.")
# timm's state-dict containers and the prefix DDP/compile add.
_CONTAINER_KEYS = ("state_dict_ema", "state_dict", "model")
_PREFIXES = ("module.", "_orig_mod.")


class InitError(ValueError):
    """The initial weights cannot start this run; the message says why."""


@dataclass(frozen=True)
class InitReport:
    source: str
    kind: str  # "galmorph run" or "weights file"
    head: str  # kept | permuted | re-initialised
    resized: tuple[str, ...]

    def describe(self) -> str:
        resized = f", {len(self.resized)} position table(s) resized" if self.resized else ""
        return f"initialised from {self.kind} {self.source}: classifier {self.head}{resized}"


def initialise_from(
    model: nn.Module,
    source: str | Path,
    *,
    model_name: str,
    class_names: tuple[str, ...],
) -> InitReport:
    """Load `source`'s weights into `model` (a freshly built `model_name`), in place."""
    path = Path(source)
    if path.is_dir():
        state, source_names, kind = _run_weights(path, model_name), _run_class_names(path), "run"
    elif path.is_file() and path.suffix.lower() in WEIGHT_SUFFIXES:
        state, source_names, kind = _file_weights(path), None, "file"
    else:
        raise InitError(
            f"init_from {path}: expected a galmorph run folder or a weights file "
            f"({', '.join(WEIGHT_SUFFIXES)})"
        )
    target = model.state_dict()
    classifier = _classifier_keys(model)
    head = _adapt_head(state, target, classifier, source_names, class_names)
    resized = _resize_position_tables(state, target)
    missing = sorted(
        set(target) - set(state) - (set(classifier) if head == "re-initialised" else set())
    )
    unexpected = sorted(set(state) - set(target))
    wrong = sorted(k for k in set(state) & set(target) if state[k].shape != target[k].shape)
    if missing or unexpected or wrong:
        details = [
            f"{what}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
            for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape", wrong))
            if keys
        ]
        raise InitError(f"init_from {path} does not fit {model_name}: " + "; ".join(details))
    model.load_state_dict(state, strict=False)
    report = InitReport(
        source=str(path),
        kind="galmorph run" if kind == "run" else "weights file",
        head=head,
        resized=tuple(resized),
    )
    logger.info("%s", report.describe())
    return report


def _run_weights(run_dir: Path, model_name: str) -> dict[str, torch.Tensor]:
    from galmorph.model.checkpoint import CheckpointError, load_model

    try:
        model, spec = load_model(run_dir)
    except CheckpointError as exc:
        raise InitError(f"init_from {run_dir}: {exc}") from exc
    if spec.name != model_name:
        raise InitError(
            f"init_from {run_dir} is a {spec.name}; this run trains {model_name}: set model "
            f"to {spec.name} (or start from a run of {model_name})"
        )
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _run_class_names(run_dir: Path) -> tuple[str, ...]:
    from galmorph.model.checkpoint import load_spec

    return tuple(load_spec(run_dir).class_names)


def _file_weights(path: Path) -> dict[str, torch.Tensor]:
    from galmorph.model.timm_compat import convert_timm_state_dict

    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        loaded: object = load_file(str(path))
    else:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for a non-state-dict file
            raise InitError(f"init_from {path}: not a readable state dict: {exc}") from exc
    for key in _CONTAINER_KEYS:
        if isinstance(loaded, Mapping) and isinstance(loaded.get(key), Mapping):
            loaded = loaded[key]
            break
    if not isinstance(loaded, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in loaded.values()
    ):
        raise InitError(f"init_from {path}: expected a mapping of names to tensors")
    state = {_strip_prefixes(str(k)): v for k, v in loaded.items()}
    if any(re.match(r"^stages\.\d+\.blocks\.", k) for k in state):
        try:
            state = convert_timm_state_dict(state)
        except ValueError as exc:
            raise InitError(f"init_from {path}: {exc}") from exc
    return state


def _strip_prefixes(key: str) -> str:
    for prefix in _PREFIXES:
        key = key.removeprefix(prefix)
    return key


def _classifier_keys(model: nn.Module) -> list[str]:
    classifier = getattr(model, "classifier", None)
    if not isinstance(classifier, nn.Linear):
        raise InitError(f"{type(model).__name__} has no `classifier` Linear to adapt")
    owned = {id(p) for p in classifier.parameters()}
    return [name for name, p in model.named_parameters() if id(p) in owned]


def _adapt_head(
    state: dict[str, torch.Tensor],
    target: Mapping[str, torch.Tensor],
    classifier: list[str],
    source_names: tuple[str, ...] | None,
    class_names: tuple[str, ...],
) -> str:
    """Keep, permute or drop the source's classifier rows (dropped: the fresh init stays)."""
    shapes_fit = all(k in state and state[k].shape == target[k].shape for k in classifier)
    if source_names is None:
        same = shapes_fit  # a foreign file names no classes: same count is all we can check
        if same:
            logger.warning(
                "init_from weights name no classes: keeping their %d-class classifier as "
                "this run's classes in order",
                len(class_names),
            )
    else:
        same = source_names == class_names
        if not same and sorted(source_names) == sorted(class_names):
            order = torch.tensor([source_names.index(name) for name in class_names])
            for key in classifier:
                state[key] = state[key][order].clone()
            return "permuted"
    if same:
        return "kept"
    for key in classifier:
        state.pop(key, None)
    return "re-initialised"


def _resize_position_tables(
    state: dict[str, torch.Tensor], target: Mapping[str, torch.Tensor]
) -> list[str]:
    resized = []
    for key, value in list(state.items()):
        if key not in target or value.shape == target[key].shape:
            continue
        if key.endswith("relative_position_bias_table"):
            state[key] = _resize_table(value, target[key].shape[0])
        elif key.endswith("pos_embed") and value.ndim == 3:
            state[key] = _resize_pos_embed(value, target[key].shape[1])
        else:
            continue
        resized.append(key)
    return resized


def _resize_table(table: torch.Tensor, rows: int) -> torch.Tensor:
    """((2H-1)^2, heads) -> ((2H'-1)^2, heads), bilinear over the offset grid (zero at centre)."""
    side, new_side = _square_side(table.shape[0]), _square_side(rows)
    grid = table.T.reshape(1, table.shape[1], side, side).float()
    grid = F.interpolate(grid, size=(new_side, new_side), mode="bilinear", align_corners=True)
    return grid.reshape(table.shape[1], rows).T.contiguous().to(table.dtype)


def _resize_pos_embed(embed: torch.Tensor, tokens: int) -> torch.Tensor:
    """(1, 1 + N, D) -> (1, 1 + N', D): the class token kept, the patch grid interpolated."""
    cls, grid = embed[:, :1], embed[:, 1:]
    side, new_side = _square_side(grid.shape[1]), _square_side(tokens - 1)
    patches = grid.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
    patches = F.interpolate(patches, size=(new_side, new_side), mode="bicubic", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, new_side * new_side, -1).to(embed.dtype)
    return torch.cat([cls, patches], dim=1)


def _square_side(count: int) -> int:
    side = round(count**0.5)
    if side * side != count:
        raise InitError(f"cannot resize a position table of {count} entries (not a square grid)")
    return side


def freeze_stages(model: nn.Module, stages: int) -> list[nn.Module]:
    """Freeze the stem and the first `stages` stages; returns them (kept in eval mode)."""
    if stages == 0:
        return []
    blocks = getattr(model, "stages", None)
    stem = getattr(model, "stem", None)
    if not isinstance(blocks, nn.Sequential) or stem is None:
        raise InitError(
            f"freeze_stages needs a model with a stem and stages (Astroformer, CoAtNet), "
            f"not {type(model).__name__}"
        )
    if stages > len(blocks):
        raise InitError(f"freeze_stages is {stages} but the model has {len(blocks)} stages")
    frozen = [stem, *list(blocks)[:stages]]
    for module in frozen:
        module.requires_grad_(False)
        module.eval()
    return frozen


def layer_ids(model: nn.Module) -> tuple[dict[str, int], int]:
    """Each trainable parameter's layer (0 = stem, 1..L = blocks, L + 1 = head), and L + 1."""
    block_of: dict[str, int] = {}
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    ids: dict[str, int] = {}
    for name in names:
        match = _BLOCK.match(name)
        if match:
            ids[name] = block_of.setdefault(match.group(1), len(block_of) + 1)
    last = len(block_of) + 1
    seen_block = False
    for name in names:
        if name in ids:
            seen_block = True
        else:
            ids[name] = last if seen_block else 0
    return ids, last
