"""SupCon: Khosla et al., "Supervised Contrastive Learning", NeurIPS 2020. Written by hand:
lightly 1.6 has no supervised contrastive loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightly.models.modules import SimCLRProjectionHead
from torch import nn


def supcon_loss(z: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """L^sup_out (paper, eq. 2): for each anchor i, the mean over its positives p (same label,
    p != i) of -log softmax_{a != i}(z_i . z_a / T)[p], averaged over anchors that have a
    positive. z (N, D) L2-normalised, labels (N,) -> scalar. (The paper's extra T / T_base
    factor is 1 here: T_base = T.)"""
    logits = z @ z.t() / temperature
    self_mask = torch.eye(len(z), dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    n_pos = positives.sum(1)
    has_pos = n_pos > 0
    mean_log_prob = log_prob.masked_fill(~positives, 0.0).sum(1)[has_pos] / n_pos[has_pos]
    return -mean_log_prob.mean()


class SupCon(nn.Module):
    """Two views through backbone + MLP projector; every other view of the same class is a
    positive (SimCLR with labels). USES LABELS: a supervised baseline (the reference for SIMO2).

    Shapes: views 2 x (B, C, H, W) + labels (B,) -> projections (2B, proj_output_dim) -> scalar.
    Defaults: 128-d output, T 0.1 (paper, sec. 4); any random batch works (no sampler needed).
    """

    global_views, local_views, needs_labels = 2, 0, True
    objective = "supcon"

    def __init__(self, backbone: nn.Module, proj_hidden_dim: int = 512, proj_output_dim: int = 128,
                 temperature: float = 0.1):
        super().__init__()
        self.backbone = backbone
        self.projector = SimCLRProjectionHead(backbone.num_features, proj_hidden_dim, proj_output_dim)
        self.temperature = temperature

    def training_step(self, views: list[torch.Tensor], labels: torch.Tensor, progress: float) -> torch.Tensor:
        z = F.normalize(torch.cat([self.projector(self.backbone(v)) for v in views]), dim=1)
        return supcon_loss(z, labels.repeat(len(views)), self.temperature)

    def after_step(self, progress: float) -> None:
        pass
