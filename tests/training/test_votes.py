"""Vote-count targets: the Dirichlet-multinomial loss, the reader, synthetic votes, a tiny run."""

from __future__ import annotations

import itertools
import json
import logging
import math
from pathlib import Path

import h5py
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from galmorph.cli import main
from galmorph.core.cutouts.resample import resize_images
from galmorph.core.data.galaxy10 import Galaxy10Error, Galaxy10File
from galmorph.core.modelfile.contract import INPUT_NAME, LOGITS_NAME, OUTPUT_NAME, ModelCard
from galmorph.model.export import export_model
from galmorph.training.config import ConfigError, TrainConfig, load_config
from galmorph.training.evaluate import EvaluationRequest, evaluate
from galmorph.training.metrics import vote_fraction_error
from galmorph.training.mixup import Mixup, MixupSettings
from galmorph.training.synth import VOTE_AGREEMENT, synthesize, vote_counts
from galmorph.training.train import train
from galmorph.training.votes import concentrations, dirichlet_multinomial_nll
from tests.support.training_helpers import make_synthetic, tiny_config

torch.set_num_threads(1)


# ------------------------------------------------------------------------------ the loss
def _rising(a: float, steps: int) -> float:
    """a (a + 1) ... (a + steps - 1): Gamma(a + steps) / Gamma(a) without lgamma."""
    return math.prod(a + i for i in range(steps))


def _dm_probability(alpha: list[float], counts: list[int]) -> float:
    """The Dirichlet-multinomial pmf from its closed form with rising factorials."""
    n = sum(counts)
    coefficient = math.factorial(n) / math.prod(math.factorial(x) for x in counts)
    rising = math.prod(_rising(a, x) for a, x in zip(alpha, counts, strict=True))
    return coefficient * rising / _rising(sum(alpha), n)


def _nll(logits: list[float], counts: list[float]) -> float:
    return float(dirichlet_multinomial_nll(torch.tensor([logits]), torch.tensor([counts])))


def test_loss_matches_hand_computed_values() -> None:
    # alpha = (1, 1): the beta-binomial is uniform over the n + 1 splits of n votes.
    assert _nll([0.0, 0.0], [3, 2]) == pytest.approx(math.log(6), rel=1e-6)
    # alpha = (1, 1, 1): uniform over the C(n + 2, 2) = 6 ways of casting 2 votes in 3 classes.
    assert _nll([0.0, 0.0, 0.0], [2, 0, 0]) == pytest.approx(math.log(6), rel=1e-6)
    alpha, counts = [0.5, 2.0, 3.0], [1, 4, 2]
    expected = -math.log(_dm_probability(alpha, counts))
    logits = [math.log(a) for a in alpha]
    assert _nll(logits, counts) == pytest.approx(expected, rel=1e-6)
    # The batch loss is the mean of the rows; weights scale each row's term.
    batch_logits = torch.tensor([logits, [0.0, 0.0, 0.0]])
    batch_counts = torch.tensor([counts, [2.0, 0.0, 0.0]])
    mean = (expected + math.log(6)) / 2
    assert float(dirichlet_multinomial_nll(batch_logits, batch_counts)) == pytest.approx(mean)
    weighted = dirichlet_multinomial_nll(batch_logits, batch_counts, torch.tensor([2.0, 0.0]))
    assert float(weighted) == pytest.approx(expected)


def test_probabilities_of_every_vote_outcome_sum_to_one() -> None:
    logits = torch.tensor([0.7, -1.2, 2.1])
    outcomes = [c for c in itertools.product(range(6), repeat=3) if sum(c) == 5]
    counts = torch.tensor(outcomes, dtype=torch.float32)
    per_outcome = torch.stack(
        [dirichlet_multinomial_nll(logits[None], row[None]) for row in counts]
    )
    assert float(torch.exp(-per_outcome).sum()) == pytest.approx(1.0, abs=1e-5)


def test_dirichlet_mean_is_the_softmax() -> None:
    # Any logits inside the clamp (+-10), which bounds the concentrations.
    logits = torch.rand(16, 10, generator=torch.Generator().manual_seed(0)) * 20 - 10
    alpha = concentrations(logits)
    torch.testing.assert_close(alpha / alpha.sum(-1, keepdim=True), torch.softmax(logits, -1))


