"""VICReg: Bardes, Ponce and LeCun, "VICReg: Variance-Invariance-Covariance Regularization
for Self-Supervised Learning", ICLR 2022."""

from __future__ import annotations

import torch
from lightly.loss import VICRegLoss
from lightly.models.modules.heads import VICRegProjectionHead
from torch import nn

from sslpipe.distributed import world_size


class VICReg(nn.Module):
    """Two views through backbone + 3-layer expander; invariance (MSE between the views),
    variance (hinge on each dimension's std) and covariance (off-diagonal) terms, weighted
    25 / 25 / 1 (lightly's `VICRegLoss`, the paper's values). Under DDP the variance and
    covariance run over the gathered global batch, as the paper's FullGatherLayer does.

    Shapes: views 2 x (B, C, H, W) -> embeddings 2 x (B, proj_output_dim) -> scalar.
    Defaults: the paper's 8192-8192-8192 expander (ImageNet); smaller in the yaml.
    """

    global_views, local_views, needs_labels = 2, 0, False
    objective = "variance_invariance_covariance"

    def __init__(self, backbone: nn.Module, proj_hidden_dim: int = 8192, proj_output_dim: int = 8192,
                 lambda_param: float = 25.0, mu_param: float = 25.0, nu_param: float = 1.0):
        super().__init__()
        self.backbone = backbone
        self.projector = VICRegProjectionHead(backbone.num_features, proj_hidden_dim, proj_output_dim)
        self.criterion = VICRegLoss(lambda_param=lambda_param, mu_param=mu_param, nu_param=nu_param,
                                    gather_distributed=world_size() > 1)

    def training_step(self, views: list[torch.Tensor], labels: torch.Tensor, progress: float) -> torch.Tensor:
        z0, z1 = (self.projector(self.backbone(v)) for v in views)
        return self.criterion(z0, z1)

    def after_step(self, progress: float) -> None:
        pass
