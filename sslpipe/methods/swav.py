"""SwaV: Caron, Misra, Mairal, Goyal, Bojanowski and Joulin, "Unsupervised Learning of Visual
Features by Contrasting Cluster Assignments", NeurIPS 2020."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightly.loss import SwaVLoss
from lightly.models.modules import SwaVProjectionHead, SwaVPrototypes
from torch import nn

from sslpipe.distributed import world_size


class SwaV(nn.Module):
    """Swapped prediction: each global view's cluster assignment (Sinkhorn-Knopp over the
    batch, computed without gradient) is predicted from every other view's prototype scores,
    the local crops included (multi-crop). Projection head, prototypes and loss are lightly's
    (`SwaVProjectionHead`, `SwaVPrototypes`, `SwaVLoss`); under DDP the Sinkhorn step runs over
    the gathered global batch, as the paper's distributed implementation does. The prototypes
    are L2-normalised before each step and frozen (grad None, so the optimizer skips them)
    while progress < `freeze_prototypes_fraction` (the paper: the first epoch).

    Shapes: views 2 x (B, C, H, W) + local_views x (B, C, h, w) -> prototype scores
    (B, n_prototypes) per view -> scalar. Defaults: the paper's ImageNet head (2048-128, 3000
    prototypes, T 0.1, 3 Sinkhorn iterations, epsilon 0.05); no feature queue (the paper adds one
    for batches under 256 after 15 epochs)."""

    global_views, needs_labels = 2, False
    objective = "swav_swapped_prediction"

    def __init__(self, backbone: nn.Module, local_views: int = 0, proj_hidden_dim: int = 2048,
                 proj_output_dim: int = 128, n_prototypes: int = 3000, temperature: float = 0.1,
                 sinkhorn_iterations: int = 3, sinkhorn_epsilon: float = 0.05,
                 freeze_prototypes_fraction: float = 0.0):
        super().__init__()
        self.backbone, self.local_views = backbone, local_views
        self.projector = SwaVProjectionHead(backbone.num_features, proj_hidden_dim, proj_output_dim)
        self.prototypes = SwaVPrototypes(proj_output_dim, n_prototypes)
        self.freeze_prototypes_fraction = freeze_prototypes_fraction
        self.criterion = SwaVLoss(temperature=temperature, sinkhorn_iterations=sinkhorn_iterations,
                                  sinkhorn_epsilon=sinkhorn_epsilon, sinkhorn_gather_distributed=world_size() > 1)

    def training_step(self, views: list[torch.Tensor], labels: torch.Tensor, progress: float) -> torch.Tensor:
        self.prototypes.normalize()
        scores = [self.prototypes(F.normalize(self.projector(self.backbone(v)), dim=1)) for v in views]
        loss = self.criterion(scores[: self.global_views], scores[self.global_views:])
        return loss.reshape(())  # lightly's SwaVLoss returns shape (1,)

    def before_optimizer_step(self, progress: float) -> None:
        if progress < self.freeze_prototypes_fraction:
            for p in self.prototypes.parameters():
                p.grad = None

    def after_step(self, progress: float) -> None:
        pass
