"""Which samples each rank sees in an epoch, and the memory path's batches of them."""

from __future__ import annotations

import torch

from sslpipe.data.split import Split


def epoch_order(n: int, shuffle: bool, seed: int, epoch: int, rank: int = 0, world_size: int = 1,
                batch_size: int | None = None) -> torch.Tensor:
    """This rank's sample order for one epoch: a permutation seeded by (seed, epoch), so a
    resumed run sees the same order, cut to a multiple of world_size. With `batch_size` (the
    per-rank batch) each global batch of world_size x batch_size consecutive samples is dealt
    in contiguous blocks, rank r taking the r-th: the global batches, and which samples share
    a rank's BatchNorm statistics, are the same as one process's batch of that size split in
    world_size groups (split BN), whatever the number of ranks. The tail (fewer than a global
    batch) is shared out evenly the same way. Without it: every world_size-th sample from
    `rank` (DistributedSampler's scheme, for evaluation). Shared by the memory and stream loaders."""
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    else:
        order = torch.arange(n)
    order = order[: (n // world_size) * world_size]
    if batch_size is None or world_size == 1:
        return order[rank::world_size]
    full = (len(order) // (world_size * batch_size)) * world_size * batch_size
    head = order[:full].view(-1, world_size, batch_size)[:, rank].reshape(-1)
    return torch.cat([head, order[full:].view(world_size, -1)[rank]])


class EpochLoader:
    """Batches of (uint8 images, labels) from a `Split`, shuffled per epoch by a generator
    seeded from (seed, epoch) so that a resumed run sees the same order; `start` skips
    batches already done. With world_size > 1 each rank takes every world_size-th sample
    of the shared permutation (DistributedSampler's scheme)."""

    def __init__(self, split: Split, batch_size: int, shuffle: bool, drop_last: bool, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.split, self.batch_size, self.shuffle, self.drop_last = split, batch_size, shuffle, drop_last
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch, self.start = 0, 0
        if drop_last and len(self) == 0:
            raise ValueError(
                f"batch_size={batch_size} is larger than the {len(split) // world_size} training images per rank; "
                f"lower the batch size"
            )

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        n = len(self.split) // self.world_size
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        order = epoch_order(len(self.split), self.shuffle, self.seed, self.epoch, self.rank, self.world_size,
                            self.batch_size)
        for b in range(self.start, len(self)):
            index = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield self.split.images[index], self.split.labels[index]
