"""Split BatchNorm: batch statistics over equal groups of a batch, as that many devices with
per-device BN would compute them on their shares.

The MoCo authors' one-GPU CIFAR demo (facebookresearch/moco, colab/moco_cifar10_demo.ipynb,
`SplitBatchNorm`, bn_splits=8) simulates per-GPU BN this way; lightly ships a 2-D version
that groups every S-th sample. Written here because sslpipe deals each global batch to the
ranks in contiguous blocks (sslpipe.data.epoch_order), so a group must be a contiguous block
too, and projection heads need it for BatchNorm1d as well.

In training, group g of S (samples g*N/S .. (g+1)*N/S - 1) is normalised with its own mean and
variance; running statistics follow group 0 alone, as DDP keeps rank 0's buffers. In eval it
is plain BatchNorm. State-dict keys are BatchNorm's, so weights load either way."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class SplitBatchNorm(_BatchNorm):
    def __init__(self, num_features: int, splits: int, **kwargs):
        super().__init__(num_features, **kwargs)
        if splits < 1:
            raise ValueError(f"split BatchNorm needs splits >= 1, got {splits}")
        self.splits = splits

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected a (N, C, ...) input, got shape {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.splits == 1:
            return super().forward(x)
        self._check_input_dim(x)
        if len(x) % self.splits:
            raise ValueError(f"split BatchNorm: a batch of {len(x)} does not split into {self.splits} equal groups; "
                             f"use a batch size divisible by {self.splits}")
        factor = 0.0
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        groups = x.chunk(self.splits)
        out = [F.batch_norm(g, self.running_mean if i == 0 else None, self.running_var if i == 0 else None,
                            self.weight, self.bias, True, factor, self.eps) for i, g in enumerate(groups)]
        return torch.cat(out)


def convert_split_bn(module: nn.Module, splits: int) -> nn.Module:
    """Replace every BatchNorm (1d/2d/3d) in `module` by a SplitBatchNorm of `splits` groups with
    the same parameters and buffers; returns the module (a new one only if `module` is itself a
    BatchNorm). splits=1 changes nothing."""
    if splits == 1:
        return module
    if isinstance(module, _BatchNorm) and not isinstance(module, SplitBatchNorm):
        state = module.state_dict()
        out = SplitBatchNorm(module.num_features, splits, eps=module.eps, momentum=module.momentum,
                             affine=module.affine, track_running_stats=module.track_running_stats,
                             device=next(iter(state.values())).device if state else None)
        out.load_state_dict(state)
        out.train(module.training)
        for new, old in zip(out.parameters(), module.parameters()):  # a frozen (teacher) BN stays frozen
            new.requires_grad_(old.requires_grad)
        return out
    for name, child in module.named_children():
        setattr(module, name, convert_split_bn(child, splits))
    return module


def has_split_bn(module: nn.Module) -> bool:
    return any(isinstance(m, SplitBatchNorm) and m.splits > 1 for m in module.modules())
