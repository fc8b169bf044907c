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
    """The members every method has; stage=pretrain, the loop and export use them. The
    optional ones are in OPTIONAL with the value a method without them gets (`capability`)."""

    backbone: nn.Module
    projector: nn.Module
    global_views: int
    local_views: int
    needs_labels: bool
    objective: str  # the loss's name, written to the export manifest

    def training_step(self, views: list[torch.Tensor], labels: torch.Tensor, progress: float) -> torch.Tensor: ...

    def after_step(self, progress: float) -> None: ...


# Optional members of a method, and what a method without one gets.
OPTIONAL = {
    "needs_vit": False,             # masked patch tokens need a timm ViT (iBOT, MAE)
    "needs_sample_ids": False,      # each image's index as its label (MoCo v1/v2: the queue's own keys)
    "class_balanced": False,        # batches of classes x samples_per_class images (SIMO2)
    "sync_bn": True,                # SyncBatchNorm over the global batch on GPUs (MoCo v1/v2: False, Shuffle-BN)
    "evaluated_encoder": "student",  # "teacher": the paper evaluates the EMA copy (DINO, iBOT)
    "fit_data": None,               # fit_data(num_images, batch_size) before training (MoCo caps its queue)
    "before_optimizer_step": None,  # (progress) between backward and the optimizer step (DINO, iBOT)
    "fixed_lr_modules": (),         # submodules trained at the base lr, no warm-up nor decay (SimSiam's predictor)
}


def capability(method, name: str):
    """`method`'s (or its class's) optional member `name`, or OPTIONAL's default for it."""
    if name not in OPTIONAL:
        raise KeyError(f"{name!r} is not an optional method member; they are: {', '.join(OPTIONAL)}")
    return getattr(method, name, OPTIONAL[name])
