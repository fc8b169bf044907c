"""SimSiam: Chen and He, "Exploring Simple Siamese Representation Learning", CVPR 2021."""

from __future__ import annotations

import torch
from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules import SimSiamPredictionHead, SimSiamProjectionHead
from torch import nn


class SimSiam(nn.Module):
    """Backbone + 3-layer projector + bottleneck predictor; each view's prediction regresses
    the other view's projection under stop-gradient (no momentum encoder, no negatives).

    Shapes: views 2 x (B, C, H, W) -> projections / predictions 2 x (B, proj_output_dim).
    Defaults: projector 2048-d, predictor bottleneck 512 on ImageNet (paper, sec. 3); smaller
    in the yaml for small backbones.
    """

    global_views, local_views, needs_labels = 2, 0, False
    objective = "negative_cosine"

    def __init__(self, backbone: nn.Module, proj_hidden_dim: int = 2048, proj_output_dim: int = 2048,
                 pred_hidden_dim: int = 512, fix_pred_lr: bool = False):
        super().__init__()
        # fix_pred_lr: the predictor at a constant lr, not warmed up nor decayed: better in the
        # paper (sec. 4.2, Table 1c) and its repository's --fix-pred-lr, used for its ImageNet runs
        self.fixed_lr_modules = ("predictor",) if fix_pred_lr else ()
        self.backbone = backbone
        self.projector = SimSiamProjectionHead(backbone.num_features, proj_hidden_dim, proj_output_dim)
        self.predictor = SimSiamPredictionHead(proj_output_dim, pred_hidden_dim, proj_output_dim)
        self.criterion = NegativeCosineSimilarity()

    def training_step(self, views: list[torch.Tensor], labels: torch.Tensor, progress: float) -> torch.Tensor:
        z0, z1 = (self.projector(self.backbone(v)) for v in views)
        p0, p1 = self.predictor(z0), self.predictor(z1)
        return 0.5 * (self.criterion(p0, z1.detach()) + self.criterion(p1, z0.detach()))

    def after_step(self, progress: float) -> None:
        pass
