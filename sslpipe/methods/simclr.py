"""SimCLR: Chen et al., "A Simple Framework for Contrastive Learning of Visual
Representations", ICML 2020."""

from __future__ import annotations

import torch
from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from torch import nn

from sslpipe.distributed import world_size


class SimCLR(nn.Module):
    """Two views of each image through backbone + 2-layer MLP projector; NT-Xent loss with
    the other 2B - 2 views of the batch as negatives (lightly's `NTXentLoss`).

    Shapes: views 2 x (B, C, H, W) -> projections 2 x (B, proj_output_dim) -> scalar loss.
    Defaults: projector 512 -> 128 as in the paper's CIFAR setup; temperature in the yaml.
    """

    global_views, local_views, needs_labels = 2, 0, False
    objective = "info_nce"

    def __init__(self, backbone: nn.Module, proj_hidden_dim: int = 512, proj_output_dim: int = 128,
                 temperature: float = 0.2):
        super().__init__()
        self.backbone = backbone
        self.projector = SimCLRProjectionHead(backbone.num_features, proj_hidden_dim, proj_output_dim)
        self.criterion = NTXentLoss(temperature=temperature, gather_distributed=world_size() > 1)

    def training_step(self, views: list[torch.Tensor], labels: torch.Tensor, progress: float) -> torch.Tensor:
        z0, z1 = (self.projector(self.backbone(v)) for v in views)
        return self.criterion(z0, z1)

    def after_step(self, progress: float) -> None:
        pass
