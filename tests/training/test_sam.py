"""SAM and ASAM: one step against a hand computation, BatchNorm statistics, and the step under
gradient accumulation and DDP (the perturbation comes from the global batch's gradient)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from galmorph.training.sam import SharpnessAware, frozen_batchnorm_statistics
from galmorph.training.train import train
from tests.support.training_helpers import make_synthetic, tiny_config, torchrun_train

torch.set_num_threads(1)


class Quadratic(nn.Module):
    """L(w, b) = 0.5 (1 w0^2 + 4 w1^2) + 0.5 b^2: gradients a*w and b."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([1.0, 1.0]))
        self.bias = nn.Parameter(torch.tensor([2.0]))

    def loss(self) -> torch.Tensor:
        a = torch.tensor([1.0, 4.0])
        return 0.5 * (a * self.weight**2).sum() + 0.5 * (self.bias**2).sum()


def _sam_sgd_step(model: Quadratic, sam: SharpnessAware, lr: float) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    model.loss().backward()
    sam.perturb()
    optimizer.zero_grad()
    model.loss().backward()
    sam.restore()
    optimizer.step()


def test_sam_step_matches_the_hand_computation() -> None:
    model = Quadratic()
    rho, lr = 0.1, 0.5
    _sam_sgd_step(model, SharpnessAware(model.named_parameters(), rho=rho), lr)
    # g = (1, 4 | 2), |g| = sqrt(21); e = rho g / |g|; the step uses g(w + e) = (a (w + e) | b + e).
    norm = math.sqrt(1 + 16 + 4)
    e = [rho * 1 / norm, rho * 4 / norm, rho * 2 / norm]
    expected_w = [1 - lr * 1 * (1 + e[0]), 1 - lr * 4 * (1 + e[1])]
    expected_b = 2 - lr * (2 + e[2])
    assert model.weight.tolist() == pytest.approx(expected_w, abs=1e-6)
    assert model.bias.item() == pytest.approx(expected_b, abs=1e-6)


def test_asam_scales_weights_by_their_size_and_leaves_biases_alone() -> None:
    model = Quadratic()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([2.0, 0.5]))
    rho, eta, lr = 0.5, 0.01, 0.1
    _sam_sgd_step(
        model, SharpnessAware(model.named_parameters(), rho=rho, adaptive=True, eta=eta), lr
    )
    # Kwon et al.: e = rho T^2 g / |T g|, T = |w| + eta on weights, 1 on the bias.
    w, g = [2.0, 0.5], [2.0, 2.0]
    t = [abs(x) + eta for x in w]
    tg = [t[0] * g[0], t[1] * g[1], 2.0]
    norm = math.sqrt(sum(v * v for v in tg))
    e = [rho * t[0] * tg[0] / norm, rho * t[1] * tg[1] / norm, rho * tg[2] / norm]
    expected_w = [w[0] - lr * 1 * (w[0] + e[0]), w[1] - lr * 4 * (w[1] + e[1])]
    assert model.weight.tolist() == pytest.approx(expected_w, abs=1e-6)
    assert model.bias.item() == pytest.approx(2 - lr * (2 + e[2]), abs=1e-6)


def test_restore_returns_the_exact_weights_and_perturb_twice_is_refused() -> None:
    model = Quadratic()
    before = [p.detach().clone() for p in model.parameters()]
    sam = SharpnessAware(model.named_parameters(), rho=0.3)
    model.loss().backward()
    sam.perturb()
    assert not torch.equal(model.weight, before[0])
    with pytest.raises(RuntimeError, match="twice"):
        sam.perturb()
    sam.restore()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


def test_second_pass_leaves_batchnorm_running_statistics_alone() -> None:
    bn = nn.BatchNorm2d(3).train()
    bn(torch.randn(4, 3, 5, 5) + 3)
    mean = bn.running_mean.clone()
    with frozen_batchnorm_statistics(bn):
        out = bn(torch.randn(4, 3, 5, 5) - 7)
    assert torch.equal(bn.running_mean, mean)
    assert bn.momentum == 0.1
    assert out.mean().abs() < 1e-5  # still normalised with the batch's own statistics


@pytest.mark.slow
def test_sam_with_two_gloo_ranks_matches_one_process_accumulating(tmp_path: Path) -> None:
    """Per-rank perturbations (each rank's own gradient) would make the two runs diverge."""
    data = make_synthetic(tmp_path / "synth.h5", n=120)
    settings = {
        "epochs": 1,
        "batch_size": 8,
        "sam": "sam",
        "sam_rho": 0.5,
        "augment": {"policy": "galaxy"},
        "mixup": {"mixup_alpha": 0.0},
        "lr": 1e-3,
    }
    single = train(tiny_config(data, tmp_path / "single", grad_accum_steps=2, **settings))
    ddp_config = tiny_config(data, tmp_path / "ddp", **settings)
    result = torchrun_train(data, tmp_path / "ddp", ddp_config)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SAM with rho 0.5" in result.stderr
    single_params = load_file(str(single / "model.safetensors"))
    ddp_params = load_file(str(tmp_path / "ddp" / "model.safetensors"))
    trained = [k for k in single_params if not k.endswith(("running_mean", "running_var"))]
    trained = [k for k in trained if not k.endswith("num_batches_tracked")]
    worst = max((single_params[k] - ddp_params[k]).abs().max().item() for k in trained)
    assert worst < 1e-5, worst
    # ...and SAM changed the course: the same run without it ends elsewhere.
    plain = train(
        tiny_config(data, tmp_path / "plain", grad_accum_steps=2, **settings | {"sam": "none"})
    )
    plain_params = load_file(str(plain / "model.safetensors"))
    assert max((plain_params[k] - single_params[k]).abs().max().item() for k in trained) > 1e-4
