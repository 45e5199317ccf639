"""Training-state checkpoints: tensors in safetensors, everything else in JSON, no pickle.

A checkpoint is two files named after its global step plus a manifest:

    train_state-00001234.safetensors   model, optimizer, EMA tensors and torch RNG states
    train_state-00001234.json          epoch, step, scheduler, python/numpy RNG, config, ...
    train_state.json                   manifest: which pair is current, with sizes and SHA-256

Each file is written with galmorph.core.files.atomic_write (temporary name, fsync, rename,
folder fsync); the manifest is renamed last. A crash at any moment (even kill -9) therefore
leaves either the previous checkpoint or the new one, never a half-written file under a final
name, and the loader verifies sizes and hashes before trusting a pair. Older pairs are deleted
only after the manifest points past them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from galmorph.core.files import atomic_write, atomic_write_text, sha256_file
from galmorph.model.checkpoint import CheckpointError

MANIFEST_NAME = "train_state.json"
MANIFEST_FORMAT = "galmorph-train-state"
MANIFEST_VERSION = 1
TENSOR_MARKER = "__tensor__"
TUPLE_MARKER = "__tuple__"
# The JSON half holds optimizer hyper-parameters and RNG states, never bulk data.
MAX_STATE_JSON_BYTES = 64 * 1024 * 1024


def flatten_tensors(obj: Any, tensors: dict[str, torch.Tensor], prefix: str = "") -> Any:
    """Replace every tensor in a nested dict/list structure by a reference into `tensors`."""
    if isinstance(obj, torch.Tensor):
        key = prefix or "tensor"
        if key in tensors:
            raise ValueError(f"two checkpoint tensors would share the name {key!r}")
        tensors[key] = obj.detach().to("cpu").contiguous()
        return {TENSOR_MARKER: key}
    if isinstance(obj, dict):
        for key in obj:
            if not isinstance(key, str | int):
                raise TypeError(f"cannot checkpoint a dict key of type {type(key).__name__}")
        # JSON keys are strings: remember integer keys (optimizer state is keyed by int).
        return {
            "__dict__": [
                [key, flatten_tensors(value, tensors, f"{prefix}.{key}" if prefix else str(key))]
                for key, value in obj.items()
            ]
        }
    if isinstance(obj, tuple):
        return {
            TUPLE_MARKER: [flatten_tensors(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
        }
    if isinstance(obj, list):
        return [flatten_tensors(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"cannot checkpoint a value of type {type(obj).__name__} at {prefix!r}")


def restore_tensors(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of flatten_tensors."""
    if isinstance(obj, dict):
        if TENSOR_MARKER in obj:
            key = obj[TENSOR_MARKER]
            if key not in tensors:
                raise CheckpointError(f"checkpoint tensor {key!r} is missing")
            return tensors[key]
        if TUPLE_MARKER in obj:
            return tuple(restore_tensors(v, tensors) for v in obj[TUPLE_MARKER])
        return {key: restore_tensors(value, tensors) for key, value in obj["__dict__"]}
    if isinstance(obj, list):
        return [restore_tensors(v, tensors) for v in obj]
    return obj


def save_checkpoint(run_dir: Path, state: dict[str, Any], step: int, keep: int = 1) -> Path:
    """Write `state` (nested dicts of tensors and JSON values) as the run's current checkpoint."""
    run_dir.mkdir(parents=True, exist_ok=True)
    stem = f"train_state-{step:08d}"
    tensors: dict[str, torch.Tensor] = {}
    structure = flatten_tensors(state, tensors)
    tensor_path = run_dir / f"{stem}.safetensors"
    json_path = run_dir / f"{stem}.json"
    with atomic_write(tensor_path) as tmp:
        save_file(tensors, str(tmp))
    atomic_write_text(json_path, json.dumps(structure))
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "step": step,
        "files": {path.name: _describe(path) for path in (tensor_path, json_path)},
        "tensors": tensor_path.name,
        "state": json_path.name,
    }
    manifest_path = run_dir / MANIFEST_NAME
    atomic_write_text(manifest_path, json.dumps(manifest, indent=1))
    _prune(run_dir, keep_stems=_recent_stems(run_dir, keep, current=stem))
    return manifest_path


def load_checkpoint(run_dir: Path) -> dict[str, Any]:
    """Read the checkpoint the manifest names, after checking sizes and hashes."""
    manifest_path = run_dir / MANIFEST_NAME
    if not manifest_path.is_file():
        raise CheckpointError(f"no training checkpoint in {run_dir} ({MANIFEST_NAME} missing)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{manifest_path} is not valid JSON: {exc}") from exc
    if manifest.get("format") != MANIFEST_FORMAT or manifest.get("version") != MANIFEST_VERSION:
        raise CheckpointError(f"{manifest_path} is not a galmorph training-state manifest")
    for name, expected in manifest["files"].items():
        path = run_dir / Path(name).name
        if not path.is_file():
            raise CheckpointError(f"checkpoint file {path} named by the manifest is missing")
        if path.stat().st_size != expected["bytes"] or sha256_file(path) != expected["sha256"]:
            raise CheckpointError(f"checkpoint file {path} does not match its manifest entry")
    state_path = run_dir / Path(manifest["state"]).name
    if state_path.stat().st_size > MAX_STATE_JSON_BYTES:
        raise CheckpointError(f"{state_path} is implausibly large for a state file")
    structure = json.loads(state_path.read_text(encoding="utf-8"))
    tensors = load_file(str(run_dir / Path(manifest["tensors"]).name))
    state: dict[str, Any] = restore_tensors(structure, tensors)
    return state


def has_checkpoint(run_dir: Path) -> bool:
    return (run_dir / MANIFEST_NAME).is_file()


def _describe(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _recent_stems(run_dir: Path, keep: int, current: str) -> set[str]:
    stems = sorted({p.name.split(".")[0] for p in run_dir.glob("train_state-*.*")})
    return {current, *stems[-keep:]} if keep > 0 else {current}


def _prune(run_dir: Path, keep_stems: set[str]) -> None:
    for path in run_dir.glob("train_state-*.*"):
        if path.name.split(".")[0] not in keep_stems:
            path.unlink(missing_ok=True)
