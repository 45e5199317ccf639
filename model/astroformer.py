"""Astroformer / CoAtNet: a conv stem, then stages of MBConv ('C') or transformer ('T') blocks.

Astroformer (Dagli 2023, arXiv 2304.05350) is timm's CoAtNet (MaxxVit) with the layout
C-C-C-T instead of C-C-T-T: three convolutional stages and one transformer stage, which the
paper found better for small datasets. Every stage halves the resolution in its first block,
so a 256 px input reaches the last stage at 8x8 = 64 tokens. The relative position tables are
sized for the input size the model is built with.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from galmorph.model.head import NormMlpHead
from galmorph.model.mbconv import MBConv, MBConvConfig
from galmorph.model.registry import ModelFactory, register_model
from galmorph.model.stem import ConvStem
from galmorph.model.transformer import TransformerBlock2d, TransformerConfig

ASTROFORMER_LAYOUT = ("C", "C", "C", "T")
COATNET_LAYOUT = ("C", "C", "T", "T")


@dataclass(frozen=True)
class AstroformerConfig:
    stem_width: int
    widths: tuple[int, ...]
    depths: tuple[int, ...]
    head_hidden: int
    layout: tuple[str, ...] = ASTROFORMER_LAYOUT
    mbconv: MBConvConfig = field(default_factory=MBConvConfig)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)

    def __post_init__(self) -> None:
        if not len(self.widths) == len(self.depths) == len(self.layout):
            raise ValueError("widths, depths and layout need one entry per stage")
        if any(kind not in ("C", "T") for kind in self.layout):
            raise ValueError(f"layout entries must be 'C' or 'T', got {self.layout}")

    @property
    def reduction(self) -> int:
        """Total downsampling factor: the stem and every stage halve the resolution."""
        return 2 ** (len(self.widths) + 1)


class Astroformer(nn.Module):
    def __init__(
        self,
        cfg: AstroformerConfig,
        *,
        num_classes: int = 10,
        img_size: int = 256,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if img_size % cfg.reduction:
            raise ValueError(f"img_size must be a multiple of {cfg.reduction}, got {img_size}")
        self.cfg = cfg
        self.img_size = img_size
        self.num_classes = num_classes
        self.stem = ConvStem(in_chans, cfg.stem_width, norm_eps=cfg.mbconv.norm_eps)
        # Stochastic depth grows linearly with block index over the whole network.
        num_blocks = sum(cfg.depths)
        rates = [drop_path_rate * i / max(num_blocks - 1, 1) for i in range(num_blocks)]
        feat = img_size // self.stem.stride
        in_chs = cfg.stem_width
        stages: list[nn.Module] = []
        for kind, width, depth in zip(cfg.layout, cfg.widths, cfg.depths, strict=True):
            feat //= 2
            blocks: list[nn.Module] = []
            for index in range(depth):
                stride = 2 if index == 0 else 1
                rate = rates.pop(0)
                if kind == "C":
                    blocks.append(
                        MBConv(in_chs, width, stride=stride, cfg=cfg.mbconv, drop_path=rate)
                    )
                else:
                    blocks.append(
                        TransformerBlock2d(
                            in_chs,
                            width,
                            grid_size=(feat, feat),
                            stride=stride,
                            cfg=cfg.transformer,
                            drop_path=rate,
                        )
                    )
                in_chs = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.head = NormMlpHead(
            in_chs,
            num_classes,
            hidden_size=cfg.head_hidden,
            drop_rate=drop_rate,
            norm_eps=cfg.transformer.norm_eps,
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))

    def forward_pre_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings (N, head_hidden): forward(x) == classifier(forward_pre_logits(x))."""
        return self.head.forward_pre_logits(self.forward_features(x))

    @property
    def classifier(self) -> nn.Linear:
        return self.head.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def _factory(cfg: AstroformerConfig) -> ModelFactory:
    def build(
        *, num_classes: int, img_size: int, drop_rate: float, drop_path_rate: float
    ) -> Astroformer:
        return Astroformer(
            cfg,
            num_classes=num_classes,
            img_size=img_size,
            drop_rate=drop_rate,
            drop_path_rate=drop_path_rate,
        )

    return build


_PAPER = "Astroformer paper (arXiv 2304.05350), timm coatnet config"
_GALMORPH = "galmorph CPU variant, not from the paper"

# name -> (configuration, default input size, where it comes from)
VARIANTS: dict[str, tuple[AstroformerConfig, int, str]] = {
    # The paper's variants: timm's coatnet_0..5 configurations with the C-C-C-T layout, as the
    # official code (Rishit-dagli/Astroformer, astroformer.py) builds them.
    "astroformer_0": (AstroformerConfig(64, (96, 192, 384, 768), (2, 3, 5, 2), 768), 256, _PAPER),
    "astroformer_1": (AstroformerConfig(64, (96, 192, 384, 768), (2, 6, 14, 2), 768), 256, _PAPER),
    "astroformer_2": (
        AstroformerConfig(128, (128, 256, 512, 1024), (2, 6, 14, 2), 1024),
        256,
        _PAPER,
    ),
    "astroformer_3": (
        AstroformerConfig(192, (192, 384, 768, 1536), (2, 6, 14, 2), 1536),
        256,
        _PAPER,
    ),
    "astroformer_4": (
        AstroformerConfig(192, (192, 384, 768, 1536), (2, 12, 28, 2), 1536),
        256,
        _PAPER,
    ),
    "astroformer_5": (
        AstroformerConfig(192, (256, 512, 1280, 2048), (2, 12, 28, 2), 2048),
        256,
        _PAPER,
    ),
    # CoAtNet-0 (Dai et al. 2021) as timm configures it: the baseline Astroformer modifies.
    "coatnet_0": (
        AstroformerConfig(64, (96, 192, 384, 768), (2, 3, 5, 2), 768, layout=COATNET_LAYOUT),
        256,
        "CoAtNet paper (arXiv 2106.04803), timm coatnet_0 config",
    ),
    # galmorph's own CPU variants, NOT from the paper: the same blocks, head dim 32 and the
    # C-C-C-T layout, narrow and shallow enough to train at 64-128 px on a couple of CPU cores.
    "gm_astroformer_tiny": (
        AstroformerConfig(32, (32, 64, 128, 256), (1, 2, 2, 1), 256),
        96,
        _GALMORPH,
    ),
    "gm_astroformer_small": (
        AstroformerConfig(48, (48, 96, 192, 384), (2, 2, 4, 2), 384),
        128,
        _GALMORPH,
    ),
}

for _name, (_cfg, _img_size, _source) in VARIANTS.items():
    register_model(_name, default_img_size=_img_size, layout="-".join(_cfg.layout), source=_source)(
        _factory(_cfg)
    )
