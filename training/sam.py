"""Sharpness-aware minimisation: SAM (Foret et al. 2021) and ASAM (Kwon et al. 2021).

A SAM step is two gradient passes over the same batch. The first gives g = grad L(w); the
weights move uphill to w + e, with e = rho g / ||g|| (SAM) or, scale-invariant,
e = rho T^2 g / ||T g|| with T = |w| + eta on weights and 1 on biases (ASAM, as in the
authors' code); the second pass takes grad L(w + e); the weights go back to w and the
wrapped optimizer (AdamW) steps with that second gradient.

The trainer calls `perturb` once the first pass has been accumulated over every micro-batch
of the step and, under DDP, averaged over every rank (DDP all-reduces on the last
micro-batch's backward). So e comes from the gradient of the whole global batch, identical on
every rank, and a run with accumulation matches one with more processes, as without SAM.
This is the global-batch form of SAM, not the per-device "m-sharpness" variant.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

SAM_KINDS = ("none", "sam", "asam")
# Guards the division when every gradient is zero (a step with nothing to learn).
_NORM_EPS = 1e-12


class SharpnessAware:
    """The ascent step of SAM/ASAM over a model's trainable parameters."""

    def __init__(
        self,
        named_parameters: Iterable[tuple[str, nn.Parameter]],
        *,
        rho: float,
        adaptive: bool = False,
        eta: float = 0.01,
    ) -> None:
        if rho <= 0:
            raise ValueError(f"SAM rho must be positive, got {rho}")
        self.rho = rho
        self.adaptive = adaptive
        self.eta = eta
        self.params = [(name, p) for name, p in named_parameters if p.requires_grad]
        self._saved: list[tuple[nn.Parameter, torch.Tensor]] = []

    def _scale(self, name: str, param: nn.Parameter) -> torch.Tensor | None:
        """ASAM's T for this parameter (None: identity)."""
        if not self.adaptive or "weight" not in name.rsplit(".", 1)[-1]:
            return None
        return param.detach().abs().add(self.eta)

    @torch.no_grad()
    def perturb(self) -> None:
        """w <- w + e from the current gradients; `restore` undoes it."""
        if self._saved:
            raise RuntimeError("SAM perturb called twice without restore")
        with_grad = [(name, p) for name, p in self.params if p.grad is not None]
        scaled = []
        for name, param in with_grad:
            assert param.grad is not None
            scale = self._scale(name, param)
            scaled.append(param.grad * scale if scale is not None else param.grad)
        if not scaled:
            return
        norm = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g.float()) for g in scaled])
        )
        factor = self.rho / (norm + _NORM_EPS)
        for (name, param), grad in zip(with_grad, scaled, strict=True):
            scale = self._scale(name, param)
            offset = (grad * scale if scale is not None else grad) * factor.to(grad.dtype)
            # A copy, not the offset: w + e - e is not w in floating point.
            self._saved.append((param, param.detach().clone()))
            param.add_(offset)

    @torch.no_grad()
    def restore(self) -> None:
        """Back to w (the weights the optimizer then updates with the second gradient)."""
        for param, saved in self._saved:
            param.copy_(saved)
        self._saved = []


@contextmanager
def frozen_batchnorm_statistics(model: nn.Module) -> Iterator[None]:
    """BatchNorm normalises with batch statistics but keeps its running ones unchanged.

    SAM's second pass sees the same images at perturbed weights; its statistics would count
    the batch twice in the running averages that evaluation uses.
    """
    saved = []
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            saved.append((module, module.momentum))
            module.momentum = 0.0
    try:
        yield
    finally:
        for module, momentum in saved:
            module.momentum = momentum
