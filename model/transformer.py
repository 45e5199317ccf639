"""Pre-norm transformer block on an NCHW map (CoAtNet 'T' block, timm TransformerBlock2d).

x = shortcut(x) + DropPath(Attn(Pool(LN(x))));  x = x + DropPath(MLP(LN(x))).
When the block downsamples, BOTH paths are pooled (avg 2x2): the shortcut also gets a 1x1
projection to the new width, and the attention's qkv projection does the widening.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from galmorph.model.attention import RelPosAttention2d
from galmorph.model.downsample import PoolProject
from galmorph.model.droppath import drop_path_or_identity
from galmorph.model.init import init_transformer_vit
from galmorph.model.mlp import ConvMlp
from galmorph.model.norm import LayerNorm2d


@dataclass(frozen=True)
class TransformerConfig:
    dim_head: int = 32
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    attn_drop: float = 0.0
    proj_drop: float = 0.0


class TransformerBlock2d(nn.Module):
    def __init__(
        self,
        dim: int,
        dim_out: int,
        *,
        grid_size: tuple[int, int],
        stride: int = 1,
        cfg: TransformerConfig = TransformerConfig(),
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"transformer stride must be 1 or 2, got {stride}")
        if stride == 1 and dim != dim_out:
            raise ValueError("a stride-1 transformer block keeps its width")
        self.shortcut: nn.Module = PoolProject(dim, dim_out) if stride == 2 else nn.Identity()
        self.norm1 = LayerNorm2d(dim, eps=cfg.norm_eps)
        self.pool: nn.Module = nn.AvgPool2d(2, 2) if stride == 2 else nn.Identity()
        self.attn = RelPosAttention2d(
            dim,
            dim_out,
            grid_size=grid_size,
            dim_head=cfg.dim_head,
            attn_drop=cfg.attn_drop,
            proj_drop=cfg.proj_drop,
        )
        self.drop_path1 = drop_path_or_identity(drop_path)
        self.norm2 = LayerNorm2d(dim_out, eps=cfg.norm_eps)
        self.mlp = ConvMlp(dim_out, int(dim_out * cfg.mlp_ratio), drop=cfg.proj_drop)
        self.drop_path2 = drop_path_or_identity(drop_path)
        init_transformer_vit(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.shortcut(x) + self.drop_path1(self.attn(self.pool(self.norm1(x))))
        return x + self.drop_path2(self.mlp(self.norm2(x)))
