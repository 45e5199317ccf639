"""Pre-norm MBConv block (inverted bottleneck) as configured in CoAtNet / timm MaxxVit.

pre-norm BN -> 1x1 expand -> BN+GELU -> depthwise kxk (stride here) -> BN+GELU -> SE -> 1x1
project, plus a shortcut that is pooled and projected when the block downsamples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from galmorph.model.downsample import PoolProject
from galmorph.model.droppath import drop_path_or_identity
from galmorph.model.init import init_conv_efficientnet
from galmorph.model.squeeze_excite import SqueezeExcite


@dataclass(frozen=True)
class MBConvConfig:
    expand_ratio: float = 4.0  # of the OUTPUT width (CoAtNet), not the input width
    kernel_size: int = 3
    se_ratio: float = 0.25  # SE bottleneck width relative to the OUTPUT width
    norm_eps: float = 1e-5


def make_divisible(value: float, divisor: int = 8, round_limit: float = 0.9) -> int:
    """Round channels to a multiple of `divisor` without dropping more than 10 % (timm rule)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < round_limit * value:
        rounded += divisor
    return rounded


class MBConv(nn.Module):
    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        *,
        stride: int = 1,
        cfg: MBConvConfig = MBConvConfig(),
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"MBConv stride must be 1 or 2, got {stride}")
        if stride == 1 and in_chs != out_chs:
            raise ValueError("a stride-1 MBConv keeps its width; widen in the stage's first block")
        mid_chs = make_divisible(out_chs * cfg.expand_ratio)
        self.shortcut: nn.Module = (
            PoolProject(in_chs, out_chs, bias=True) if stride == 2 else nn.Identity()
        )
        self.pre_norm = nn.BatchNorm2d(in_chs, eps=cfg.norm_eps)
        self.conv1_1x1 = nn.Conv2d(in_chs, mid_chs, 1, bias=False)
        self.norm1 = nn.BatchNorm2d(mid_chs, eps=cfg.norm_eps)
        self.act1 = nn.GELU()
        self.conv2_kxk = nn.Conv2d(
            mid_chs,
            mid_chs,
            cfg.kernel_size,
            stride=stride,
            padding=cfg.kernel_size // 2,
            groups=mid_chs,
            bias=False,
        )
        self.norm2 = nn.BatchNorm2d(mid_chs, eps=cfg.norm_eps)
        self.act2 = nn.GELU()
        self.se = SqueezeExcite(mid_chs, int(cfg.se_ratio * out_chs))
        self.conv3_1x1 = nn.Conv2d(mid_chs, out_chs, 1, bias=True)
        self.drop_path = drop_path_or_identity(drop_path)
        self.apply(init_conv_efficientnet)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.shortcut(x)
        x = self.act1(self.norm1(self.conv1_1x1(self.pre_norm(x))))
        x = self.se(self.act2(self.norm2(self.conv2_kxk(x))))
        return self.drop_path(self.conv3_1x1(x)) + shortcut
