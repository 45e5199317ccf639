"""The sample images an export stores in the model file (issue #30): SAMPLE_IMAGES held-out
images, seeded and spread over the classes, at the input size, in one metadata key that the card,
/model and `model inspect` only count. The openvino engine checks its bf16 answers on them
(tests/core/test_engine_choice.py)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import h5py
import numpy as np
import onnx
import pytest

from galmorph.cli import main
from galmorph.core.data.galaxy10 import GALAXY10_CLASS_NAMES
from galmorph.core.modelfile.contract import (
    SAMPLE_IMAGES,
    SAMPLE_IMAGES_KEY,
    read_sample_images,
)
from galmorph.core.modelfile.engine import CPU_PROVIDER, OnnxModel
from galmorph.model.export import FitImages, pick_samples
from tests.support.training_helpers import make_synthetic

SIZE = 64  # make_synthetic's size: the held-out file needs no resizing


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight gm_astroformer_tiny run folder: export needs no training to be tested."""
    import torch

    from galmorph.model.checkpoint import ModelSpec, save_model
    from galmorph.model.registry import create_model

    torch.manual_seed(0)
    classes = len(GALAXY10_CLASS_NAMES)
    model = create_model("gm_astroformer_tiny", num_classes=classes, img_size=SIZE).eval()
    spec = ModelSpec(
        name="gm_astroformer_tiny",
        num_classes=classes,
        img_size=SIZE,
        class_names=tuple(GALAXY10_CLASS_NAMES),
    )
    run = tmp_path_factory.mktemp("samples") / "run"
    save_model(run, model, spec)
    return run


@pytest.fixture(scope="module")
def held_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("held_out") / "held_out.h5", n=40, seed=3)


@pytest.fixture(scope="module")
def exported(run_dir: Path, held_out: Path) -> Path:
    out = run_dir.parent / "model.onnx"
    args = ["export", str(run_dir), "--out", str(out), "--data", str(held_out), "--no-ood"]
    assert main([*args, "--threads", "1", "--fit-count", "40"]) == 0
    return out


def test_export_with_data_stores_eight_held_out_images_over_eight_classes(
    exported: Path, held_out: Path
) -> None:
    props = {p.key: p.value for p in onnx.load(str(exported)).metadata_props}
    samples = read_sample_images(props, (SIZE, SIZE))
    assert samples is not None
    assert samples.shape == (SAMPLE_IMAGES, SIZE, SIZE, 3) and samples.dtype == np.uint8
    with h5py.File(held_out) as file:
        images, labels = file["images"][:], file["ans"][:]
    rows = [int(np.flatnonzero((images == sample).all(axis=(1, 2, 3)))[0]) for sample in samples]
    # Lossless and really the held-out rows; one per class while classes remain.
    assert len(set(labels[rows])) == SAMPLE_IMAGES


def test_samples_are_seeded_and_spread_over_the_classes() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (30, 4, 4, 3), dtype=np.uint8)
    labels = np.array([0] * 20 + [1] * 6 + [2] * 4)
    fit = FitImages(None, None, images, labels)
    picked = pick_samples(fit, seed=5)
    assert np.array_equal(picked, pick_samples(fit, seed=5))
    assert not np.array_equal(picked, pick_samples(fit, seed=6))
    rows = [int(np.flatnonzero((images == p).all(axis=(1, 2, 3)))[0]) for p in picked]
    # Three classes, eight images: round after round, so the rare classes are not crowded out.
    assert sorted(np.bincount(labels[rows])) == [2, 3, 3]


def test_inspect_and_the_card_count_the_samples_and_never_print_them(
    exported: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["model", "inspect", str(exported)]) == 0
    text = capsys.readouterr().out
    assert "sample images  8 (" in text
    assert main(["model", "inspect", str(exported), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["sample_images"] == SAMPLE_IMAGES
    model = OnnxModel(exported, providers=[CPU_PROVIDER], intra_op_threads=1)
    # GET /model prints the card whole: the PNG bytes are no card field.
    assert "sample_images" not in dataclasses.asdict(model.card)
    assert len(text) < 4000 and len(json.dumps(document)) < 8000


def test_an_export_without_labelled_images_stores_none(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "plain.onnx"
    args = ["export", str(run_dir), "--out", str(out), "--no-calibrate", "--no-ood"]
    assert main([*args, "--threads", "1"]) == 0
    props = {p.key for p in onnx.load(str(out)).metadata_props}
    assert SAMPLE_IMAGES_KEY not in props
    capsys.readouterr()
    assert main(["model", "inspect", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["sample_images"] == 0
