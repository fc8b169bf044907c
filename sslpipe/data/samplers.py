"""Class-balanced batches: `classes_per_batch` classes x `samples_per_class` images each, the
batch shape SIMO2's loss needs (the SIMO2 reference code's `create_simo2_batch_from_dataset`).
Written by hand: torch and lightly have no sampler that fixes the per-class count of every
batch."""

from __future__ import annotations

import numpy as np
import torch

from sslpipe.data.split import Split


class ClassBalancedLoader:
    """The `EpochLoader` interface (`set_epoch`, `len`, iteration over (uint8 images, labels))
    with batches grouped by class: each batch draws `classes_per_batch` distinct classes, then
    `samples_per_class` images of each (without replacement when the class has enough, with
    replacement otherwise, as that function draws). An epoch is len(split) // batch images, like
    EpochLoader's, so `loop.epochs` means the same. The draw of batch b of epoch e comes from
    a generator seeded by (seed, e, b, rank): a resumed run and each DDP rank are reproducible.
    Unlabelled images (label -1) are never drawn."""

    def __init__(self, split: Split, samples_per_class: int, classes_per_batch: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        labels = split.labels.cpu().numpy()
        self.members = {int(c): np.flatnonzero(labels == c) for c in np.unique(labels) if c >= 0}
        if classes_per_batch < 2 or classes_per_batch > len(self.members):
            raise ValueError(f"classes_per_batch={classes_per_batch} must be in 2..{len(self.members)} "
                             f"(the labelled classes of the split)")
        if samples_per_class < 2:
            raise ValueError(f"samples_per_class={samples_per_class} must be >= 2")
        self.split, self.samples_per_class, self.classes_per_batch = split, samples_per_class, classes_per_batch
        self.batch_size = samples_per_class * classes_per_batch
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return max(1, len(self.split) // self.world_size // self.batch_size)

    def batch_index(self, batch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.epoch, batch, self.rank])
        classes = np.sort(rng.choice(sorted(self.members), size=self.classes_per_batch, replace=False))
        picks = [rng.choice(self.members[c], size=self.samples_per_class,
                            replace=len(self.members[c]) < self.samples_per_class) for c in classes]
        return np.concatenate(picks)

    def __iter__(self):
        for b in range(self.start, len(self)):
            index = torch.from_numpy(self.batch_index(b)).to(self.split.labels.device)
            yield self.split.images[index], self.split.labels[index]
