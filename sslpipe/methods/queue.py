"""The negative-key queue of MoCo v1/v2, sized to the data it will see.

The queue itself is lightly's: `NTXentLoss(memory_bank_size=(K, dim))` keeps a
`MemoryBankModule` ring buffer of the last K keys (filled with random unit vectors until
real keys arrive) and uses it as the negatives of each query. What lightly cannot know is
the data set: with K = 65536 (MoCo's ImageNet value, seed 001) and the 1257 digits training
images, the queue would hold 52 copies of every key, each image's own stale keys among its
negatives. `fitted_queue_size` caps K at the other images of an epoch."""

from __future__ import annotations

import logging

from lightly.loss import NTXentLoss

from sslpipe.distributed import world_size

log = logging.getLogger(__name__)


def fitted_queue_size(requested: int, num_images: int, batch_size: int) -> int:
    """min(requested, num_images - batch_size), at least one batch: a query's own image is
    not among the keys of the last epoch's other batches (MoCo keeps K << N: 65536 of 1.28 M)."""
    return max(batch_size, min(requested, num_images - batch_size))


def queue_criterion(temperature: float, queue_size: int, dim: int) -> NTXentLoss:
    """InfoNCE of a query against its key (positive) and the K queued keys (negatives)."""
    return NTXentLoss(temperature=temperature, memory_bank_size=(queue_size, dim),
                      gather_distributed=world_size() > 1)


def refit(method, num_images: int, batch_size: int) -> None:
    """Shrink `method.criterion`'s queue to `fitted_queue_size` when the data set is small."""
    size = fitted_queue_size(method.memory_bank_size, num_images, batch_size * world_size())
    if size != method.criterion.memory_bank.size[0]:
        log.warning("%s: memory_bank_size=%d is more than the %d training images allow; using a queue of %d keys",
                    type(method).__name__, method.memory_bank_size, num_images, size)
        method.criterion = queue_criterion(method.criterion.temperature, size, method.criterion.memory_bank.size[1])
