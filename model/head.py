"""Classifier head of CoAtNet/Astroformer: global average pool -> LayerNorm -> Linear(hidden)
-> tanh -> dropout -> Linear(num_classes) (timm NormMlpClassifierHead)."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn


class PreLogitsModel(Protocol):
    """What every registered model offers besides forward: its pre-logit representation (the
    embeddings the export puts in the graph) and the layer that reads it (a Linear layer; for
    a seed ensemble, galmorph.model.ensemble, its members' heads), with
    forward(x) == classifier(forward_pre_logits(x)) in eval mode."""

    def forward_pre_logits(self, x: torch.Tensor) -> torch.Tensor: ...

    @property
    def classifier(self) -> nn.Module: ...


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

    def forward_pre_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The representation `fc` reads (dropout is the identity in eval mode): the model's
        embeddings."""
        return self.act(self.pre_logits(self.norm(x.mean((2, 3)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.forward_pre_logits(x)))
