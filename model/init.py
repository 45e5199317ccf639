"""Weight initialisation schemes of timm's MaxxVit ('vit_eff'): EfficientNet-style for conv
blocks, ViT-style (Xavier uniform) for transformer blocks. Apply with `module.apply(fn)`.
"""

from __future__ import annotations

import math

from torch import nn


def init_conv_efficientnet(module: nn.Module) -> None:
    """He-normal on fan-out, per group (EfficientNet); zero bias."""
    if isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
        fan_out //= module.groups
        nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def init_transformer_vit(root: nn.Module) -> None:
    """Xavier-uniform weights; MLP biases get tiny noise (as timm/JAX ViT), others zero."""
    for name, module in root.named_modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                if "mlp" in name:
                    nn.init.normal_(module.bias, std=1e-6)
                else:
                    nn.init.zeros_(module.bias)
