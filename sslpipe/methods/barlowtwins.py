"""Barlow Twins: Zbontar et al., "Barlow Twins: Self-Supervised Learning via Redundancy
Reduction", ICML 2021."""

from __future__ import annotations

import torch
from lightly.loss import BarlowTwinsLoss
from lightly.models.modules import BarlowTwinsProjectionHead
from lightly.utils.dist import gather
from torch import nn

from sslpipe.distributed import world_size


class BarlowTwins(nn.Module):
    """Two views through backbone + 3-layer projector; the cross-correlation matrix of the two
    views' embeddings, each standardised over the batch, is pushed to the identity (lightly's
    `BarlowTwinsLoss`: invariance on the diagonal, redundancy reduction off it, weighted lambda).

    Under DDP the embeddings are gathered first, so the standardisation and the correlation
    run over the global batch, as the paper's SyncBatchNorm + all_reduce do (lightly alone
    standardises per rank). Every rank computes the same loss; the gather's backward sums
    each rank's share, and DDP's averaging makes the step that of one process.

    Shapes: views 2 x (B, C, H, W) -> embeddings 2 x (B, proj_output_dim) -> scalar.
    Defaults: the paper's 8192-8192-8192 projector and lambda 5e-3 (ImageNet); smaller in the yaml.
    """

    global_views, local_views, needs_labels = 2, 0, False
    objective = "redundancy_reduction"

    def __init__(self, backbone: nn.Module, proj_hidden_dim: int = 8192, proj_output_dim: int = 8192,
                 lambda_param: float = 0.005):
        super().__init__()
        self.backbone = backbone
        self.projector = BarlowTwinsProjectionHead(backbone.num_features, proj_hidden_dim, proj_output_dim)
        self.criterion = BarlowTwinsLoss(lambda_param=lambda_param)

    def training_step(self, views: list[torch.Tensor], labels: torch.Tensor, progress: float) -> torch.Tensor:
        z0, z1 = (self.projector(self.backbone(v)) for v in views)
        if world_size() > 1:  # the global batch, with gradients (lightly's GatherLayer)
            z0, z1 = torch.cat(gather(z0)), torch.cat(gather(z1))
        return self.criterion(z0, z1)

    def after_step(self, progress: float) -> None:
        pass
