"""Stride-2 shortcut: 2x2 average pool, then a 1x1 conv when the width changes."""

from __future__ import annotations

import torch
from torch import nn


class PoolProject(nn.Module):
    """The shortcut of a stage's first block, and the pre-attention pool of a transformer block.

    Pooling before the projection (rather than a strided 1x1 conv) keeps every input pixel in
    the shortcut, as in CoAtNet and timm's Downsample2d.
    """

    def __init__(self, in_chs: int, out_chs: int, *, bias: bool = True) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)
        self.proj: nn.Module = (
            nn.Conv2d(in_chs, out_chs, 1, bias=bias) if in_chs != out_chs else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.pool(x))
