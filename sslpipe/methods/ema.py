"""Momentum (EMA) teachers, shared by BYOL, MoCo, DINO and iBOT."""

from __future__ import annotations

import copy

from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.utils.scheduler import cosine_schedule
from torch import nn


def frozen_copy(module: nn.Module) -> nn.Module:
    """A copy of `module` that gets no gradients (the teacher starts equal to the student)."""
    teacher = copy.deepcopy(module)
    deactivate_requires_grad(teacher)
    return teacher


def momentum_at(progress: float, start: float, end: float) -> float:
    """Cosine schedule from `start` to `end` over training (BYOL, section 3.2)."""
    return float(cosine_schedule(step=min(progress, 1.0) * 1000, max_steps=1000, start_value=start, end_value=end))


def ema_update(student: nn.Module, teacher: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter."""
    update_momentum(student, teacher, m=momentum)
