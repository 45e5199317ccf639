"""Stochastic weight averaging: the held lr, the mean of the last epochs' weights, BatchNorm
statistics recomputed for that mean, exact resume in the averaging phase."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.optim.swa_utils import AveragedModel

from galmorph.training.config import ConfigError
from galmorph.training.optim import CosineSchedule, fold_into_average, published_weights
from galmorph.training.state import load_checkpoint
from galmorph.training.train import TrainingInterrupted, train
from tests.support.training_helpers import make_synthetic, tiny_config

torch.set_num_threads(1)


def test_the_cosine_reaches_the_swa_lr_early_and_holds_it() -> None:
    schedule = CosineSchedule(
        1e-3, 1e-5, 0.0, warmup_epochs=1, epochs=10, steps_per_epoch=5, hold_epochs=3, hold_lr=1e-4
    )
    plain = CosineSchedule(1e-3, 1e-5, 0.0, warmup_epochs=1, epochs=10, steps_per_epoch=5)
    assert [schedule.lr_at(s) for s in range(5)] == [plain.lr_at(s) for s in range(5)]
    cosine = [schedule.lr_at(s) for s in range(5, 36)]
    assert all(a > b for a, b in itertools.pairwise(cosine))
    assert cosine[-1] == pytest.approx(1e-4)
    assert [schedule.lr_at(s) for s in range(35, 50)] == pytest.approx([1e-4] * 15)


def test_fold_averages_the_weights_and_recomputes_batchnorm_for_the_mean() -> None:
    torch.manual_seed(0)
    first = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4))
    second = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4))
    for model, value in ((first, 5.0), (second, -5.0)):  # statistics no mean of them explains
        model[1].running_mean.fill_(value)
    batches = [torch.randn(8, 3, 6, 6) + 1.0 for _ in range(3)]
    average = AveragedModel(first)
    fold_into_average(average, first, batches)
    fold_into_average(average, second, batches)

    mean_weight = (first[0].weight + second[0].weight) / 2
    assert torch.allclose(average.module[0].weight, mean_weight, atol=1e-7)
    activations = torch.cat([nn.functional.conv2d(b, mean_weight) for b in batches])
    expected_mean = activations.mean(dim=(0, 2, 3))
    assert torch.allclose(average.module[1].running_mean, expected_mean, atol=1e-5)
    assert int(average.n_averaged) == 2
    assert published_weights(first, None, average) is average.module
    assert published_weights(first, None, AveragedModel(first)) is first  # nothing folded yet


def test_swa_is_refused_with_ema_or_without_epochs_before_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"swa_epochs.*ema"):
        tiny_config(tmp_path / "x.h5", tmp_path, swa_epochs=1, ema=True).validate()
    with pytest.raises(ConfigError, match="swa_epochs"):
        tiny_config(tmp_path / "x.h5", tmp_path, epochs=3, swa_epochs=3).validate()
    with pytest.raises(ConfigError, match="swa_lr"):
        tiny_config(tmp_path / "x.h5", tmp_path, swa_epochs=1, swa_lr=0).validate()


@pytest.mark.slow
def test_a_run_publishes_the_mean_of_its_last_epochs_and_resumes_exactly(
    tmp_path: Path,
) -> None:
    # 160 training images / batch 16 = 10 steps per epoch; epochs 2 and 3 are averaged.
    data = make_synthetic(tmp_path / "synth.h5", n=200)
    swa = {"epochs": 3, "swa_epochs": 2, "augment": {"policy": "galaxy"}}
    straight = train(tiny_config(data, tmp_path / "straight", **swa))
    resumed_dir = tmp_path / "resumed"
    for stop in (20, 25):  # the end of epoch 2's steps, then inside epoch 3 (one epoch folded)
        with pytest.raises(TrainingInterrupted):
            train(tiny_config(data, resumed_dir, stop_after_step=stop, **swa), resume=stop > 20)
        if stop == 20:
            end_of_epoch_2 = load_checkpoint(resumed_dir)["model"]
    assert int(load_checkpoint(resumed_dir)["swa"]["n_averaged"]) == 1
    resumed = train(tiny_config(data, resumed_dir, **swa), resume=True)

    end_of_epoch_3 = load_checkpoint(straight)["model"]
    published = load_file(str(straight / "model.safetensors"))
    weights = [k for k in published if "running_" not in k and "num_batches" not in k]
    for key in weights:
        mean = (end_of_epoch_2[key] + end_of_epoch_3[key]) / 2
        assert torch.allclose(published[key], mean, atol=1e-6), key
    statistics = [k for k in published if k.endswith("running_mean")]
    assert statistics and any(
        not torch.allclose(published[k], (end_of_epoch_2[k] + end_of_epoch_3[k]) / 2)
        for k in statistics
    )  # recomputed for the mean, not averaged
    again = load_file(str(resumed / "model.safetensors"))
    assert all(torch.equal(published[k], again[k]) for k in published)

    card = json.loads((straight / "model.json").read_text())
    assert card["training_data"]["weights"] == "swa"
    lines = (straight / "metrics.jsonl").read_text().splitlines()
    epochs = [json.loads(line) for line in lines if '"kind": "epoch"' in line]
    assert [round(e["lr"], 8) for e in epochs[1:]] == [2e-4, 2e-4]  # a tenth of lr 2e-3
