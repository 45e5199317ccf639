"""DeiT-style distillation: a trained teacher supervises a smaller student.

The teacher is a galmorph run folder (any registered model, run by PyTorch) or an exported
`.onnx` file (run by onnxruntime, as the server runs it). It sees the same augmented and
mixed images as the student, at its own input size, and its answers join the label loss:

- hard (the default; DeiT's choice, Touvron et al. 2021, section 5.2: hard-label distillation
  beat soft for both convnet and transformer teachers):
  (1 - alpha) CE(student, labels) + alpha CE(student, argmax teacher)
- soft (Hinton et al. 2015): (1 - alpha) CE(student, labels)
  + alpha tau^2 KL(softmax(teacher / tau) || softmax(student / tau))

DeiT adds a distillation token and a second head to its ViT student; galmorph's students are
CNN-transformer hybrids that pool instead of using a class token, so the teacher term trains
the student's one classifier. The student's architecture is unchanged, so it exports, is
evaluated and served like any model, and costs nothing extra at inference.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

DISTILL_KINDS = ("hard", "soft")


@dataclass(frozen=True)
class DistillSettings:
    """The `distill` section of TrainConfig (`--teacher RUN`, `--set distill.kind=soft`)."""

    teacher: str | None = None  # a galmorph run folder or an exported .onnx; None: off
    kind: str = "hard"
    alpha: float = 0.5  # weight of the teacher's term (DeiT: 0.5)
    tau: float = 1.0  # soft distillation temperature (DeiT: 1.0)

    @property
    def enabled(self) -> bool:
        return self.teacher is not None


class Teacher:
    """Logits of a trained model for uint8 NHWC images at its input size, without gradients."""

    def __init__(
        self,
        source: str | Path,
        device: torch.device,
        *,
        amp: bool = True,
        threads: int | None = None,
    ) -> None:
        path = Path(source)
        self.source = str(path)
        self.device = device
        self._model: torch.nn.Module | None = None
        if path.is_file() and path.suffix.lower() == ".onnx":
            from galmorph.training.evaluate import OnnxPredictor

            self._onnx = OnnxPredictor(path, threads=threads)
            self.kind = "onnxruntime"
            self.class_names = self._onnx.class_names
            self.input_size = self._onnx.input_size
        elif path.is_dir():
            from galmorph.model.checkpoint import load_model
            from galmorph.model.preprocess import ImagePreprocess

            model, spec = load_model(path)
            self._model = model.to(device).eval()
            self._preprocess = ImagePreprocess.of(spec.input_spec).to(device)
            self._amp = amp and device.type == "cuda"
            self.kind = "pytorch"
            self.class_names = tuple(spec.class_names)
            self.input_size = spec.img_size
        else:
            raise ValueError(f"teacher {path}: expected a galmorph run folder or a .onnx file")

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC (at input_size) -> float logits on the training device."""
        if self._model is not None:
            autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self._amp else nullcontext()
            with autocast:
                return self._model(self._preprocess(images.to(self.device))).float()
        probabilities = self._onnx.predict(images.cpu().numpy())
        # log p equals the logits up to a per-row constant, which softmax and argmax ignore.
        log_p = np.log(np.maximum(probabilities, np.finfo(np.float32).tiny))
        return torch.from_numpy(log_p).to(self.device)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    label_loss: torch.Tensor,
    settings: DistillSettings,
) -> torch.Tensor:
    """(1 - alpha) x label loss + alpha x the teacher's term (hard or soft)."""
    student = student_logits.float()
    teacher = teacher_logits.float()
    if settings.kind == "hard":
        teacher_term = F.cross_entropy(student, teacher.argmax(dim=-1))
    else:
        tau = settings.tau
        teacher_term = (
            F.kl_div(
                F.log_softmax(student / tau, dim=-1),
                F.log_softmax(teacher / tau, dim=-1),
                reduction="batchmean",
                log_target=True,
            )
            * tau
            * tau
        )
    return (1 - settings.alpha) * label_loss + settings.alpha * teacher_term
