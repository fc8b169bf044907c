"""DINO: Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021."""

from __future__ import annotations

import torch
from lightly.loss import DINOLoss
from lightly.models.modules import DINOProjectionHead
from torch import nn

from sslpipe.methods.ema import ema_update, frozen_copy, momentum_at


def dino_heads(*args, **kwargs) -> tuple[DINOProjectionHead, DINOProjectionHead]:
    """A student DINO head and a frozen teacher copy. Built twice and copied by state dict:
    the head's weight-normed last layer holds a non-leaf tensor that `copy.deepcopy` refuses."""
    student, teacher = DINOProjectionHead(*args, **kwargs), DINOProjectionHead(*args, **kwargs)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    return student, teacher


def teacher_temperature(progress: float, warmup_start: float, end: float, warmup_fraction: float) -> float:
    """Linear warm-up of the teacher temperature over the first `warmup_fraction` of training
    (DINO: 0.04 -> 0.07 over 30 of 100 epochs), then constant."""
    if warmup_fraction <= 0 or progress >= warmup_fraction:
        return end
    return warmup_start + (end - warmup_start) * progress / warmup_fraction


def cancel_last_layer(heads: list[DINOProjectionHead], progress: float, frozen_fraction: float) -> None:
    """While progress < frozen_fraction, drop the gradients of each head's last layer (grad
    None), so that the optimizer skips it, weight decay and momentum included: DINO freezes it
    for the first epoch ("we freeze the last layer during the first epoch",
    utils.cancel_gradients_last_layer in main_dino.py). Called by the loop between backward and
    the optimizer step (engine.Loop's before_optimizer_step)."""
    if progress < frozen_fraction:
        for head in heads:
            for param in head.last_layer.parameters():
                param.grad = None


class DINO(nn.Module):
    """Self-distillation: a student (backbone + DINO head) matches the centred, sharpened
    softmax of an EMA teacher across views. The teacher sees the 2 global views; the student
    sees them and `local_views` small crops (multi-crop). Loss, centring and its momentum are
    lightly's `DINOLoss`.

    Shapes: views 2 x (B, C, H, W) + local_views x (B, C, h, w) -> head outputs (B, output_dim).
    Defaults: output_dim 65536, student T 0.1, teacher T 0.04 -> 0.04..0.07, centre momentum 0.9,
    teacher momentum 0.996 -> 1 (paper, appendix); the yaml shrinks the head for small data.
    `batch_norm` puts BatchNorm in the head's hidden layers (the paper's ResNet-50 head); the
    head's last layer is frozen while training progress < `freeze_last_layer_fraction` (the
    paper: the first epoch).
    """

    global_views, needs_labels = 2, False
    evaluated_encoder = "teacher"  # the paper evaluates and releases the teacher (ema.saved_encoder)
    objective = "dino_self_distillation"

    def __init__(self, backbone: nn.Module, local_views: int = 2, proj_hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, output_dim: int = 65536, student_temperature: float = 0.1,
                 warmup_teacher_temperature: float = 0.04, teacher_temperature: float = 0.04,
                 warmup_teacher_fraction: float = 0.3, center_momentum: float = 0.9,
                 momentum_start: float = 0.996, momentum_end: float = 1.0, batch_norm: bool = False,
                 norm_last_layer: bool = True, freeze_last_layer_fraction: float = 0.0):
        super().__init__()
        self.local_views = local_views
        self.backbone = backbone
        self.projector, self.teacher_projector = dino_heads(backbone.num_features, proj_hidden_dim, bottleneck_dim,
                                                            output_dim, batch_norm=batch_norm,
                                                            norm_last_layer=norm_last_layer)
        self.freeze_last_layer_fraction = freeze_last_layer_fraction
        self.teacher_backbone = frozen_copy(self.backbone)
        self.criterion = DINOLoss(output_dim=output_dim, teacher_temp=teacher_temperature,
                                  student_temp=student_temperature, center_momentum=center_momentum)
        self.temperatures = (warmup_teacher_temperature, teacher_temperature, warmup_teacher_fraction)
        self.momentum_start, self.momentum_end = momentum_start, momentum_end

    def training_step(self, views: list[torch.Tensor], labels: torch.Tensor, progress: float) -> torch.Tensor:
        global_views = views[: self.global_views]
        with torch.no_grad():
            teacher_out = [self.teacher_projector(self.teacher_backbone(v)) for v in global_views]
        student_out = [self.projector(self.backbone(v)) for v in views]
        return self.criterion(teacher_out, student_out, teacher_temp=teacher_temperature(progress, *self.temperatures))

    def before_optimizer_step(self, progress: float) -> None:
        cancel_last_layer([self.projector], progress, self.freeze_last_layer_fraction)

    @torch.no_grad()
    def after_step(self, progress: float) -> None:
        m = momentum_at(progress, self.momentum_start, self.momentum_end)
        ema_update(self.backbone, self.teacher_backbone, m)
        ema_update(self.projector, self.teacher_projector, m)
