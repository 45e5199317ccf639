"""The `precision` setting: bf16 autocast where the device computes bf16 natively, else fp32.

`auto` picks bf16 on a CUDA device that supports it and on a CPU whose flags list
avx512_bf16 or amx_bf16 (oneDNN runs bf16 convolutions and matmuls on those units; on other
CPUs bf16 is emulated and slower than fp32), fp32 elsewhere. `bf16` and `fp32` force one.

Numerics follow PyTorch's autocast recipe for bf16: the weights, gradients, optimizer state,
checkpoints and exports stay fp32; only the forward's matmuls and convolutions run in bf16;
the loss is computed in fp32 from fp32 logits; no GradScaler (bf16 has fp32's exponent range).

channels_last on CUDA only: on a CPU it bought nothing measurable in bf16 or fp32
(benchmarks/results/train.json, `--explore`). Training on a CPU in bf16 keeps the strided
depthwise convolutions (MBConv's downsampling) in fp32: oneDNN's bf16 backward of those is ~3x
slower than its fp32 one, and autocasting them made the whole step ~30 % slower.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from galmorph.core.cpu import CPU_BF16_FLAGS, cpu_bf16_flags

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "bf16", "fp32")


@dataclass(frozen=True)
class Precision:
    """What a run or an evaluation computes in, on which device, and why."""

    name: str  # bf16 | fp32: the resolved setting a run records in its config.json
    device_type: str  # cpu | cuda
    reason: str  # e.g. "CPU has avx512_bf16"

    @property
    def bf16(self) -> bool:
        return self.name == "bf16"

    @property
    def channels_last(self) -> bool:
        return self.device_type == "cuda"

    def autocast(self) -> AbstractContextManager[Any]:
        if not self.bf16:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=torch.bfloat16)

    def fp32_strided_depthwise(self, *, training: bool) -> bool:
        """Whether strided depthwise convolutions stay fp32 (training on a CPU in bf16)."""
        return training and self.bf16 and self.device_type == "cpu"

    def prepare(self, model: nn.Module, *, training: bool) -> None:
        """Put the model's weights in this precision's memory format; for training on a CPU
        in bf16, keep its strided depthwise convolutions in fp32 (the module docstring)."""
        if self.channels_last:
            model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        if not self.fp32_strided_depthwise(training=training):
            return
        for module in model.modules():
            if type(module) is nn.Conv2d and module.groups > 1 and module.stride != (1, 1):
                # Same parameters and state_dict keys: checkpoints and exports are unchanged.
                module.__class__ = Fp32Conv2d

    def to_memory_format(self, x: torch.Tensor) -> torch.Tensor:
        """An NCHW batch in the memory format the model's weights are in."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def describe(self, *, training: bool = False) -> str:
        kind = "bf16 autocast" if self.bf16 else "fp32"
        if self.fp32_strided_depthwise(training=training):
            kind += " (strided depthwise convolutions in fp32)"
        layout = ", channels_last" if self.channels_last else ""
        return f"{kind}{layout} on {self.device_type}: {self.reason}"


class Fp32Conv2d(nn.Conv2d):
    """A convolution that computes in fp32 inside an autocast region."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        if not torch.is_autocast_enabled(device):
            return super().forward(x)
        with torch.autocast(device, enabled=False):
            y = super().forward(x.float())
        # In the autocast dtype, as an autocast convolution's output is: the layers after it
        # stay in bf16 (5 % faster than running them in fp32 too).
        return y.to(torch.get_autocast_dtype(device))


def resolve_precision(setting: str, device: torch.device) -> Precision:
    """`auto`, `bf16` or `fp32` on `device` -> what runs (ValueError for another setting)."""
    if setting not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {setting!r}")
    native, why = _native_bf16(device)
    if setting == "fp32":
        return Precision("fp32", device.type, "precision=fp32: no autocast")
    if setting == "bf16":
        if not native:
            logger.warning(
                "precision=bf16 on a device without native bf16 (%s): it is emulated", why
            )
        return Precision("bf16", device.type, f"precision=bf16: autocast ({why})")
    return Precision("bf16" if native else "fp32", device.type, f"precision=auto, {why}")


def _native_bf16(device: torch.device) -> tuple[bool, str]:
    """Whether `device` computes bf16 natively, and the fact that says so."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return True, f"{torch.cuda.get_device_name(device)} supports bf16"
        return False, f"{torch.cuda.get_device_name(device)} has no native bf16"
    flags = cpu_bf16_flags()
    if flags:
        return True, f"CPU has {', '.join(flags)}"
    return False, f"CPU has none of {', '.join(CPU_BF16_FLAGS)}"
