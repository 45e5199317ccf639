"""Optimizer, learning-rate schedule and weight averages (EMA, SWA), following timm's
conventions."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, update_bn

# Parameters timm's models exempt from weight decay besides biases and norms (1-D tensors).
NO_DECAY_NAME_PARTS = ("relative_position_bias_table", "pos_embed", "cls_token")


def adamw(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    *,
    layer_decay: float = 1.0,
) -> torch.optim.AdamW:
    """AdamW without decay on biases, norm weights and position tables (timm's filter).

    With `layer_decay` < 1 each layer gets its own groups with `lr_scale` = decay^(depth from
    the head) (training/finetune.py `layer_ids`); the schedule multiplies its lr by it.
    """
    from galmorph.training.finetune import layer_ids

    declared: set[str] = set(getattr(model, "no_weight_decay", set)())
    ids, last = layer_ids(model) if layer_decay != 1.0 else ({}, 0)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = (
            param.ndim <= 1
            or name.endswith(".bias")
            or name in declared
            or any(part in name for part in NO_DECAY_NAME_PARTS)
        )
        layer = ids.get(name, last)
        group = groups.setdefault(
            (layer, exempt),
            {
                "params": [],
                "weight_decay": 0.0 if exempt else weight_decay,
                "lr_scale": layer_decay ** (last - layer),
            },
        )
        group["params"].append(param)
    # No-decay group first, as before layer decay existed (optimizer state order in checkpoints).
    ordered = sorted(groups.items(), key=lambda item: (item[0][0], not item[0][1]))
    return torch.optim.AdamW([group for _, group in ordered], lr=lr, betas=betas)


@dataclass(frozen=True)
class CosineSchedule:
    """Linear warmup from warmup_lr, then cosine from peak_lr to min_lr, per optimizer step.

    timm's cosine scheduler with warmup_prefix=False: the cosine is a function of the whole
    run's progress, warmup overrides its start. timm steps it once per epoch; we evaluate
    it at the fractional epoch of every step (same curve, without the staircase).

    With `hold_epochs` (SWA) the cosine ends `hold_epochs` early at `hold_lr` instead of
    min_lr, and the lr stays there to the end: the SWA paper's schedule.
    """

    peak_lr: float
    warmup_lr: float
    min_lr: float
    warmup_epochs: float
    epochs: int
    steps_per_epoch: int
    hold_epochs: int = 0
    hold_lr: float = 0.0

    def lr_at(self, step: int) -> float:
        epoch = step / self.steps_per_epoch
        if epoch < self.warmup_epochs:
            return self.warmup_lr + epoch * (self.peak_lr - self.warmup_lr) / self.warmup_epochs
        floor = self.hold_lr if self.hold_epochs else self.min_lr
        progress = min(epoch / (self.epochs - self.hold_epochs), 1.0)
        return floor + 0.5 * (self.peak_lr - floor) * (1 + math.cos(math.pi * progress))

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set every group's lr (times its layer-decay `lr_scale`); returns the base lr."""
        lr = self.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr


def published_weights(
    model: nn.Module, ema: ModelEma | None, swa: AveragedModel | None
) -> nn.Module:
    """The weights a run publishes: the EMA when enabled, the SWA mean once it holds an
    epoch (before that it is a copy of the initial weights), else the model itself."""
    if ema is not None:
        return ema.module
    if swa is not None and int(swa.n_averaged) > 0:
        return swa.module
    return model


@torch.no_grad()
def fold_into_average(
    average: AveragedModel, model: nn.Module, batches: Iterable[torch.Tensor]
) -> None:
    """Add `model`'s weights to the SWA mean, then recompute the mean's BatchNorm statistics
    over `batches`: averaged weights make activations that no averaged statistic describes."""
    average.update_parameters(model)
    update_bn(batches, average)


class ModelEma:
    """Exponential moving average of a model's weights and buffers (timm's ModelEmaV2).

    The decay warms up as (1 + step) / (10 + step) (timm's original ModelEma, TF's
    ExponentialMovingAverage with num_updates) until it reaches `decay`: without it, an
    average of a few hundred steps (a small data set) still holds the random initial weights
    (0.99^135 = 26 % of them after 15 epochs of 9 steps), and scores at chance.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for param in self.module.parameters():
            param.requires_grad_(False)

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Fold in the weights after optimizer step `step` (0-based)."""
        decay = self.decay_at(step)
        current = model.state_dict()
        for name, average in self.module.state_dict().items():
            value = current[name].detach()
            if average.is_floating_point():
                average.lerp_(value.to(average.dtype), 1.0 - decay)
            else:
                average.copy_(value)

    def state_dict(self) -> dict[str, Any]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state)
