"""SupCon: Khosla et al., "Supervised Contrastive Learning", NeurIPS 2020. Written by hand:
lightly 1.6 has no supervised contrastive loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightly.models.modules import SimCLRProjectionHead
from lightly.utils.dist import gather
from torch import nn

from sslpipe.distributed import all_gather_cat, rank, world_size


def supcon_loss(z: torch.Tensor, labels: torch.Tensor, temperature: float, z_all: torch.Tensor | None = None,
                labels_all: torch.Tensor | None = None, offset: int = 0) -> torch.Tensor:
    """L^sup_out (paper, eq. 2): for each anchor i, the mean over its positives p (same label,
    p != i) of -log softmax_{a != i}(z_i . z_a / T)[p], averaged over anchors that have a
    positive. z (N, D) L2-normalised, labels (N,) -> scalar. Under DDP the anchors are this
    rank's and the contrast set `z_all` / `labels_all` the whole global batch, in which this
    rank's rows start at `offset`. (The paper's extra T / T_base factor is 1 here: T_base = T.)"""
    z_all = z if z_all is None else z_all
    labels_all = labels if labels_all is None else labels_all
    logits = z @ z_all.t() / temperature
    self_mask = torch.zeros_like(logits, dtype=torch.bool)
    self_mask[torch.arange(len(z)), torch.arange(len(z)) + offset] = True
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = (labels[:, None] == labels_all[None, :]) & ~self_mask
    n_pos = positives.sum(1)
    has_pos = n_pos > 0
    mean_log_prob = log_prob.masked_fill(~positives, 0.0).sum(1)[has_pos] / n_pos[has_pos]
    return -mean_log_prob.mean()


class SupCon(nn.Module):
    """Two views through backbone + MLP projector; every other view of the same class is a
    positive (SimCLR with labels). USES LABELS: a supervised baseline (the reference for SIMO2).

    Shapes: views 2 x (B, C, H, W) + labels (B,) -> projections (2B, proj_output_dim) -> scalar.
    Defaults: 128-d output, T 0.1 (paper, sec. 4); any random batch works (no sampler needed).
    Under DDP every anchor contrasts with the views of the whole global batch (gathered).
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
        labels = labels.repeat(len(views))
        if world_size() == 1:
            return supcon_loss(z, labels, self.temperature)
        # every rank's features as the contrast set, with gradients (lightly's GatherLayer), as SimCLR
        z_all, labels_all = torch.cat(gather(z)), all_gather_cat(labels)
        return supcon_loss(z, labels, self.temperature, z_all, labels_all, offset=rank() * len(z))

    def after_step(self, progress: float) -> None:
        pass
