"""Stochastic depth: drop a residual branch per sample while training (Huang et al. 2016)."""

from __future__ import annotations

import torch
from torch import nn


class DropPath(nn.Module):
    """Zero the whole branch for a random subset of samples, rescale the rest; identity in eval."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob}")
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        keep_prob = 1.0 - self.drop_prob
        mask_shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = x.new_empty(mask_shape).bernoulli_(keep_prob)
        return x * mask / keep_prob

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


def drop_path_or_identity(drop_prob: float) -> nn.Module:
    """A DropPath when it can drop anything, else an Identity (keeps exported graphs lean)."""
    return DropPath(drop_prob) if drop_prob > 0.0 else nn.Identity()
