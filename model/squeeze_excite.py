"""Squeeze-and-excitation channel gating (Hu et al. 2018)."""

from __future__ import annotations

import torch
from torch import nn


class SqueezeExcite(nn.Module):
    """Global-average 'squeeze', a 2-layer bottleneck (SiLU), sigmoid gate per channel."""

    def __init__(self, channels: int, reduced_chs: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, reduced_chs, 1)
        self.act = nn.SiLU()
        self.fc2 = nn.Conv2d(reduced_chs, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * gate.sigmoid()
