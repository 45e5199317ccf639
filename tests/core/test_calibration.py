"""Temperature scaling: the fit itself, the export's rule, and a really trained model whose
exported probabilities are better calibrated on its validation split than before."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest

from galmorph.core.modelfile.calibration import ece, fit_temperature, nll, softmax
from galmorph.core.modelfile.contract import INPUT_NAME, LOGITS_NAME, OUTPUT_NAME, ModelCard
from galmorph.core.modelfile.engine import OnnxModel
from galmorph.model.export import fit_calibration
from tests.support.trained_model import TrainedExport
from tests.support.training_helpers import run_galmorph


def overconfident(n: int, temperature: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose labels are drawn from softmax(logits / temperature): the true T is known."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 4.0, (n, 10))
    cumulative = softmax(logits, temperature).cumsum(axis=1)
    labels = (rng.random((n, 1)) > cumulative).sum(axis=1)
    return logits, np.minimum(labels, 9)


@pytest.mark.parametrize("true_temperature", [0.5, 1.0, 2.5])
def test_fit_recovers_the_temperature_the_labels_were_drawn_with(true_temperature: float) -> None:
    logits, labels = overconfident(20_000, true_temperature)
    fitted = fit_temperature(logits, labels)
    assert fitted == pytest.approx(true_temperature, rel=0.05)
    # The NLL is smallest there: any other temperature nearby is worse.
    for other in (fitted * 0.9, fitted * 1.1):
        assert nll(logits, labels, fitted) < nll(logits, labels, other)


def test_temperature_scaling_lowers_the_ece_of_an_overconfident_model() -> None:
    logits, labels = overconfident(5_000, 2.5)
    record = fit_calibration(logits, labels)
    assert record["applied"] is True and record["temperature"] == pytest.approx(2.5, rel=0.1)
    assert record["ece_before"] > 0.1 and record["ece_after"] < record["ece_before"] / 3
    assert record["nll_after"] < record["nll_before"]


def test_a_temperature_that_would_raise_the_ece_is_not_applied() -> None:
    # Three images, all of class 0: the NLL-optimal temperature (about 12) flattens the
    # probabilities and the binned ECE rises from 0.41 to 0.58.
    logits = np.array([[2.2, -2.9, -0.6], [-0.9, 7.1, -2.8], [4.1, 0.4, 3.1]])
    labels = np.zeros(3, np.int64)
    record = fit_calibration(logits, labels)
    assert record["applied"] is False and record["temperature"] == 1.0
    assert record["fitted_temperature"] == pytest.approx(12.17, rel=0.01)
    assert "would raise the ECE from 0.4063 to 0.5753" in record["reason"]
    assert record["ece_after"] == record["ece_before"]


def test_no_calibrate_measures_but_keeps_temperature_one() -> None:
    logits, labels = overconfident(500, 2.0)
    record = fit_calibration(logits, labels, off_reason="switched off")
    assert record["applied"] is False and record["temperature"] == 1.0
    assert record["ece_before"] == record["ece_after"] == ece(softmax(logits), labels)


def test_bad_fit_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="need logits"):
        fit_temperature(np.zeros((3, 2)), np.zeros(4, np.int64))


@pytest.mark.slow
def test_exported_model_is_calibrated_on_its_validation_split(
    trained_export: TrainedExport,
) -> None:
    card = trained_export.report.card
    calibration = card.calibration
    assert calibration["applied"] is True and calibration["split"] == "val"
    assert calibration["temperature"] != pytest.approx(1.0, abs=0.05)
    assert calibration["ece_after"] <= calibration["ece_before"]
    # What the file now answers on those validation images is what the card says.
    model = OnnxModel(trained_export.model, providers=["CPUExecutionProvider"], intra_op_threads=1)
    fit = trained_export.fit
    assert calibration["num_images"] == len(fit.val_labels)
    probabilities = model.predict(fit.val_images)
    assert ece(probabilities, fit.val_labels) == pytest.approx(calibration["ece_after"], abs=1e-4)
    # The temperature lives in the graph: probabilities = softmax(raw logits / T).
    logits = model.session.run([LOGITS_NAME], {INPUT_NAME: fit.val_images})[0]
    np.testing.assert_allclose(
        probabilities, softmax(logits, calibration["temperature"]), atol=1e-5
    )
    assert ece(softmax(logits), fit.val_labels) == pytest.approx(
        calibration["ece_before"], abs=1e-4
    )
    assert card == model.card  # the metadata round-trips


@pytest.mark.slow
def test_export_cli_reads_the_runs_data_and_can_skip_calibration(
    trained_export: TrainedExport, tmp_path: Path
) -> None:
    out = tmp_path / "plain.onnx"
    result = run_galmorph(
        "export", trained_export.run, "--out", out, "--no-calibrate", "--threads", "1",
        "--data", trained_export.data, "--fit-count", "200", timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "not calibrated: calibration was switched off (--no-calibrate)" in result.stdout
    assert "OOD score threshold" in result.stdout
    proto = onnx.load(str(out))
    card = ModelCard.from_metadata({p.key: p.value for p in proto.metadata_props})
    assert card.calibration["temperature"] == 1.0 and not card.calibration["applied"]
    assert card.ood["fit"]["num_images"] == 200
    model = OnnxModel(out, providers=["CPUExecutionProvider"], intra_op_threads=1)
    images = trained_export.fit.val_images[:8]
    probabilities, logits = model.session.run([OUTPUT_NAME, LOGITS_NAME], {INPUT_NAME: images})
    np.testing.assert_allclose(probabilities, softmax(logits), atol=1e-6)
    inspect = run_galmorph("model", "inspect", out)
    assert re.search(r"calibration +none: calibration was switched off", inspect.stdout)
    assert re.search(r"probabilities +class probabilities \(trained on labels\)", inspect.stdout)
    assert json.loads(run_galmorph("model", "inspect", out, "--json").stdout)["ood"]
