"""Parameters and multiply-accumulates per model, measured by running the model on the meta
device (shapes only, no memory, no arithmetic) under torch's FlopCounterMode.

FlopCounterMode counts matrix products and convolutions (2 FLOPs per multiply-accumulate);
element-wise work (norms, activations, softmax) is not counted, as in fvcore and timm's tables.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from galmorph.model.registry import create_model, model_entry


@dataclass(frozen=True)
class ModelCost:
    name: str
    img_size: int
    params: int
    macs: int

    @property
    def params_m(self) -> float:
        return self.params / 1e6

    @property
    def gmacs(self) -> float:
        return self.macs / 1e9


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def measure_cost(name: str, *, img_size: int | None = None, num_classes: int = 10) -> ModelCost:
    """Params and MACs of one forward pass of one image (default: the model's own input size)."""
    size = img_size or model_entry(name).default_img_size
    with torch.device("meta"):
        model = create_model(name, num_classes=num_classes, img_size=size).eval()
        image = torch.empty(1, 3, size, size)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(image)
    return ModelCost(name, size, count_params(model), counter.get_total_flops() // 2)
