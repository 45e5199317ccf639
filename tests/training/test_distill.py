"""Distillation: the loss against hand computations, the teacher's view of mixed images, and a
student trained from a PyTorch and an ONNX teacher that exports like any model."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from galmorph.training.config import ConfigError
from galmorph.training.distill import DistillSettings, distillation_loss
from galmorph.training.mixup import Mixup, MixupSettings
from galmorph.training.train import train
from tests.support.training_helpers import make_synthetic, tiny_config

torch.set_num_threads(1)

STUDENT = torch.tensor([[2.0, 0.0, -1.0]])
TEACHER = torch.tensor([[0.0, 3.0, 1.0]])  # disagrees with the student: argmax 1


def test_hard_distillation_is_cross_entropy_to_the_teachers_argmax() -> None:
    label_loss = torch.tensor(0.7)
    loss = distillation_loss(STUDENT, TEACHER, label_loss, DistillSettings(teacher="t", alpha=0.25))
    # CE(student, class 1) = log(e^2 + e^0 + e^-1) - 0
    ce = math.log(math.exp(2) + 1 + math.exp(-1))
    assert loss.item() == pytest.approx(0.75 * 0.7 + 0.25 * ce, rel=1e-6)


def test_soft_distillation_is_tau_squared_kl_at_temperature() -> None:
    tau = 2.0
    settings = DistillSettings(teacher="t", kind="soft", alpha=0.5, tau=tau)
    loss = distillation_loss(STUDENT, TEACHER, torch.tensor(0.0), settings)
    p = np.exp(TEACHER.numpy()[0] / tau)
    p /= p.sum()
    q = np.exp(STUDENT.numpy()[0] / tau)
    q /= q.sum()
    kl = float(np.sum(p * np.log(p / q)))
    assert loss.item() == pytest.approx(0.5 * tau * tau * kl, rel=1e-5)
    # The teacher agreeing with itself costs nothing.
    assert distillation_loss(TEACHER, TEACHER, torch.tensor(0.0), settings).item() == pytest.approx(
        0.0, abs=1e-6
    )


def test_alpha_zero_is_the_label_loss() -> None:
    label = F.cross_entropy(STUDENT, torch.tensor([0]))
    settings = DistillSettings(teacher="t", alpha=0.0)
    assert torch.equal(distillation_loss(STUDENT, TEACHER, label, settings), label)


@pytest.mark.parametrize(
    "settings", [MixupSettings(mixup_alpha=0.8), MixupSettings(mixup_alpha=0, cutmix_alpha=1.0)]
)
def test_teacher_images_are_mixed_like_the_students(settings: MixupSettings) -> None:
    mixup = Mixup(settings, num_classes=3)
    x = torch.rand(4, 3, 16, 16)
    labels = torch.tensor([0, 1, 2, 0])
    alone, targets = mixup(x, labels, np.random.default_rng(5))
    mixed, twin, pair_targets = mixup.mix_pair(x, x.clone(), labels, np.random.default_rng(5))
    assert twin is not None
    assert torch.equal(mixed, alone) and torch.equal(pair_targets, targets)
    assert torch.equal(twin, mixed)  # same images, same mix
    assert not torch.equal(mixed, x)
    # At twice the size, CutMix pastes the same box, scaled.
    big = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    _, big_mixed, _ = mixup.mix_pair(x, big, labels, np.random.default_rng(5))
    assert big_mixed is not None
    assert torch.allclose(big_mixed[:, :, ::2, ::2], mixed)


@pytest.mark.slow
def test_student_trains_from_a_pytorch_and_an_onnx_teacher_and_exports(tmp_path: Path) -> None:
    from galmorph.model.export import export_onnx

    data = make_synthetic(tmp_path / "synth.h5", n=120)
    plain = {"epochs": 1, "mixup": {"mixup_alpha": 0.0}}
    teacher = train(tiny_config(data, tmp_path / "teacher", img_size=64, **plain))
    teacher_onnx = export_onnx(teacher, tmp_path / "teacher.onnx", intra_op_threads=1)
    for name, source in (("from_run", teacher), ("from_onnx", teacher_onnx)):
        student = train(
            tiny_config(
                data,
                tmp_path / name,
                distill={"teacher": str(source), "kind": "soft", "tau": 2.0},
                **plain,
            )
        )
        config = (student / "config.json").read_text()
        assert str(source) in config
        # The student is an ordinary 32 px model: it exports like any other.
        exported = export_onnx(student, tmp_path / f"{name}.onnx", intra_op_threads=1)
        assert exported.stat().st_size > 0
    # The teacher changed the student's course (same seed, same batches without it).
    alone = train(tiny_config(data, tmp_path / "alone", **plain))
    taught = load_file(str(tmp_path / "from_run" / "model.safetensors"))
    untaught = load_file(str(alone / "model.safetensors"))
    assert max((taught[k] - untaught[k]).abs().max().item() for k in taught) > 1e-4
    with pytest.raises(ConfigError, match=r"distill\.teacher"):
        train(tiny_config(data, tmp_path / "bad", distill={"teacher": str(tmp_path)}, **plain))
