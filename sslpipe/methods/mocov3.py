"""MoCo v3: Chen, Xie and He, "An Empirical Study of Training Self-Supervised Vision
Transformers", ICCV 2021."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightly.models.modules import MoCoProjectionHead
from torch import nn

from sslpipe.distributed import all_gather_cat, rank
from sslpipe.methods.ema import ema_update, frozen_copy, momentum_at


def moco_v3_contrastive(query: torch.Tensor, key: torch.Tensor, temperature: float) -> torch.Tensor:
    """2T * CE(q k^T / T, own key): each query against the keys of the other view of the whole
    global batch, gathered from every rank (paper, Algorithm 1, `concat_all_gather`), so the
    negatives do not depend on the number of ranks. Written here because lightly's
    NTXentLoss uses SimCLR's 2B - 2 negatives, same-view ones included. query, key (B, D) -> scalar."""
    q, k = F.normalize(query, dim=1), all_gather_cat(F.normalize(key, dim=1))
    logits = q @ k.t() / temperature
    own = torch.arange(len(q), device=q.device) + rank() * len(q)  # this rank's block of the global batch
    return 2 * temperature * F.cross_entropy(logits, own)


class MoCoV3(nn.Module):
    """Backbone + 3-layer BN projector + 2-layer BN predictor; a momentum encoder (backbone +
    projector) gives the keys; symmetric contrastive loss with in-batch keys, no queue.

    Shapes: views 2 x (B, C, H, W) -> predictions, keys (B, proj_output_dim) -> scalar.
    Defaults: 4096-d hidden, 256-d output on ImageNet (paper); T 0.2 for ViT (1.0 for ResNet);
    momentum 0.99 -> 1 cosine (paper, sec. 4).
    """

    global_views, local_views, needs_labels = 2, 0, False
    objective = "info_nce_symmetric"

    def __init__(self, backbone: nn.Module, proj_hidden_dim: int = 4096, proj_output_dim: int = 256,
                 pred_hidden_dim: int = 4096, temperature: float = 0.2, momentum_start: float = 0.99,
                 momentum_end: float = 1.0):
        super().__init__()
        self.backbone = backbone
        self.projector = MoCoProjectionHead(backbone.num_features, proj_hidden_dim, proj_output_dim,
                                            num_layers=3, batch_norm=True)
        self.predictor = MoCoProjectionHead(proj_output_dim, pred_hidden_dim, proj_output_dim, num_layers=2,
                                            batch_norm=True)
        self.key_backbone = frozen_copy(self.backbone)
        self.key_projector = frozen_copy(self.projector)
        self.temperature = temperature
        self.momentum_start, self.momentum_end = momentum_start, momentum_end

    def training_step(self, views: list[torch.Tensor], labels: torch.Tensor, progress: float) -> torch.Tensor:
        x0, x1 = views
        q0 = self.predictor(self.projector(self.backbone(x0)))
        q1 = self.predictor(self.projector(self.backbone(x1)))
        with torch.no_grad():
            k0 = self.key_projector(self.key_backbone(x0))
            k1 = self.key_projector(self.key_backbone(x1))
        return moco_v3_contrastive(q0, k1, self.temperature) + moco_v3_contrastive(q1, k0, self.temperature)

    @torch.no_grad()
    def after_step(self, progress: float) -> None:
        m = momentum_at(progress, self.momentum_start, self.momentum_end)
        ema_update(self.backbone, self.key_backbone, m)
        ema_update(self.projector, self.key_projector, m)
