"""SSL methods: one file each, a backbone + heads + a loss (+ an EMA teacher).

A method is any module with this shape (a Protocol, not a base class):
  backbone: nn.Module                 the encoder being trained (exported)
  projector: nn.Module                the projection head (exported)
  global_views, local_views: int      how many augmented views `training_step` takes
  needs_labels: bool                  True for supervised baselines (SupCon, SIMO2)
  training_step(views, labels, progress) -> scalar loss   progress in [0, 1]
  after_step(progress)                EMA / momentum updates after the optimizer step
Optional: before_optimizer_step(progress), called between backward and the optimizer step
  (DINO / iBOT drop the frozen last layer's gradients); an `optim` block in the yaml gives
  the paper's clip_grad / weight_decay_end, used where the stage leaves them null
Optional: teacher_backbone / teacher_projector (MoCo: key_*), the EMA copy, and
  evaluated_encoder = "teacher" when the paper evaluates that copy (DINO, iBOT; ema.saved_encoder)
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn


class Method(Protocol):
    backbone: nn.Module
    projector: nn.Module
    global_views: int
    local_views: int
    needs_labels: bool

    def training_step(self, views: list[torch.Tensor], labels: torch.Tensor, progress: float) -> torch.Tensor: ...

    def after_step(self, progress: float) -> None: ...
