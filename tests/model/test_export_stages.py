"""The export's stages one at a time (model/export.py): resolve, fit, card, trace, check, write.

One tiny random checkpoint (gm_astroformer_tiny, 32 px) traced once; each test drives a stage
directly, as `export_model` chains them.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from galmorph.core.data.galaxy10 import GALAXY10_CLASS_NAMES
from galmorph.core.modelfile.engine import OnnxModel
from galmorph.model import export
from galmorph.model.checkpoint import ModelSpec, save_model
from galmorph.model.registry import create_model

NAME = "gm_astroformer_tiny"
SIZE = 32


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("run")
    model = create_model(NAME, num_classes=10, img_size=SIZE).eval()
    spec = ModelSpec(name=NAME, num_classes=10, img_size=SIZE, class_names=GALAXY10_CLASS_NAMES)
    save_model(folder, model, spec)
    return folder


@pytest.fixture(scope="module")
def source(run: Path) -> export.Source:
    return export.resolve(run)


@pytest.fixture(scope="module")
def traced(source: export.Source, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The untempered graph traced once: the candidate file and its PyTorch reference."""
    fitted = export.fit(source, None)
    card = export.make_card(source, fitted, "fp32")
    reference, graph = export.build_graphs(source, fitted, "fp32")
    work = tmp_path_factory.mktemp("work")
    candidate = export.trace(graph, card, work, opset=20, external=False)
    return {"candidate": candidate, "reference": reference, "card": card}


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)


def _fit_images(train_labels: list[int], val_count: int = 12) -> export.FitImages:
    val_labels = np.arange(val_count) % 10
    return export.FitImages(
        _images(len(train_labels), 1), np.asarray(train_labels), _images(val_count, 2), val_labels
    )


def test_resolve_refuses_int8_over_the_single_file_limit_before_anything_is_traced(
    run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(export, "MAX_SINGLE_FILE_BYTES", 2**20)
    assert export.resolve(run, "fp32").external
    with pytest.raises(export.ExportError, match="int8 export of a model over 2 GiB"):
        export.resolve(run, "int8")


def test_resolve_names_the_image_set_of_the_wrong_size(run: Path) -> None:
    wrong = np.zeros((2, SIZE * 2, SIZE * 2, 3), np.uint8)
    with pytest.raises(ValueError, match=rf"calibration images must be uint8 \(N, {SIZE}, {SIZE}"):
        export.resolve(run, images={"parity": None, "calibration": wrong})


def test_fit_refuses_too_few_training_rows_for_the_ood_statistics(source: export.Source) -> None:
    with pytest.raises(ValueError, match="3 images cannot describe 3 classes"):
        export.fit(source, _fit_images([0, 1, 2]))
    # Without the OOD score the same rows are enough: only the temperature is fitted.
    fitted = export.fit(source, _fit_images([0, 1, 2]), ood_fpr=None)
    assert fitted.gaussians is None and fitted.ood == {}
    assert fitted.calibration["num_images"] == 12


def test_fit_keeps_a_votes_run_untempered_but_still_fits_its_ood_score(
    source: export.Source,
) -> None:
    labels = [k % 10 for k in range(30)]
    votes = export.fit(export.Source(**{**vars(source), "targets": "votes"}), _fit_images(labels))
    assert votes.temperature == 1.0
    assert votes.calibration["applied"] is False
    assert votes.calibration["reason"] == export.VOTES_REASON
    assert votes.gaussians is not None and votes.ood["threshold"] > 0
    off = export.fit(source, _fit_images(labels), calibrate=False)
    assert off.calibration["reason"] == export.NO_CALIBRATE_REASON


def test_the_card_carries_the_fit_the_targets_and_metric_overrides(
    source: export.Source,
) -> None:
    fitted = export.Fitted(0.8, None, {"applied": True, "temperature": 0.8}, {})
    votes = export.Source(**{**vars(source), "targets": "votes"})
    card = export.make_card(votes, fitted, "fp16", {"val_accuracy": 0.9})
    assert (card.precision, card.targets) == ("fp16", "votes")
    assert card.calibration == {"applied": True, "temperature": 0.8}
    assert card.metrics["val_accuracy"] == 0.9


def test_check_passes_the_traced_graph_and_catches_an_injected_mismatch(traced: dict) -> None:
    batches = export.parity_batches(SIZE, _images(3, 3))
    parity = export.check(traced["candidate"], traced["reference"], batches, "fp32", 1)
    assert parity.max_abs_diff <= export.PARITY_TOLERANCE["fp32"]
    assert parity.num_images == sum(export.RANDOM_BATCH_SIZES) + 3
    # PyTorch now favours class 0 by 5 logits; the ONNX file does not.
    tampered = copy.deepcopy(traced["reference"])
    with torch.no_grad():
        tampered.model.classifier.bias[0] += 5.0
    with pytest.raises(export.ExportError, match="ONNX does not reproduce PyTorch"):
        export.check(traced["candidate"], tampered, batches, "fp32", 1)


def test_write_replaces_a_previous_file_with_the_checked_model(
    traced: dict, tmp_path: Path
) -> None:
    out = tmp_path / "model.onnx"
    out.write_bytes(b"an older model")
    batches = export.parity_batches(SIZE)
    parity = export.check(traced["candidate"], traced["reference"], batches, "fp32", 1)
    export.write(traced["candidate"], out, traced["card"], parity, external=False)
    keys = {entry.key for entry in onnx.load_model(str(out)).metadata_props}
    assert export.PARITY_KEY in keys
    assert OnnxModel(out).card.class_names == GALAXY10_CLASS_NAMES
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_trace_leaves_no_path_or_line_of_the_exporting_checkout(traced: dict) -> None:
    """Exports are reproducible across checkouts and carry no machine paths."""
    model = onnx.load(traced["candidate"])
    annotated = [node.name for node in model.graph.node if len(node.metadata_props)]
    assert not annotated, annotated[:5]
    assert str(Path(export.__file__).parent).encode() not in model.SerializeToString()
