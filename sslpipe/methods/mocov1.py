"""MoCo v1: He et al., "Momentum Contrast for Unsupervised Visual Representation Learning",
CVPR 2020."""

from __future__ import annotations

import torch
from lightly.models.modules.heads import ProjectionHead
from torch import nn

from sslpipe.batchnorm import convert_split_bn
from sslpipe.distributed import all_gather_cat, world_size
from sslpipe.methods import queue
from sslpipe.methods.ema import ema_update, frozen_copy, momentum_at
from sslpipe.seeding import GlobalDraws


def per_rank_splits(bn_splits: int) -> int:
    """BN groups of each rank's batch for `bn_splits` groups per global batch."""
    ws = world_size()
    if bn_splits % ws and bn_splits > ws:
        raise ValueError(f"method.bn_splits={bn_splits} BN groups per global batch do not divide among {ws} ranks; "
                         f"use a multiple of {ws}, or {ws} for plain per-rank BN")
    return max(1, bn_splits // ws)


class MoCoV1(nn.Module):
    """A query encoder (backbone + linear fc to `proj_output_dim`) and a momentum key encoder;
    InfoNCE of each query against its key and a queue of `memory_bank_size` earlier keys
    (`sslpipe.methods.queue`). `labels` are sample ids (`needs_sample_ids`: stage=pretrain hands
    each image's index), so that a queued key of the query's own image is no negative.

    Shapes: views 2 x (B, C, H, W) -> query, key (B, proj_output_dim); queue (K, proj_output_dim).
    Defaults: dim 128, K 65536 as in the paper; T 0.07 (paper, sec. 3.3).

    BatchNorm is per device, never synchronised (`sync_bn = False`), and the keys use
    Shuffle-BN (paper, sec. 3.3: without it the model "cheats" through BN statistics the
    query and its key share; the authors measure it): the global key batch is permuted with a
    permutation every rank draws alike, each rank encodes its block of the shuffled batch,
    and the keys are put back in order. `bn_splits` is the number of BN groups per global
    batch (the authors' one-GPU CIFAR demo: 8): each rank splits its batch into
    bn_splits / world_size groups (split BN), so one device and several compute the same
    statistics over the same samples, and runs with 1 and N ranks train alike.
    """

    global_views, local_views, needs_labels, sync_bn, needs_sample_ids = 2, 0, False, False, True
    objective = "info_nce_queue"

    def __init__(self, backbone: nn.Module, proj_output_dim: int = 128, memory_bank_size: int = 65536,
                 temperature: float = 0.07, momentum_start: float = 0.999, momentum_end: float = 0.999,
                 bn_splits: int = 8):
        super().__init__()
        projector = ProjectionHead([(backbone.num_features, proj_output_dim, None, None)])  # v1: one fc layer
        self._build(backbone, projector, proj_output_dim, memory_bank_size, temperature, momentum_start, momentum_end,
                    bn_splits)

    def _build(self, backbone: nn.Module, projector: nn.Module, proj_output_dim: int, memory_bank_size: int,
               temperature: float, momentum_start: float, momentum_end: float, bn_splits: int) -> None:
        """The query encoder, its momentum copy (the key encoder), split BN and the key queue."""
        splits = per_rank_splits(bn_splits)
        self.backbone, self.projector = convert_split_bn(backbone, splits), convert_split_bn(projector, splits)
        self.key_backbone = frozen_copy(self.backbone)
        self.key_projector = frozen_copy(self.projector)
        self.memory_bank_size = memory_bank_size
        self.momentum_start, self.momentum_end = momentum_start, momentum_end
        self.temperature = temperature
        self.queue = queue.KeyQueue(memory_bank_size, proj_output_dim)
        self.draws = GlobalDraws()  # the Shuffle-BN permutations, alike on every rank

    def fit_data(self, num_images: int, batch_size: int) -> None:
        queue.refit(self, num_images, batch_size)

    def get_extra_state(self) -> dict:
        """The queue, its ids and pointer (a resumed run without them would restart from random
        negatives)."""
        return queue.queue_state(self.queue)

    def set_extra_state(self, state: dict) -> None:
        queue.load_queue_state(self.queue, state)

    def training_step(self, views: list[torch.Tensor], ids: torch.Tensor, progress: float) -> torch.Tensor:
        x_query, x_key = views
        query = self.projector(self.backbone(x_query))
        with torch.no_grad():
            key = self.shuffled_keys(x_key)
        loss = queue.queue_info_nce(query, key, ids, self.queue, self.temperature)
        if query.requires_grad:  # training: the global batch's keys replace the oldest (Algorithm 1)
            self.queue.enqueue(all_gather_cat(key), all_gather_cat(ids))
        return loss

    @torch.no_grad()
    def shuffled_keys(self, x_key: torch.Tensor) -> torch.Tensor:
        """Keys of this rank's images through the key encoder with Shuffle-BN: gather the global
        batch, permute it (one permutation on every rank), encode this rank's block of the
        shuffled batch, gather the keys and undo the permutation (MoCo, Algorithm 1 and
        `_batch_shuffle_ddp`; on one process: a shuffle within the batch, for split BN)."""
        total, mine = self.draws.rows(len(x_key))
        order = torch.randperm(total, generator=self.draws.generator).to(x_key.device)
        shuffled = all_gather_cat(x_key)[order][mine]
        keys = all_gather_cat(self.key_projector(self.key_backbone(shuffled)))
        return keys[torch.argsort(order)][mine]

    @torch.no_grad()
    def after_step(self, progress: float) -> None:
        m = momentum_at(progress, self.momentum_start, self.momentum_end)
        ema_update(self.backbone, self.key_backbone, m)
        ema_update(self.projector, self.key_projector, m)
