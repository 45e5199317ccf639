"""Multi-head self-attention over a 2-D feature map with a learned relative position bias.

The bias is one scalar per head per relative offset (dy, dx), looked up from a
(2H-1)(2W-1) x heads table and added to the scaled q·k logits BEFORE the softmax (CoAtNet's
pre-normalisation relative attention). Attention is written out as matmul + softmax rather
than fused SDPA: it exports to ONNX at any opset, and the weights can be inspected.
"""

from __future__ import annotations

import torch
from torch import nn


def relative_position_index(height: int, width: int) -> torch.Tensor:
    """(H*W, H*W) index into the bias table: equal for all query/key pairs with the same offset."""
    coords = torch.stack(
        torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    ).flatten(1)
    offsets = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # (N, N, 2): dy, dx
    dy = offsets[..., 0] + (height - 1)
    dx = offsets[..., 1] + (width - 1)
    return dy * (2 * width - 1) + dx


class RelativePositionBias(nn.Module):
    """Learned bias table for a fixed H x W grid; the grid size fixes the model's input size."""

    def __init__(self, grid_size: tuple[int, int], num_heads: int) -> None:
        super().__init__()
        height, width = grid_size
        self.grid_size = grid_size
        self.num_tokens = height * width
        self.relative_position_index: torch.Tensor
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * height - 1) * (2 * width - 1), num_heads)
        )
        # Derived from the grid size, so not saved: checkpoints hold only the table.
        self.register_buffer(
            "relative_position_index",
            relative_position_index(height, width).flatten(),
            persistent=False,
        )
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self) -> torch.Tensor:
        """Bias of shape (1, heads, N, N)."""
        bias = self.relative_position_bias_table[self.relative_position_index]
        return bias.view(self.num_tokens, self.num_tokens, -1).permute(2, 0, 1).unsqueeze(0)


class RelPosAttention2d(nn.Module):
    """Attention on an NCHW map; qkv and output projections are 1x1 convs (timm Attention2d).

    The qkv channels are laid out head-first, (head, [q|k|v], head_dim), as in timm, so that
    timm weights load without reshuffling.
    """

    def __init__(
        self,
        dim: int,
        dim_out: int,
        *,
        grid_size: tuple[int, int],
        dim_head: int = 32,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim_out % dim_head:
            raise ValueError(f"attention width {dim_out} is not a multiple of head dim {dim_head}")
        self.num_heads = dim_out // dim_head
        self.dim_head = dim_head
        self.scale = dim_head**-0.5
        self.qkv = nn.Conv2d(dim, dim_out * 3, 1)
        self.rel_pos = RelativePositionBias(grid_size, self.num_heads)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Conv2d(dim_out, dim_out, 1)
        self.proj_drop = nn.Dropout(proj_drop)

    def attention_weights(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """softmax(q·k / sqrt(d) + bias) for q, k of shape (B, heads, head_dim, N)."""
        logits = (q * self.scale).transpose(-2, -1) @ k
        return (logits + self.rel_pos()).softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        if height * width != self.rel_pos.num_tokens:
            raise ValueError(
                f"attention built for a {self.rel_pos.grid_size} grid got {height}x{width}: "
                "the model's input size is fixed when it is built"
            )
        q, k, v = self.qkv(x).view(batch, self.num_heads, self.dim_head * 3, -1).chunk(3, dim=2)
        attn = self.attn_drop(self.attention_weights(q, k))
        out = (v @ attn.transpose(-2, -1)).reshape(batch, -1, height, width)
        return self.proj_drop(self.proj(out))
