"""Momentum (EMA) teachers, shared by BYOL, MoCo, DINO and iBOT."""

from __future__ import annotations

import copy

from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.utils.scheduler import cosine_schedule
from torch import nn

from sslpipe.methods import capability


def frozen_copy(module: nn.Module) -> nn.Module:
    """A copy of `module` that gets no gradients (the teacher starts equal to the student)."""
    teacher = copy.deepcopy(module)
    deactivate_requires_grad(teacher)
    return teacher


ENCODERS = ("student", "teacher")


def saved_encoder(method: nn.Module, which: str | None) -> tuple[str, nn.Module, nn.Module]:
    """The (name, backbone, projection head) a pretrain run saves and its evaluations use:
    `student` (the trained backbone: BYOL's online and MoCo's query encoder, as their papers
    evaluate), `teacher` (the EMA copy: `teacher_*`, MoCo's `key_*`), or None for the
    method's own choice, its `evaluated_encoder` ("teacher" for DINO and iBOT, whose papers
    report the teacher: "we evaluate the teacher", DINO section 5.1 and main_dino.py's
    `teacher_without_ddp` checkpoint; iBOT the same)."""
    from sslpipe.validate import ConfigError

    which = which or capability(method, "evaluated_encoder")
    if which not in ENCODERS:
        raise ConfigError(f"stage.pretrain.encoder='{which}' is not one of: null (the method's), {', '.join(ENCODERS)}")
    if which == "student":
        return which, method.backbone, method.projector
    for backbone, head in (("teacher_backbone", "teacher_projector"), ("key_backbone", "key_projector")):
        if hasattr(method, backbone):
            return which, getattr(method, backbone), getattr(method, head)
    raise ConfigError(f"stage.pretrain.encoder=teacher but {type(method).__name__} has no momentum teacher; "
                      f"teachers: BYOL, DINO, iBOT, MoCo v1/v2/v3. Use stage.pretrain.encoder=student or null")


def momentum_at(progress: float, start: float, end: float) -> float:
    """Cosine schedule from `start` to `end` over training (BYOL, section 3.2)."""
    return float(cosine_schedule(step=min(progress, 1.0) * 1000, max_steps=1000, start_value=start, end_value=end))


def ema_update(student: nn.Module, teacher: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter."""
    update_momentum(student, teacher, m=momentum)
