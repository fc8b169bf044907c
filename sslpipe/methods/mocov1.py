"""MoCo v1: He et al., "Momentum Contrast for Unsupervised Visual Representation Learning",
CVPR 2020."""

from __future__ import annotations

import torch
from lightly.models.modules.heads import ProjectionHead
from torch import nn

from sslpipe.methods import queue
from sslpipe.methods.ema import ema_update, frozen_copy, momentum_at


class MoCoV1(nn.Module):
    """A query encoder (backbone + linear fc to `proj_output_dim`) and a momentum key encoder;
    InfoNCE of each query against its key and a queue of `memory_bank_size` earlier keys
    (lightly's `NTXentLoss` memory bank, see `sslpipe.methods.queue`).

    Shapes: views 2 x (B, C, H, W) -> query, key (B, proj_output_dim); queue (K, proj_output_dim).
    Defaults: dim 128, K 65536 as in seed 001's MoCo config and the paper; T 0.07 (paper, sec. 3.3).
    Shuffling BN is left out: on one device it changes nothing, and the paper needs it only
    across GPUs.
    """

    global_views, local_views, needs_labels = 2, 0, False
    objective = "info_nce_queue"

    def __init__(self, backbone: nn.Module, proj_output_dim: int = 128, memory_bank_size: int = 65536,
                 temperature: float = 0.07, momentum_start: float = 0.999, momentum_end: float = 0.999):
        super().__init__()
        projector = ProjectionHead([(backbone.num_features, proj_output_dim, None, None)])  # v1: one fc layer
        self._build(backbone, projector, proj_output_dim, memory_bank_size, temperature, momentum_start, momentum_end)

    def _build(self, backbone: nn.Module, projector: nn.Module, proj_output_dim: int, memory_bank_size: int,
               temperature: float, momentum_start: float, momentum_end: float) -> None:
        """The query encoder, its momentum copy (the key encoder) and the queue's criterion."""
        self.backbone, self.projector = backbone, projector
        self.key_backbone = frozen_copy(self.backbone)
        self.key_projector = frozen_copy(self.projector)
        self.memory_bank_size = memory_bank_size
        self.momentum_start, self.momentum_end = momentum_start, momentum_end
        self.criterion = queue.queue_criterion(temperature, memory_bank_size, proj_output_dim)

    def fit_data(self, num_images: int, batch_size: int) -> None:
        queue.refit(self, num_images, batch_size)

    def training_step(self, views: list[torch.Tensor], labels: torch.Tensor, progress: float) -> torch.Tensor:
        x_query, x_key = views
        query = self.projector(self.backbone(x_query))
        with torch.no_grad():
            key = self.key_projector(self.key_backbone(x_key))
        return self.criterion(query, key)  # enqueues `key`, dequeues the oldest batch

    @torch.no_grad()
    def after_step(self, progress: float) -> None:
        m = momentum_at(progress, self.momentum_start, self.momentum_end)
        ema_update(self.backbone, self.key_backbone, m)
        ema_update(self.projector, self.key_projector, m)