def test_gradient_moves_the_expected_fractions_to_the_observed_ones() -> None:
    counts = torch.tensor([[12.0, 6.0, 2.0]])
    logits = torch.zeros(1, 3, requires_grad=True)
    dirichlet_multinomial_nll(logits, counts).backward()
    assert logits.grad is not None
    # The most-voted class is pushed up, the least-voted down.
    assert logits.grad[0, 0] < 0 < logits.grad[0, 2]
    optimizer = torch.optim.Adam([logits], lr=0.05)
    for _ in range(400):
        optimizer.zero_grad()
        dirichlet_multinomial_nll(logits, counts).backward()
        optimizer.step()
    fractions = torch.softmax(logits.detach(), -1)[0]
    torch.testing.assert_close(fractions, torch.tensor([0.6, 0.3, 0.1]), atol=0.02, rtol=0)


def test_mixup_blends_counts_and_labels_by_one_lambda() -> None:
    labels = torch.tensor([0, 1, 2, 1])
    votes = torch.tensor([[9.0, 1, 0], [2, 20, 8], [0, 1, 4], [3, 3, 3]])
    both = torch.cat([torch.nn.functional.one_hot(labels, 3).float(), votes], 1)
    mixup = Mixup(MixupSettings(mixup_alpha=0.8, label_smoothing=0.1), num_classes=3)
    _, mixed = mixup(torch.zeros(4, 3, 8, 8), both, np.random.default_rng(1))
    lam = float(mixed[0, 0])  # row 0 (class 0) mixed with row 3 (class 1)
    assert 0 < lam < 1
    # Soft targets are mixed as given: no label smoothing, the same lambda for every column.
    torch.testing.assert_close(mixed, lam * both + (1 - lam) * both.flip(0))


def test_vote_fraction_error() -> None:
    votes = np.array([[3.0, 1.0], [0.0, 2.0]])
    probabilities = np.array([[0.75, 0.25], [0.5, 0.5]])
    assert vote_fraction_error(probabilities, votes) == pytest.approx(0.25)


# ------------------------------------------------------------------------------ the reader
NAMES = ["smooth", "spiral", "edge-on"]


def _write(path: Path, *, labels: bool = True, votes: object = None, names: bool = True) -> Path:
    with h5py.File(path, "w") as handle:
        handle["images"] = np.zeros((6, 8, 8, 3), np.uint8)
        if labels:
            handle["ans"] = np.arange(6) % 3
        if votes is not None:
            handle["votes"] = votes
        if names:
            handle.attrs["class_names"] = NAMES
    return path


VOTES = np.array([[5, 1, 0], [0, 2, 7], [1, 6, 1], [3, 3, 1], [0, 0, 2], [4, 1, 4]])


def test_votes_without_labels_label_each_row_by_its_most_voted_class(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="galmorph.core.data.galaxy10"):
        data = Galaxy10File(_write(tmp_path / "v.h5", labels=False, votes=VOTES))
    np.testing.assert_array_equal(data.labels, [0, 2, 1, 0, 2, 0])  # ties: the first
    assert data.votes is not None and data.votes.dtype == np.float64
    np.testing.assert_array_equal(data.votes, VOTES)
    assert "no 'ans'" in caplog.text and "most-voted class" in caplog.text
    # With both, the labels are used as they are.
    both = Galaxy10File(_write(tmp_path / "b.h5", votes=VOTES))
    np.testing.assert_array_equal(both.labels, np.arange(6) % 3)
    assert Galaxy10File(_write(tmp_path / "n.h5")).votes is None


def test_votes_are_part_of_the_fingerprint(tmp_path: Path) -> None:
    plain = Galaxy10File(_write(tmp_path / "p.h5")).fingerprint()
    assert "votes_sha256" not in plain
    first = Galaxy10File(_write(tmp_path / "a.h5", votes=VOTES)).fingerprint()
    changed = VOTES.copy()
    changed[0, 1] += 1
    second = Galaxy10File(_write(tmp_path / "b.h5", votes=changed)).fingerprint()
    assert first["digest"] != second["digest"] != plain["digest"]


