"""BYOL: Grill et al., "Bootstrap Your Own Latent", NeurIPS 2020."""

from __future__ import annotations

import torch
from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
from torch import nn

from sslpipe.methods.ema import ema_update, frozen_copy, momentum_at


class BYOL(nn.Module):
    """An online network (backbone, projector, predictor) regresses the projection of an
    EMA target network on the other view; symmetric negative cosine loss, no negatives.

    Shapes: views 2 x (B, C, H, W) -> predictions / targets 2 x (B, proj_output_dim).
    The target momentum follows a cosine schedule momentum_start -> momentum_end.
    """

    global_views, local_views, needs_labels = 2, 0, False
    objective = "byol_cosine"

    def __init__(self, backbone: nn.Module, proj_hidden_dim: int = 1024, proj_output_dim: int = 256,
                 pred_hidden_dim: int = 1024, momentum_start: float = 0.99, momentum_end: float = 1.0):
        super().__init__()
        self.backbone = backbone
        self.projector = BYOLProjectionHead(backbone.num_features, proj_hidden_dim, proj_output_dim)
        self.predictor = BYOLPredictionHead(proj_output_dim, pred_hidden_dim, proj_output_dim)
        self.teacher_backbone = frozen_copy(self.backbone)
        self.teacher_projector = frozen_copy(self.projector)
        self.momentum_start, self.momentum_end = momentum_start, momentum_end
        self.criterion = NegativeCosineSimilarity()

    def training_step(self, views: list[torch.Tensor], labels: torch.Tensor, progress: float) -> torch.Tensor:
        x0, x1 = views
        p0 = self.predictor(self.projector(self.backbone(x0)))
        p1 = self.predictor(self.projector(self.backbone(x1)))
        with torch.no_grad():
            t0 = self.teacher_projector(self.teacher_backbone(x0))
            t1 = self.teacher_projector(self.teacher_backbone(x1))
        return 0.5 * (self.criterion(p0, t1) + self.criterion(p1, t0))

    @torch.no_grad()
    def after_step(self, progress: float) -> None:
        m = momentum_at(progress, self.momentum_start, self.momentum_end)
        ema_update(self.backbone, self.teacher_backbone, m)
        ema_update(self.projector, self.teacher_projector, m)
