"""Mixup / CutMix with label-smoothed soft targets (timm's batch mode) and the matching loss."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    targets = torch.full((labels.shape[0], num_classes), off, device=labels.device)
    return targets.scatter_(1, labels.unsqueeze(1), on)


@dataclass(frozen=True)
class MixupSettings:
    """The `mixup` section of TrainConfig (`--set mixup.mixup_alpha=0`); defaults: the paper.

    Label smoothing lives here because it shapes the same soft targets the mixing blends.
    """

    mixup_alpha: float = 0.8
    cutmix_alpha: float = 0.0
    prob: float = 1.0
    switch_prob: float = 0.5  # chance of CutMix when both are enabled
    label_smoothing: float = 0.1

    @property
    def enabled(self) -> bool:
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)


class Mixup:
    """Mixes each image with the batch reversed, one lambda per batch, as timm's Mixup does."""

    def __init__(self, settings: MixupSettings, num_classes: int) -> None:
        self.settings = settings
        self.num_classes = num_classes

    def __call__(
        self, x: torch.Tensor, labels: torch.Tensor, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixed images and soft targets; `rng` draws lambda (and the CutMix box)."""
        x, _, targets = self.mix_pair(x, None, labels, rng)
        return x, targets

    def mix_pair(
        self,
        x: torch.Tensor,
        companion: torch.Tensor | None,
        labels: torch.Tensor,
        rng: np.random.Generator,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """As __call__, and `companion` (the same images, e.g. at a teacher's size) mixed alike.

        `labels`: class ids (N,), made label-smoothed one-hot targets; or float targets (N, C),
        mixed as they are (vote counts beside the one-hot labels, any C).
        """
        s = self.settings
        targets = (
            labels.float()
            if labels.ndim == 2
            else smooth_one_hot(labels, self.num_classes, s.label_smoothing)
        )
        if not s.enabled or rng.random() >= s.prob:
            return x, companion, targets
        use_cutmix = s.cutmix_alpha > 0 and (s.mixup_alpha == 0 or rng.random() < s.switch_prob)
        alpha = s.cutmix_alpha if use_cutmix else s.mixup_alpha
        lam = float(rng.beta(alpha, alpha))
        if use_cutmix:
            box, lam = _cutmix_box(x.shape[-2], x.shape[-1], lam, rng)
            x = _paste(x, box)
            companion = None if companion is None else _paste(companion, box)
        else:
            x = x * lam + x.flip(0) * (1 - lam)
            if companion is not None:
                companion = companion * lam + companion.flip(0) * (1 - lam)
        return x, companion, targets * lam + targets.flip(0) * (1 - lam)


Box = tuple[float, float, float, float]  # y0, y1, x0, x1 as fractions of the height/width


def _cutmix_box(h: int, w: int, lam: float, rng: np.random.Generator) -> tuple[Box, float]:
    """A box of area ~(1 - lam) (timm's draw); lam corrected for clipping at the border."""
    cut = np.sqrt(1 - lam)
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
    y0, y1 = np.clip([cy - ch // 2, cy + ch // 2], 0, h)
    x0, x1 = np.clip([cx - cw // 2, cx + cw // 2], 0, w)
    area = float((y1 - y0) * (x1 - x0)) / (h * w)
    return (y0 / h, y1 / h, x0 / w, x1 / w), 1 - area


def _paste(x: torch.Tensor, box: Box) -> torch.Tensor:
    """Paste `box` of the reversed batch into each image (the box scaled to x's size)."""
    h, w = x.shape[-2:]
    y0, y1 = round(box[0] * h), round(box[1] * h)
    x0, x1 = round(box[2] * w), round(box[3] * w)
    x = x.clone()
    x[:, :, y0:y1, x0:x1] = x.flip(0)[:, :, y0:y1, x0:x1]
    return x


def soft_target_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, class_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over the batch of -sum_c w_c t_c log p_c (w = 1 without class weights)."""
    log_probs = F.log_softmax(logits.float(), dim=-1)
    if class_weights is not None:
        log_probs = log_probs * class_weights
    return -(targets * log_probs).sum(-1).mean()