@pytest.mark.parametrize(
    ("votes", "message"),
    [
        (VOTES[:, :2], r"'votes' has 2 columns but there are 3 classes \(attribute 'class_names'"),
        (VOTES[:5], r"'votes' must have shape \(N, K\) = \(6, 3\).*got \(5, 3\)"),
        (VOTES[:, 0], r"'votes' must have shape \(N, K\)"),
        (np.where(VOTES == 7, -1, VOTES), r"1 row\(s\) with negative counts \(first at row 1:"),
        (np.where(VOTES == 6, np.nan, VOTES), r"1 row\(s\) with NaN or infinite counts .*row 2"),
        (np.where(np.arange(6)[:, None] == 4, 0, VOTES), r"1 row\(s\) with no votes .*row 4"),
        (VOTES.astype("S3"), "must hold numeric vote counts"),
    ],
)
def test_bad_votes_are_refused_clearly(tmp_path: Path, votes: np.ndarray, message: str) -> None:
    with pytest.raises(Galaxy10Error, match=message):
        Galaxy10File(_write(tmp_path / "bad.h5", votes=votes))


def test_votes_of_a_file_naming_no_classes(tmp_path: Path) -> None:
    # Read (as a 3-class labels file is) so that scoring and export fits open it; training
    # refuses it until the classes are named.
    unnamed = Galaxy10File(_write(tmp_path / "u.h5", votes=VOTES, names=False))
    with pytest.raises(Galaxy10Error, match=r"no class names \(3 vote columns, so 3 classes"):
        unnamed.check_class_names()
    named = Galaxy10File(tmp_path / "u.h5", class_names=NAMES)
    named.check_class_names()
    assert named.votes is not None and named.votes.shape == (6, 3)
    wide = np.tile(VOTES, 4)  # 12 columns: more than Galaxy10's classes
    with pytest.raises(Galaxy10Error, match=r"12 columns but there are 10 classes.*--class-names"):
        Galaxy10File(_write(tmp_path / "w.h5", votes=wide, names=False))


def test_neither_labels_nor_votes_is_refused(tmp_path: Path) -> None:
    with pytest.raises(Galaxy10Error, match=r"missing dataset 'ans' \(labels\), and no 'votes'"):
        Galaxy10File(_write(tmp_path / "none.h5", labels=False))


# ------------------------------------------------------------------------------ config
def test_targets_key_is_validated() -> None:
    assert TrainConfig().targets == "labels"
    assert load_config(None, ["targets=votes"]).targets == "votes"
    base = {"data": "d.h5", "out": "o"}
    with pytest.raises(ConfigError, match=r"'targets' must be one of \('labels', 'votes'\)"):
        TrainConfig.from_dict({**base, "targets": "fractions"}).validate()
    with pytest.raises(ConfigError, match=r"'targets' votes cannot be combined with distill"):
        TrainConfig.from_dict(
            {**base, "targets": "votes", "distill": {"teacher": "runs/t"}}
        ).validate()


def test_votes_mode_on_a_file_without_votes_names_file_and_dataset(tmp_path: Path) -> None:
    data = make_synthetic(tmp_path / "plain.h5", n=10)
    config = tiny_config(data, tmp_path / "run", targets="votes")
    with pytest.raises(ConfigError, match=r"'targets' is 'votes' but .*plain\.h5 has no 'votes'"):
        train(config)


# ------------------------------------------------------------------------- synthetic votes
def test_synthetic_votes_centre_on_each_class() -> None:
    labels = np.arange(2000) % 10
    votes = vote_counts(labels, 40, seed=3)
    assert votes.shape == (2000, 10) and votes.dtype.kind == "i"
    assert (votes >= 0).all() and (votes.sum(1) == 40).all()
    np.testing.assert_array_equal(votes, vote_counts(labels, 40, seed=3))
    share = votes[np.arange(2000), labels] / 40
    assert share.mean() == pytest.approx(VOTE_AGREEMENT, abs=0.02)
    agree = (votes.argmax(1) == labels).mean()
    assert 0.9 < agree < 1.0  # mostly the class, sometimes not, as real votes


