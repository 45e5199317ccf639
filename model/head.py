"""Classifier head of CoAtNet/Astroformer: global average pool -> LayerNorm -> Linear(hidden)
-> tanh -> dropout -> Linear(num_classes) (timm NormMlpClassifierHead)."""

from __future__ import annotations

import torch
from torch import nn


class NormMlpHead(nn.Module):
    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        hidden_size: int,
        drop_rate: float = 0.0,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_features, eps=norm_eps)
        self.pre_logits = nn.Linear(in_features, hidden_size)
        self.act = nn.Tanh()
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(hidden_size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.norm(x.mean((2, 3)))
        return self.fc(self.drop(self.act(self.pre_logits(pooled))))
