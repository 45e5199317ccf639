"""Stratified, seeded train/val/test splits, saved as JSON so they can be reproduced exactly.

The JSON holds the index lists themselves, not just the seed: a split reloads identically even
if numpy's random streams change between versions. The data fingerprint recorded with it lets
a later run refuse a split made for other data.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from galmorph.core.files import atomic_write_text

SPLIT_NAMES = ("train", "val", "test")
SPLIT_FORMAT = "galmorph-split"
SPLIT_VERSION = 1
# A split file lists indices; anything far beyond a few hundred MB is not one.
MAX_SPLIT_FILE_BYTES = 512 * 1024 * 1024


class SplitError(ValueError):
    """A split cannot be made, read or used as asked; the message says why."""


@dataclass(frozen=True)
class Split:
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    seed: int
    fractions: tuple[float, float, float]
    fingerprint: dict[str, Any] | None = None
    num_examples: int = 0
    class_counts: dict[str, list[int]] = field(default_factory=dict)  # split -> per-class count
    # Rows holding the same galaxy (galmorph.core.data.duplicates), each group kept on one side.
    duplicate_groups: list[list[int]] = field(default_factory=list)

    def indices(self, name: str) -> np.ndarray:
        if name not in SPLIT_NAMES:
            raise KeyError(f"unknown split {name!r}; known: {', '.join(SPLIT_NAMES)}")
        return getattr(self, name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": SPLIT_FORMAT,
            "version": SPLIT_VERSION,
            "seed": self.seed,
            "fractions": list(self.fractions),
            "num_examples": self.num_examples,
            "fingerprint": self.fingerprint,
            "class_counts": self.class_counts,
            "duplicate_groups": self.duplicate_groups,
            **{name: self.indices(name).tolist() for name in SPLIT_NAMES},
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically and durably (galmorph.core.files.atomic_write_text)."""
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Split:
        path = Path(path)
        size = path.stat().st_size
        if size > MAX_SPLIT_FILE_BYTES:
            raise SplitError(f"{path}: {size} bytes is too large for a split file")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SplitError(f"{path}: not a JSON split file: {exc}") from exc
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "split") -> Split:
        if not isinstance(data, dict) or data.get("format") != SPLIT_FORMAT:
            raise SplitError(f"{source}: not a {SPLIT_FORMAT} file")
        if data.get("version") != SPLIT_VERSION:
            raise SplitError(f"{source}: unsupported split version {data.get('version')!r}")
        arrays = {}
        for name in SPLIT_NAMES:
            values = data.get(name)
            if not isinstance(values, list) or not all(
                isinstance(v, int) and v >= 0 for v in values
            ):
                raise SplitError(f"{source}: '{name}' must be a list of non-negative integers")
            arrays[name] = np.asarray(values, dtype=np.int64)
        combined = np.concatenate(list(arrays.values()))
        if np.unique(combined).size != combined.size:
            raise SplitError(f"{source}: an index appears in more than one split (or twice)")
        num_examples = int(data.get("num_examples", 0))
        if combined.size and num_examples and int(combined.max()) >= num_examples:
            raise SplitError(f"{source}: index {int(combined.max())} >= {num_examples} examples")
        fractions = data.get("fractions")
        if not isinstance(fractions, list) or len(fractions) != 3:
            raise SplitError(f"{source}: 'fractions' must be a list of three numbers")
        return cls(
            **arrays,
            seed=int(data["seed"]),
            fractions=(float(fractions[0]), float(fractions[1]), float(fractions[2])),
            fingerprint=data.get("fingerprint"),
            num_examples=num_examples,
            class_counts={k: list(map(int, v)) for k, v in data.get("class_counts", {}).items()},
            duplicate_groups=[list(map(int, g)) for g in data.get("duplicate_groups", [])],
        )

    def check_data(self, num_examples: int, fingerprint: dict[str, Any] | None = None) -> None:
        """Raise SplitError unless this split was made for data of this size and content."""
        if self.num_examples != num_examples:
            raise SplitError(
                f"split was made for {self.num_examples} examples, data has {num_examples}"
            )
        mine = (self.fingerprint or {}).get("digest")
        theirs = (fingerprint or {}).get("digest")
        if mine and theirs and mine != theirs:
            raise SplitError(
                "split was made for different data (fingerprint digest "
                f"{mine[:12]}… != {theirs[:12]}…)"
            )


def make_split(
    labels: np.ndarray,
    *,
    seed: int = 0,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    fingerprint: dict[str, Any] | None = None,
    duplicate_groups: list[list[int]] | None = None,
) -> Split:
    """Split example indices per class in the given proportions.

    Every split with a non-zero fraction gets at least one member of each class that has at
    least as many members as there are such splits; counts otherwise follow the fractions by
    largest-remainder rounding. Then each group of duplicate rows joins the split of its first
    member, so no galaxy is on both sides. Indices within each split are sorted (sequential
    HDF5 reads).
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0:
        raise SplitError(f"labels must be a non-empty 1-D array, got shape {labels.shape}")
    if labels.dtype.kind not in "iu" or labels.min() < 0:
        raise SplitError("labels must be non-negative integers")
    weights = np.asarray(fractions, dtype=np.float64)
    if weights.shape != (3,) or (weights < 0).any() or abs(weights.sum() - 1.0) > 1e-6:
        raise SplitError(f"fractions must be three non-negative numbers summing to 1: {fractions}")
    if weights[0] == 0:
        raise SplitError("the train fraction must be positive")
    rng = np.random.default_rng(seed)
    num_classes = int(labels.max()) + 1
    parts: list[list[np.ndarray]] = [[], [], []]
    for cls in range(num_classes):
        members = np.flatnonzero(labels == cls)
        if members.size == 0:
            continue
        members = rng.permutation(members)
        sizes = _allocate(members.size, weights)
        bounds = np.cumsum(sizes)[:-1]
        for part, chunk in enumerate(np.split(members, bounds)):
            parts[part].append(chunk)
    assignment = np.empty(labels.size, np.int64)
    for part, chunks in enumerate(parts):
        for chunk in chunks:
            assignment[chunk] = part
    groups = [sorted(map(int, group)) for group in duplicate_groups or [] if len(group) > 1]
    for group in groups:
        assignment[group] = assignment[group[0]]
    train, val, test = (np.flatnonzero(assignment == part).astype(np.int64) for part in range(3))
    counts = np.stack(
        [np.bincount(labels[members], minlength=num_classes) for members in (train, val, test)]
    )
    return Split(
        train=train,
        val=val,
        test=test,
        seed=seed,
        fractions=(float(weights[0]), float(weights[1]), float(weights[2])),
        fingerprint=fingerprint,
        num_examples=int(labels.size),
        class_counts={name: counts[i].tolist() for i, name in enumerate(SPLIT_NAMES)},
        duplicate_groups=groups,
    )


def _allocate(total: int, weights: np.ndarray) -> np.ndarray:
    """Sizes summing to `total`, near total*weights, each non-zero share >= 1 when possible."""
    ideal = total * weights
    sizes = np.floor(ideal).astype(np.int64)
    remainder = total - int(sizes.sum())
    # Largest remainder; ties go to the earlier split (train first).
    order = np.argsort(-(ideal - sizes), kind="stable")
    sizes[order[:remainder]] += 1
    wanted = np.flatnonzero(weights > 0)
    if total >= wanted.size:
        for part in wanted:
            if sizes[part] == 0:
                donor = int(np.argmax(sizes))
                sizes[donor] -= 1
                sizes[part] += 1
    return sizes
