"""Seed ensembles exported as one file (galmorph.model.ensemble, `galmorph export RUN RUN ...`).

The user's journey: the small-data recipe trained twice on one file with different seeds,
exported together with a held-out file for the temperature and the OOD threshold, then served
and evaluated like any model. The file's probabilities are the mean of the members' (checked
against the members' own exports), its embeddings theirs side by side; runs that do not share
model, data and split are refused in one line, before anything is written.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from galmorph.cli import main
from galmorph.core.cutouts.resample import resize_images
from galmorph.core.data.galaxy10 import Galaxy10File
from galmorph.core.modelfile.engine import CPU_PROVIDER, OnnxModel
from galmorph.model.checkpoint import CheckpointError, load_model
from galmorph.model.ensemble import SeedEnsemble, load_ensemble
from tests.support.server_process import serve
from tests.support.training_helpers import (
    FOUR_CLASSES,
    TINY_RECIPE,
    four_class_file,
    make_synthetic,
)

FAST_EXPORT = ("--threads", "1", "--fit-count", "100")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ensemble")
    mine = four_class_file(
        root / "mine.h5", make_synthetic(root / "g_a.h5", n=64, seed=0), FOUR_CLASSES
    )
    other = four_class_file(
        root / "other.h5", make_synthetic(root / "g_b.h5", n=64, seed=2), FOUR_CLASSES
    )
    test = four_class_file(
        root / "test.h5", make_synthetic(root / "g_t.h5", n=32, seed=1), FOUR_CLASSES
    )
    found = {"test": test}
    for name, data, seed in (("s1", mine, 1), ("s2", mine, 2), ("other", other, 1)):
        out = root / name
        command = ["train", "--data", str(data), "--out", str(out), *TINY_RECIPE]
        assert main([*command, "--set", f"seed={seed}"]) == 0
        found[name] = out
    return found


def test_the_ensemble_module_answers_the_mean_of_its_members(runs: dict[str, Path]) -> None:
    ensemble, spec = load_ensemble([runs["s1"], runs["s2"]])
    members = [load_model(runs[name])[0] for name in ("s1", "s2")]
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        mean = torch.stack([m(x).softmax(-1) for m in members]).mean(0)
        assert torch.allclose(ensemble(x).softmax(-1), mean, atol=1e-6)
        assert ensemble.forward_pre_logits(x).shape == (5, 2 * 256)
    assert spec.metrics == {} and spec.training_data["ensemble_runs"][1] == str(runs["s2"])
    with pytest.raises(ValueError, match="at least one"):
        SeedEnsemble([])


def test_exported_ensemble_is_the_mean_of_the_members_exports(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plain = ("--no-calibrate", "--no-ood", *FAST_EXPORT)
    for name in ("s1", "s2"):
        member_out = tmp_path / f"{name}.onnx"
        assert main(["export", str(runs[name]), "--out", str(member_out), *plain]) == 0
    out = tmp_path / "both.onnx"
    assert main(["export", str(runs["s1"]), str(runs["s2"]), "--out", str(out), *plain]) == 0
    images = resize_images(Galaxy10File(runs["test"]).images(np.arange(16)), 32)

    def engine(path: Path) -> OnnxModel:
        return OnnxModel(path, providers=[CPU_PROVIDER], intra_op_threads=1)

    members = [engine(tmp_path / f"{name}.onnx").run(images) for name in ("s1", "s2")]
    both = engine(out)
    answer = both.run(images)
    mean = np.mean([m.probabilities for m in members], axis=0)
    assert np.abs(answer.probabilities - mean).max() < 1e-4
    assert answer.embeddings is not None and members[0].embeddings is not None
    np.testing.assert_allclose(
        answer.embeddings,
        np.concatenate([m.embeddings for m in members if m.embeddings is not None], axis=1),
        atol=1e-4,
    )
    assert both.card.model_config["ensemble_members"] == 2
    assert main(["model", "inspect", str(out)]) == 0
    assert "gm_astroformer_tiny x 2 runs (mean probabilities), fp32" in capsys.readouterr().out
    # A member's evaluation.json is not the ensemble's: none is stored by default.
    assert both.card.metrics == {}
    # fp16 (a half-precision copy of the whole ensemble) passes the export's own check.
    half = tmp_path / "both_fp16.onnx"
    assert (
        main(["export", str(runs["s1"]), str(runs["s2"]), "--out", str(half), "--fp16", *plain])
        == 0
    )
    assert np.abs(engine(half).run(images).probabilities - mean).max() < 5e-3
    capsys.readouterr()


def test_ensemble_exports_with_calibration_and_ood_then_evaluates(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ensemble.onnx"
    command = ["export", str(runs["s1"]), str(runs["s2"]), "--data", str(runs["test"])]
    assert main([*command, "--out", str(out), *FAST_EXPORT]) == 0
    printed = capsys.readouterr().out
    assert "images of test.h5" in printed and "OOD score threshold" in printed
    model = OnnxModel(out, providers=[CPU_PROVIDER], intra_op_threads=1)
    assert model.has_ood and model.card.class_names == FOUR_CLASSES
    assert model.card.calibration["num_images"] == 32
    # The OOD class statistics: the first run's 64 training rows.
    assert model.card.ood["fit"]["num_images"] == 64
    report_dir = tmp_path / "eval"
    evaluate = ["evaluate", str(out), "--data", str(runs["test"]), "--tta", "--out"]
    assert main([*evaluate, str(report_dir), "--threads", "1", "--no-progress"]) == 0
    report = json.loads((report_dir / "evaluation.json").read_text())
    assert 0.0 <= report["top1"] <= 1.0 and report["num_images"] == 32
    # Served as any model: a PNG cutout through /classify answers the file's probabilities.
    image = Galaxy10File(runs["test"]).images(np.arange(1))[0]
    png = tmp_path / "galaxy.png"
    Image.fromarray(image).save(png)
    with serve(out, tmp_path) as server:
        answer = httpx.post(f"{server.url}/classify", files={"file": png.read_bytes()}, timeout=60)
    assert answer.status_code == 200, answer.text
    expected = model.run(resize_images(image[None], 32)).probabilities[0]
    served = answer.json()["probabilities"]
    assert np.allclose([served[name] for name in FOUR_CLASSES], expected, atol=1e-4)


@pytest.mark.parametrize(
    ("names", "extra", "words"),
    [
        (("s1", "other"), ("--out", "x.onnx"), "training data"),
        (("s1", "s2"), (), "needs --out"),
    ],
)
def test_runs_that_cannot_form_an_ensemble_are_refused_in_one_line(
    runs: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    names: tuple[str, ...],
    extra: tuple[str, ...],
    words: str,
) -> None:
    extra = tuple(str(tmp_path / e) if e.endswith(".onnx") else e for e in extra)
    assert main(["export", *(str(runs[n]) for n in names), *extra, *FAST_EXPORT]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "galmorph export:" in line]
    assert len(lines) == 1 and words in lines[0], lines
    assert not list(tmp_path.glob("*.onnx"))


def test_an_ensemble_of_one_run_is_refused(runs: dict[str, Path]) -> None:
    with pytest.raises(CheckpointError, match="2 to 16 runs"):
        load_ensemble([runs["s1"]])
