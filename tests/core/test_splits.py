"""Stratified, seeded, reproducible splits and their JSON form."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from galmorph.core.data.splits import Split, SplitError, make_split


def imbalanced_labels() -> np.ndarray:
    counts = [500, 37, 120, 3, 1, 64]  # a class with 3 members, one with a single member
    labels = np.repeat(np.arange(len(counts)), counts)
    return np.random.default_rng(5).permutation(labels)


def test_split_is_stratified_disjoint_and_complete() -> None:
    labels = imbalanced_labels()
    split = make_split(labels, seed=3, fractions=(0.8, 0.1, 0.1))
    combined = np.concatenate([split.train, split.val, split.test])
    np.testing.assert_array_equal(np.sort(combined), np.arange(labels.size))
    for part in (split.train, split.val, split.test):
        assert np.all(np.diff(part) > 0)  # sorted, no repeats
    for cls in range(6):
        members = int((labels == cls).sum())
        counts = [int((labels[p] == cls).sum()) for p in (split.train, split.val, split.test)]
        assert sum(counts) == members
        if members >= 3:
            assert min(counts) >= 1, (cls, counts)
        if members >= 100:
            assert abs(counts[0] / members - 0.8) < 0.01
            assert abs(counts[1] / members - 0.1) < 0.01
    assert split.class_counts["val"][3] == 1 and split.class_counts["train"][4] == 1


def test_split_is_reproducible_by_seed() -> None:
    labels = imbalanced_labels()
    a, b = make_split(labels, seed=11), make_split(labels, seed=11)
    c = make_split(labels, seed=12)
    for name in ("train", "val", "test"):
        np.testing.assert_array_equal(a.indices(name), b.indices(name))
    assert not np.array_equal(a.val, c.val)


def test_json_round_trip(tmp_path: Path) -> None:
    labels = imbalanced_labels()
    fingerprint = {"digest": "ab" * 32, "num_images": int(labels.size)}
    split = make_split(labels, seed=1, fractions=(0.7, 0.2, 0.1), fingerprint=fingerprint)
    path = split.save(tmp_path / "split.json")
    loaded = Split.load(path)
    for name in ("train", "val", "test"):
        np.testing.assert_array_equal(loaded.indices(name), split.indices(name))
    assert loaded.seed == 1 and loaded.fractions == (0.7, 0.2, 0.1)
    assert loaded.fingerprint == fingerprint and loaded.class_counts == split.class_counts
    loaded.check_data(int(labels.size), fingerprint)
    with pytest.raises(SplitError, match="different data"):
        loaded.check_data(int(labels.size), {"digest": "cd" * 32})
    with pytest.raises(SplitError, match="examples"):
        loaded.check_data(10)


def test_bad_inputs_and_files(tmp_path: Path) -> None:
    labels = imbalanced_labels()
    with pytest.raises(SplitError, match="sum"):
        make_split(labels, fractions=(0.8, 0.3, 0.1))
    with pytest.raises(SplitError, match="train fraction"):
        make_split(labels, fractions=(0.0, 0.5, 0.5))
    with pytest.raises(SplitError, match="non-negative"):
        make_split(np.array([0, -1, 2]))
    data = make_split(labels).to_dict()
    data["val"] = [*data["val"], data["train"][0]]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(SplitError, match="more than one split"):
        Split.load(bad)
    bad.write_text("{not json")
    with pytest.raises(SplitError, match="not a JSON split"):
        Split.load(bad)
    bad.write_text(json.dumps({"format": "other"}))
    with pytest.raises(SplitError, match="not a galmorph-split"):
        Split.load(bad)


def test_zero_fraction_split_is_empty() -> None:
    split = make_split(np.arange(100) % 4, fractions=(0.9, 0.1, 0.0))
    # 25 per class: 22.5 / 2.5 / 0 -> the tied half goes to train.
    assert split.test.size == 0 and split.val.size == 8 and split.train.size == 92
