"""Batched image augmentation with plain torch ops (no torchvision).

Runs on the collated batch, on the training device: uint8 NHWC in (the Galaxy10 and ONNX
layout), uint8 NHWC out at the model's input size. Quantising back to uint8 keeps training
inputs in exactly the form the exported model receives, so the one normalisation step
(model.preprocess) is shared by training, evaluation and export.

All geometry is one affine resampling per image (crop, flip, rotation, zoom and shift fused),
so the cost does not grow with the number of geometric options. Random parameters are drawn
on the CPU from a generator the caller passes in; the trainer seeds it from (seed, rank, step),
so a resumed run sees the same augmentations as an uninterrupted one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from galmorph.training.randaugment import rand_augment

# Beyond this ratio of source to output size, pre-shrink with antialiasing so bilinear
# resampling does not alias; 2x keeps detail for small random crops.
_MAX_RESAMPLE_RATIO = 2
# galaxy policy: "dihedral" draws one of the 8 flips/quarter turns (exact pixel moves);
# "any" draws any angle plus a flip, reflection padding filling the corners.
ROTATIONS = ("dihedral", "any")


@dataclass(frozen=True)
class AugmentSettings:
    """The `augment` section of TrainConfig (`--set augment.hflip=0.5`); defaults: the paper."""

    policy: str = "paper"  # paper: RRC + hflip + jitter | galaxy: dihedral + shift/zoom | none
    rrc_scale: tuple[float, float] = (0.08, 1.0)
    rrc_ratio: tuple[float, float] = (0.75, 4.0 / 3.0)
    hflip: float = 0.5
    color_jitter: float = 0.4
    shift_fraction: float = 0.0625  # galaxy policy: max translation as a fraction of size
    scale_range: tuple[float, float] = (0.9, 1.1)  # galaxy policy: zoom factor range
    rotation: str = "dihedral"  # galaxy policy: one of ROTATIONS
    randaugment_ops: int = 0  # RandAugment ops per image (0 disables)
    randaugment_magnitude: float = 9.0  # on timm's 0..10 scale


class BatchAugmenter:
    """Random training augmentation of a uint8 NHWC batch; deterministic given its seed."""

    def __init__(self, settings: AugmentSettings, out_size: int) -> None:
        self.settings = settings
        self.out_size = out_size

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = to_float_nchw(images)
        s = self.settings
        if s.policy == "none":
            x = resize(x, self.out_size)
        else:
            x = _shrink_for_resampling(x, self.out_size)
            make_theta = self._paper_theta if s.policy == "paper" else self._galaxy_theta
            theta = make_theta(x, generator)
            x = _warp(x, theta, self.out_size)
            if s.randaugment_ops > 0:
                x = rand_augment(x, s.randaugment_ops, s.randaugment_magnitude, generator)
            elif s.color_jitter > 0:
                # timm skips colour jitter when RandAugment is on; so do we.
                x = color_jitter(x, s.color_jitter, generator)
        return to_uint8_nhwc(x)

    def _paper_theta(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Random-resized crop (torchvision's sampling rule) plus horizontal flip."""
        n, _, h, w = x.shape
        s = self.settings
        attempts = 10
        area = _uniform(g, n * attempts, *s.rrc_scale).view(n, attempts) * (h * w)
        log_ratio = _uniform(g, n * attempts, math.log(s.rrc_ratio[0]), math.log(s.rrc_ratio[1]))
        ratio = torch.exp(log_ratio).view(n, attempts)
        crop_w = torch.sqrt(area * ratio).round()
        crop_h = torch.sqrt(area / ratio).round()
        ok = (crop_w <= w) & (crop_h <= h) & (crop_w > 0) & (crop_h > 0)
        first_ok = torch.where(ok.any(1), ok.double().argmax(1), -1)
        pick = first_ok.clamp(min=0).unsqueeze(1)
        cw = torch.where(first_ok >= 0, crop_w.gather(1, pick).squeeze(1), float(w))
        ch = torch.where(first_ok >= 0, crop_h.gather(1, pick).squeeze(1), float(h))
        # Offsets are whole pixels, as torchvision draws them.
        x0 = torch.floor(torch.rand(n, generator=g, dtype=torch.float64) * (w - cw + 1))
        y0 = torch.floor(torch.rand(n, generator=g, dtype=torch.float64) * (h - ch + 1))
        flip = _flips(g, n, s.hflip)
        theta = torch.zeros(n, 2, 3, dtype=torch.float64)
        theta[:, 0, 0] = cw / w * flip
        theta[:, 0, 2] = (2 * x0 + cw) / w - 1
        theta[:, 1, 1] = ch / h
        theta[:, 1, 2] = (2 * y0 + ch) / h - 1
        return theta

    def _galaxy_theta(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """A flip and a rotation (quarter turns, or any angle), a small zoom and a small shift.

        Galaxies have no preferred orientation, so every rotation and flip is label-safe.
        """
        n = x.shape[0]
        s = self.settings
        if s.rotation == "any":
            angle = _uniform(g, n, 0.0, 2 * math.pi)
            cos, sin = torch.cos(angle), torch.sin(angle)
        else:
            quarter_turns = torch.randint(0, 4, (n,), generator=g).double()
            angle = quarter_turns * (math.pi / 2)
            # Rounded so quarter turns move whole pixels, with no interpolation blur.
            cos, sin = torch.cos(angle).round(), torch.sin(angle).round()
        flip = _flips(g, n, 0.5)
        zoom = torch.exp(_uniform(g, n, math.log(s.scale_range[0]), math.log(s.scale_range[1])))
        shift = 2 * s.shift_fraction
        theta = torch.zeros(n, 2, 3, dtype=torch.float64)
        theta[:, 0, 0] = cos * flip / zoom
        theta[:, 0, 1] = -sin / zoom
        theta[:, 1, 0] = sin * flip / zoom
        theta[:, 1, 1] = cos / zoom
        theta[:, 0, 2] = _uniform(g, n, -shift, shift)
        theta[:, 1, 2] = _uniform(g, n, -shift, shift)
        return theta


def _uniform(g: torch.Generator, n: int, low: float, high: float) -> torch.Tensor:
    return torch.rand(n, generator=g, dtype=torch.float64) * (high - low) + low


def _flips(g: torch.Generator, n: int, p: float) -> torch.Tensor:
    """-1 (flip) with probability p, else +1."""
    return torch.where(torch.rand(n, generator=g) < p, -1.0, 1.0).double()


def color_jitter(x: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Brightness, contrast and saturation factors in [1-s, 1+s], in a random order (no hue)."""
    n = x.shape[0]

    def factors() -> torch.Tensor:
        f = torch.rand(n, generator=generator) * (2 * strength) + (1 - strength)
        return f.to(x.device, x.dtype).view(n, 1, 1, 1)

    for op in torch.randperm(3, generator=generator).tolist():
        f = factors()
        if op == 0:
            x = x * f
        elif op == 1:
            mean = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
            x = (x - mean) * f + mean
        else:
            gray = grayscale(x)
            x = (x - gray) * f + gray
        x = x.clamp(0, 1)
    return x


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma, as PIL and torchvision use; keeps a channel axis of 1."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return 0.299 * r + 0.587 * g + 0.114 * b


def to_float_nchw(images: torch.Tensor) -> torch.Tensor:
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images [N, H, W, 3], got {images.dtype} {images.shape}")
    return images.permute(0, 3, 1, 2).float().div_(255)


def to_uint8_nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.mul(255).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Antialiased bilinear resize of a float NCHW batch to size x size."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def resize_batch(images: torch.Tensor, size: int) -> torch.Tensor:
    """A uint8 NHWC batch at size x size (antialiased bilinear); itself when already so."""
    if images.shape[1:3] == (size, size):
        return images
    return to_uint8_nhwc(resize(to_float_nchw(images), size))


def dihedral_views(images: np.ndarray) -> list[np.ndarray]:
    """The 8 flips/90-degree rotations of a uint8 NHWC batch (test-time augmentation)."""
    views = []
    for flipped in (images, images[:, :, ::-1]):
        for k in range(4):
            views.append(np.ascontiguousarray(np.rot90(flipped, k, axes=(1, 2))))
    return views


def rotated_views(images: np.ndarray, angles_deg: tuple[float, ...]) -> list[np.ndarray]:
    """Each angle's rotation of a uint8 NHWC batch, unflipped and flipped (test-time
    augmentation over more angles than the 8 dihedral views); reflection fills the corners.

    Multiples of 90 degrees are exact pixel moves, so angles (0, 90, 180, 270) give exactly
    the 8 views of `dihedral_views`, in another order.
    """
    views = []
    for flipped in (images, images[:, :, ::-1]):
        for angle in angles_deg:
            turns, rest = divmod(float(angle), 90.0)
            view = np.rot90(flipped, int(turns) % 4, axes=(1, 2))
            if rest:
                view = _rotate_uint8(np.ascontiguousarray(view), math.radians(rest))
            views.append(np.ascontiguousarray(view))
    return views


def _rotate_uint8(images: np.ndarray, angle: float) -> np.ndarray:
    x = to_float_nchw(torch.from_numpy(images))
    theta = torch.zeros(x.shape[0], 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = theta[:, 1, 1] = math.cos(angle)
    theta[:, 0, 1] = -math.sin(angle)
    theta[:, 1, 0] = math.sin(angle)
    return to_uint8_nhwc(_warp(x, theta, images.shape[1])).numpy()


def _shrink_for_resampling(x: torch.Tensor, out_size: int) -> torch.Tensor:
    limit = _MAX_RESAMPLE_RATIO * out_size
    return resize(x, limit) if max(x.shape[-2:]) > limit else x


def _warp(x: torch.Tensor, theta: torch.Tensor, out_size: int) -> torch.Tensor:
    theta = theta.to(device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta, [x.shape[0], x.shape[1], out_size, out_size], align_corners=False)
    # Reflection rather than zeros: galaxies sit on sky, and black borders would be a cue.
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
