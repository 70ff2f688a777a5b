"""Knowledge distillation: the label cross entropy blended with a frozen teacher's predictions.

    loss = (1 - alpha) * CE(student, targets) + alpha * D(student, teacher)

soft (Hinton et al.): D = KL(softmax(t / T) || softmax(s / T)) * T^2, summed over classes and
averaged over the batch; the T^2 keeps the term's gradients at the scale of the cross entropy's
whatever the temperature. hard (DeiT, Touvron et al. 2021): D = CE(s, argmax t), the teacher's
top class as a label, without smoothing (as DeiT's code). CE is the training cross entropy of
loss_fn/cross_entropy.py: label smoothing, and Mixup/CutMix's soft targets, apply to it alone.

The teacher sees the very batch the student sees (after every augmentation, mixing included),
recomputed each batch: the augmentations are drawn anew every epoch, so no teacher output could
be cached exactly. In eval mode the loss is the plain cross entropy and the teacher is not run.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from loss_fn.cross_entropy import CrossEntropy
from loss_fn.registry import LOSSES
from options.schema import LossConfig


def soft_distillation(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """KL(softmax(teacher / T) || softmax(student / T)) * T^2, mean over the batch (in float32)."""
    t = temperature
    log_p_student = F.log_softmax(student.float() / t, dim=1)
    log_p_teacher = F.log_softmax(teacher.float() / t, dim=1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * (t * t)


def hard_distillation(student: Tensor, teacher: Tensor) -> Tensor:
    """Cross entropy of the student against the teacher's top class."""
    return F.cross_entropy(student, teacher.argmax(dim=1))


# loss.distillation.kind -> the teacher term D(student logits, teacher logits, temperature)
TERMS: Dict[str, Callable[[Tensor, Tensor, float], Tensor]] = {
    "soft": soft_distillation,
    "hard": lambda student, teacher, temperature: hard_distillation(student, teacher),
}


class Teacher(nn.Module):
    """A trained model that only ever predicts: eval mode for good (train() leaves it so), no
    gradients, and its own input. `resize` (teacher crop size / student crop size, None when
    they agree) scales the batch to the teacher's size: a batch at the student's base crop size
    becomes one at the teacher's, a variable-batch-sampler batch keeps its relative size. The
    pixels are re-normalised from the student's mean/std to the teacher's.

    student_norm / teacher_norm: (mean, std) per channel in [0, 1] pixel units, or None for
    plain [0, 1] pixels.
    """

    def __init__(self, model: nn.Module, resize: Optional[float] = None,
                 student_norm: Optional[Sequence[Sequence[float]]] = None,
                 teacher_norm: Optional[Sequence[Sequence[float]]] = None) -> None:
        super().__init__()
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.resize = None if resize == 1 else resize
        # student pixels x -> teacher pixels x * scale + shift: undo the student's normalisation,
        # apply the teacher's (both per-channel affine maps)
        s_mean, s_std = _norm(student_norm)
        t_mean, t_std = _norm(teacher_norm)
        self.renormalise = not (torch.equal(s_mean, t_mean) and torch.equal(s_std, t_std))
        self.register_buffer("scale", (s_std / t_std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", ((s_mean - t_mean) / t_std).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> "Teacher":
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """images [B, 3, h, w] as the student sees them -> teacher logits [B, C]."""
        if self.renormalise:
            images = images * self.scale + self.shift
        if self.resize is not None:
            h, w = images.shape[-2:]
            size = (max(1, round(h * self.resize)), max(1, round(w * self.resize)))
            fmt = torch.channels_last if images.is_contiguous(memory_format=torch.channels_last) \
                else torch.contiguous_format
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False,
                                   antialias=self.resize < 1).contiguous(memory_format=fmt)
        return self.model(images)

    def extra_repr(self) -> str:
        return f"resize={self.resize}, renormalise={self.renormalise}"


def _norm(norm: Optional[Sequence[Sequence[float]]]):
    if norm is None:
        return torch.zeros(3), torch.ones(3)
    mean, std = norm
    return torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)


@LOSSES.register("distillation")
class Distillation(nn.Module):
    """See the module docstring. Called as loss(student logits, targets, images)."""

    def __init__(self, teacher: nn.Module, kind: str = "soft", temperature: float = 1.0, alpha: float = 0.5,
                 label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.teacher, self.term = teacher, TERMS[kind]
        self.cross_entropy = CrossEntropy(label_smoothing)
        self.kind, self.temperature, self.alpha = kind, temperature, alpha

    @classmethod
    def from_config(cls, cfg: LossConfig, teacher: Optional[nn.Module] = None) -> "Distillation":
        if teacher is None:
            raise ValueError("loss.name distillation needs its teacher model (engine/teacher.py loads it from "
                             "loss.distillation.teacher)")
        d = cfg.distillation
        return cls(teacher, d.kind, d.temperature, d.alpha, cfg.label_smoothing)

    def forward(self, logits: Tensor, targets: Tensor, images: Optional[Tensor] = None) -> Tensor:
        ce = self.cross_entropy(logits, targets)
        if not self.training or self.alpha == 0:
            return ce
        if images is None:
            raise ValueError("the distillation loss needs the batch's images: call loss(logits, targets, images)")
        term = self.term(logits, self.teacher(images), self.temperature)
        return (1.0 - self.alpha) * ce + self.alpha * term

    def extra_repr(self) -> str:
        return f"kind={self.kind}, temperature={self.temperature}, alpha={self.alpha}"