def test_synth_writes_votes_only_when_asked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plain = synthesize(tmp_path / "plain.h5", n=10, size=64, seed=2, progress=False)
    with h5py.File(plain, "r") as handle:
        assert "votes" not in handle and "volunteers" not in handle.attrs
    out = tmp_path / "v.h5"
    assert main(["data", "synth", "--out", str(out), "--n", "10", "--size", "64", "--seed",
                 "2", "--votes", "25", "--quiet"]) == 0  # fmt: skip
    data = Galaxy10File(out)
    assert data.votes is not None and data.votes.shape == (10, 10)
    assert (data.votes.sum(1) == 25).all()
    np.testing.assert_array_equal(data.labels, Galaxy10File(plain).labels)
    capsys.readouterr()
    sheet = tmp_path / "sheet.png"
    assert main(["data", "inspect", str(out), "--out", str(sheet), "--per-class", "1"]) == 0
    assert "votes:    (10, 10) counts, median 25 per image" in capsys.readouterr().out


# ------------------------------------------------------------------------------ a tiny run
def test_a_tiny_votes_run_trains_exports_and_predicts_vote_fractions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = synthesize(tmp_path / "zoo.h5", n=40, size=64, seed=1, votes=30, progress=False)
    config = tiny_config(
        data,
        tmp_path / "run",
        targets="votes",
        precision="fp32",  # validation and evaluate agree to 1e-7 only in fp32 (bf16: 1e-4)
        batch_size=8,
        split_fractions=[0.7, 0.3, 0.0],
        loss_weighting="balanced",  # class weights weight each galaxy's vote term
        sampling="balanced",
        mixup={"mixup_alpha": 0.8, "label_smoothing": 0.1},  # mixed counts; smoothing ignored
    )
    run_dir = train(config)
    assert (run_dir / "model.safetensors").is_file() and (run_dir / "train_state.json").is_file()
    assert json.loads((run_dir / "config.json").read_text())["targets"] == "votes"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert len(epochs) == 2
    last = epochs[-1]
    assert math.isfinite(last["train_loss"]) and last["train_loss"] > 0
    assert 0 <= last["val_vote_fraction_error"] < 0.2 and "val_top1" in last
    assert "val_loss" not in last  # the label NLL is not the vote loss

    report = evaluate(EvaluationRequest(model=run_dir, data=data, split="val", progress=False))
    assert report["vote_fraction_error"] == pytest.approx(last["val_vote_fraction_error"])

    onnx_path = export_model(run_dir, tmp_path / "zoo.onnx", ood_fpr=None).path
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    images = resize_images(Galaxy10File(data).images(range(8)), 32)
    probabilities, logits = session.run([OUTPUT_NAME, LOGITS_NAME], {INPUT_NAME: images})
    np.testing.assert_allclose(probabilities.sum(1), 1.0, atol=1e-5)
    # Uncalibrated (no fit images: temperature 1), the probabilities are the Dirichlet mean.
    alpha = concentrations(torch.from_numpy(logits)).numpy()
    np.testing.assert_allclose(probabilities, alpha / alpha.sum(1, keepdims=True), atol=1e-5)

    # With the run's own images for fitting, the export still keeps the vote fractions.
    calibrated_path = tmp_path / "zoo_fit.onnx"
    assert main(["export", str(run_dir), "--out", str(calibrated_path), "--no-ood"]) == 0
    proto = onnx.load(str(calibrated_path), load_external_data=False)
    card = ModelCard.from_metadata({p.key: p.value for p in proto.metadata_props})
    assert card.calibration["applied"] is False and card.calibration["temperature"] == 1.0
    assert "trained on vote counts (targets=votes)" in card.calibration["reason"]
    assert card.calibration["num_images"] > 0  # measured, not fitted
    assert card.targets == "votes"
    capsys.readouterr()
    assert main(["model", "inspect", str(calibrated_path)]) == 0
    assert "expected Galaxy Zoo vote fractions (trained on votes)" in capsys.readouterr().out


def test_a_card_refuses_unknown_targets() -> None:
    with pytest.raises(ValueError, match="targets 'fractions' is not one of labels, votes"):
        ModelCard("m", ("a", "b"), (8, 8), (0.5,) * 3, (0.5,) * 3, targets="fractions")
