"""MoCo v2: Chen et al., "Improved Baselines with Momentum Contrastive Learning", arXiv 2020."""

from __future__ import annotations

from lightly.models.modules import MoCoProjectionHead
from torch import nn

from sslpipe.methods.mocov1 import MoCoV1


class MoCoV2(MoCoV1):
    """MoCo v1 with a 2-layer MLP head (lightly's `MoCoProjectionHead`), T = 0.2 and stronger
    augmentation (the dataset's augment block); the same momentum key encoder, queue, Shuffle-BN and
    step (inherited from `MoCoV1`).

    Shapes: views 2 x (B, C, H, W) -> query, key (B, proj_output_dim); queue (K, proj_output_dim).
    Defaults: MLP 2048 -> 128 on ResNet-50 in the paper (hidden = input width); K 65536, T 0.2
    and m 0.999 as in the paper, Table 1.
    """

    global_views, local_views, needs_labels = 2, 0, False
    objective = "info_nce_queue"

    def __init__(self, backbone: nn.Module, proj_hidden_dim: int = 2048, proj_output_dim: int = 128,
                 memory_bank_size: int = 65536, temperature: float = 0.2, momentum_start: float = 0.999,
                 momentum_end: float = 0.999, bn_splits: int = 8):
        nn.Module.__init__(self)
        projector = MoCoProjectionHead(backbone.num_features, proj_hidden_dim, proj_output_dim)
        self._build(backbone, projector, proj_output_dim, memory_bank_size, temperature, momentum_start, momentum_end,
                    bn_splits)
