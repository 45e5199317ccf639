"""The model's input step: uint8 NHWC images -> normalised float NCHW.

The ONNX contract puts exactly this step inside the exported graph; training, validation and
evaluation call the same module, so the pixels a model learns from and the pixels it is
served agree by construction.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from galmorph.core.inputspec import InputSpec


class ImagePreprocess(nn.Module):
    """x/255, then (x - mean)/std per channel, with NHWC -> NCHW; mean/std on the 0..1 scale."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    @classmethod
    def of(cls, spec: InputSpec) -> ImagePreprocess:
        """The input step of a model fed as `spec`."""
        return cls(spec.mean, spec.std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).to(torch.float32) / 255.0
        return (x - self.mean) / self.std
