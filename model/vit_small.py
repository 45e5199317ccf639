"""ViT for small datasets: Shifted Patch Tokenization + Locality Self-Attention.

Lee, Lee & Song 2021, "Vision Transformer for Small-Size Datasets" (arXiv 2112.13492).
SPT: the image and four copies shifted by half a patch along the diagonals are concatenated
channel-wise before patchifying, so each token sees its neighbours' pixels. LSA: the
attention of a token to itself is masked out and the softmax temperature is learned, which
sharpens the attention that plain ViTs spread too evenly on small data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from galmorph.model.droppath import drop_path_or_identity
from galmorph.model.registry import register_model

_NUM_SHIFTS = 4  # the four diagonal directions


@dataclass(frozen=True)
class VitSmallConfig:
    patch_size: int = 16
    dim: int = 192
    depth: int = 9
    heads: int = 12
    dim_head: int = 16
    mlp_ratio: float = 2.0


class ShiftedPatchTokenizer(nn.Module):
    def __init__(self, in_chans: int, patch_size: int, dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.shift = patch_size // 2
        patch_dim = in_chans * (1 + _NUM_SHIFTS) * patch_size * patch_size
        self.norm = nn.LayerNorm(patch_dim)
        self.proj = nn.Linear(patch_dim, dim)

    def shifted(self, x: torch.Tensor) -> torch.Tensor:
        """x and its four diagonal half-patch shifts, zero-filled at the borders: (B, 5C, H, W)."""
        s = self.shift
        height, width = x.shape[-2:]
        padded = F.pad(x, (s, s, s, s))
        views = [x]
        for dy, dx in ((0, 0), (0, 2 * s), (2 * s, 0), (2 * s, 2 * s)):
            views.append(padded[..., dy : dy + height, dx : dx + width])
        return torch.cat(views, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        x = self.shifted(x)
        batch, chans, height, width = x.shape
        # (B, C, H, W) -> (B, tokens, p*p*C), pixel-major within a patch
        x = x.view(batch, chans, height // p, p, width // p, p)
        x = x.permute(0, 2, 4, 3, 5, 1).reshape(batch, (height // p) * (width // p), -1)
        return self.proj(self.norm(x))


class LocalitySelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, *, drop: float = 0.0) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.qkv = nn.Linear(dim, inner * 3, bias=False)
        # Learned log-temperature, started at the usual 1/sqrt(d).
        self.log_temperature = nn.Parameter(torch.tensor(dim_head**-0.5).log())
        self.proj = nn.Linear(inner, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        q, k, v = self.qkv(x).view(batch, tokens, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        logits = (q @ k.transpose(-2, -1)) * self.log_temperature.exp()
        self_mask = torch.eye(tokens, dtype=torch.bool, device=x.device)
        attn = logits.masked_fill(self_mask, float("-inf")).softmax(dim=-1)
        out = (self.drop(attn) @ v).transpose(1, 2).reshape(batch, tokens, -1)
        return self.drop(self.proj(out))


class EncoderBlock(nn.Module):
    def __init__(self, cfg: VitSmallConfig, *, drop: float, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.attn = LocalitySelfAttention(cfg.dim, cfg.heads, cfg.dim_head, drop=drop)
        self.norm2 = nn.LayerNorm(cfg.dim)
        hidden = int(cfg.dim * cfg.mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.dim, hidden),
            nn.GELU(),
            nn.Dropout(drop),
            nn.Linear(hidden, cfg.dim),
            nn.Dropout(drop),
        )
        self.drop_path = drop_path_or_identity(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class VitSmall(nn.Module):
    def __init__(
        self,
        cfg: VitSmallConfig,
        *,
        num_classes: int = 10,
        img_size: int = 256,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if img_size % cfg.patch_size:
            raise ValueError(f"img_size must be a multiple of {cfg.patch_size}, got {img_size}")
        self.img_size = img_size
        num_patches = (img_size // cfg.patch_size) ** 2
        self.tokenizer = ShiftedPatchTokenizer(in_chans, cfg.patch_size, cfg.dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, cfg.dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.pos_drop = nn.Dropout(drop_rate)
        rates = [drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.Sequential(
            *(EncoderBlock(cfg, drop=drop_rate, drop_path=rate) for rate in rates)
        )
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, num_classes)

    def forward_pre_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings (N, dim), the class token: forward(x) == classifier(this)."""
        tokens = self.tokenizer(x)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = self.pos_drop(torch.cat([cls, tokens], dim=1) + self.pos_embed)
        return self.norm(self.blocks(tokens))[:, 0]

    @property
    def classifier(self) -> nn.Linear:
        return self.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_pre_logits(x))


@register_model(
    default_img_size=256,
    layout="ViT",
    source="ViT for small datasets (arXiv 2112.13492), SPT + LSA",
)
def vit_small_spt_lsa(
    *, num_classes: int, img_size: int, drop_rate: float, drop_path_rate: float
) -> VitSmall:
    return VitSmall(
        VitSmallConfig(),
        num_classes=num_classes,
        img_size=img_size,
        drop_rate=drop_rate,
        drop_path_rate=drop_path_rate,
    )
