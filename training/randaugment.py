"""RandAugment (Cubuk et al. 2020) on a float NCHW batch in [0, 1], with torch ops only.

Follows timm's `rand-mM` policy: the same 15 operations, each of the `num_ops` rounds picks
one operation per image and applies it with probability 0.5 at a fixed magnitude on a 0..10
scale, with a random sign for signed operations. Images that chose the same operation are
processed together, so the cost is a handful of batched ops per round.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

_APPLY_PROB = 0.5
Op = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (images, signed level) -> images


def rand_augment(
    x: torch.Tensor, num_ops: int, magnitude: float, generator: torch.Generator
) -> torch.Tensor:
    n = x.shape[0]
    level = magnitude / 10.0
    x = x.clone()
    for _ in range(num_ops):
        choice = torch.randint(0, len(_OPS), (n,), generator=generator)
        apply = torch.rand(n, generator=generator) < _APPLY_PROB
        sign = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
        for op_index, op in enumerate(_OPS):
            rows = torch.nonzero(apply & (choice == op_index)).flatten()
            if rows.numel():
                signed = (sign[rows] * level).to(x.device, x.dtype)
                rows = rows.to(x.device)
                x[rows] = op(x[rows], signed).clamp(0, 1)
    return x


def _per_image(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


def _blend(a: torch.Tensor, b: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's ImageEnhance: factor 1 gives a, 0 gives b."""
    return b + (a - b) * _per_image(factor)


def _gray(x: torch.Tensor) -> torch.Tensor:
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def _affine(x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    grid = F.affine_grid(matrix, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _rotate(x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    angle = level * math.radians(30)
    cos, sin = torch.cos(angle), torch.sin(angle)
    zero = torch.zeros_like(angle)
    matrix = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    return _affine(x, matrix)


def _shear(axis: int) -> Op:
    def op(x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        matrix = torch.eye(2, 3, dtype=x.dtype, device=x.device).repeat(len(level), 1, 1)
        matrix[:, axis, 1 - axis] = level * 0.3
        return _affine(x, matrix)

    return op


def _translate(axis: int) -> Op:
    def op(x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        matrix = torch.eye(2, 3, dtype=x.dtype, device=x.device).repeat(len(level), 1, 1)
        matrix[:, axis, 2] = level * 0.45 * 2  # fraction of the size, in [-1, 1] units
        return _affine(x, matrix)

    return op


def _auto_contrast(x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    low = x.amin(dim=(2, 3), keepdim=True)
    high = x.amax(dim=(2, 3), keepdim=True)
    span = high - low
    return torch.where(span > 0, (x - low) / span.clamp(min=1e-6), x)


def _equalize(x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """Per-channel histogram equalisation via one batched bincount."""
    n, c, h, w = x.shape
    values = (x * 255).round().long().view(n * c, h * w)
    offsets = torch.arange(n * c, device=x.device).unsqueeze(1) * 256
    hist = torch.bincount((values + offsets).flatten(), minlength=n * c * 256).view(n * c, 256)
    cdf = hist.cumsum(1).float()
    cdf_min = cdf.masked_fill(hist == 0, float(h * w)).amin(1, keepdim=True)
    lut = ((cdf - cdf_min) / (h * w - cdf_min).clamp(min=1) * 255).clamp(0, 255)
    return (lut.gather(1, values) / 255).view(n, c, h, w).to(x.dtype)


def _invert(x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    return 1 - x


def _posterize(x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    bits = 8 - (level.abs() * 4).long()  # keep at least 4 bits
    step = _per_image(2.0 ** (8 - bits).to(x.dtype))
    return torch.floor(x * 255 / step) * step / 255


def _solarize(x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    threshold = _per_image(1 - level.abs())
    return torch.where(x >= threshold, 1 - x, x)


def _solarize_add(x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    added = (x + _per_image(level.abs() * 110 / 255)).clamp(max=1)
    return torch.where(x < 128 / 255, added, x)


def _enhance(reference: Callable[[torch.Tensor], torch.Tensor]) -> Op:
    def op(x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        return _blend(x, reference(x), 1 + level * 0.9)

    return op


def _smoothed(x: torch.Tensor) -> torch.Tensor:
    """PIL's SMOOTH kernel used by ImageEnhance.Sharpness; borders keep their pixels."""
    kernel = torch.ones(3, 3, dtype=x.dtype, device=x.device)
    kernel[1, 1] = 5
    kernel = (kernel / 13).expand(x.shape[1], 1, 3, 3)
    smooth = x.clone()
    smooth[:, :, 1:-1, 1:-1] = F.conv2d(x, kernel, groups=x.shape[1])
    return smooth


_OPS: tuple[Op, ...] = (
    _auto_contrast,
    _equalize,
    _invert,
    _rotate,
    _posterize,
    _solarize,
    _solarize_add,
    _enhance(lambda x: _gray(x).expand_as(x)),  # colour (saturation)
    _enhance(lambda x: _gray(x).mean(dim=(1, 2, 3), keepdim=True).expand_as(x)),  # contrast
    _enhance(torch.zeros_like),  # brightness
    _enhance(_smoothed),  # sharpness
    _shear(0),
    _shear(1),
    _translate(0),
    _translate(1),
)
