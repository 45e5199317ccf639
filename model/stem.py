"""Convolutional stem S0: 3x3 conv stride 2 -> BatchNorm -> GELU -> 3x3 conv (no bias, no norm).

The second conv is left un-normalised because every stage starts with its own pre-norm.
"""

from __future__ import annotations

import torch
from torch import nn

from galmorph.model.init import init_conv_efficientnet


class ConvStem(nn.Module):
    stride = 2

    def __init__(self, in_chs: int, width: int, *, norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, width, 3, stride=2, padding=1, bias=False)
        self.norm1 = nn.BatchNorm2d(width, eps=norm_eps)
        self.act1 = nn.GELU()
        self.conv2 = nn.Conv2d(width, width, 3, stride=1, padding=1, bias=False)
        self.out_chs = width
        self.apply(init_conv_efficientnet)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.act1(self.norm1(self.conv1(x))))
