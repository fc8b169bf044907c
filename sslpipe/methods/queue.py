"""The negative-key queue of MoCo v1/v2, sized to the data it will see.

The queue itself is lightly's: `NTXentLoss(memory_bank_size=(K, dim))` keeps a
`MemoryBankModule` ring buffer of the last K keys (filled with random unit vectors until
real keys arrive) and uses it as the negatives of each query; with `gather_distributed` it
enqueues the keys of the whole global batch, so the queue does not depend on the number of
ranks. What lightly cannot know is the data set. With a reshuffle every epoch, a query among
the first K of an epoch finds a key of its own image from the previous epoch in the queue
with probability (K - p) / N at position p, about K^2 / (2 N^2) of all queries: half of them
at K = N - B, 0.34 % for the authors' CIFAR demo (K 4096, N 50000). Hence the rule in
`fitted_queue_size`: K at most N / 10 (at most 0.5 % of queries see a stale key of their own
image) and a multiple of the global batch (MoCo asserts K % batch == 0, so each enqueue
replaces exactly one batch of keys)."""

from __future__ import annotations

import logging

from lightly.loss import NTXentLoss

from sslpipe.distributed import world_size

log = logging.getLogger(__name__)


QUEUE_SHARE = 10  # K <= N / QUEUE_SHARE: at most 1 / (2 * 10^2) = 0.5 % of queries meet a stale own key


def fitted_queue_size(requested: int, num_images: int, global_batch: int) -> int:
    """The largest multiple of `global_batch` that is at most `requested` and at most
    num_images / 10; one global batch when even that is more."""
    cap = min(requested, num_images // QUEUE_SHARE)
    return max(global_batch, cap // global_batch * global_batch)


def queue_criterion(temperature: float, queue_size: int, dim: int) -> NTXentLoss:
    """InfoNCE of a query against its key (positive) and the K queued keys (negatives)."""
    return NTXentLoss(temperature=temperature, memory_bank_size=(queue_size, dim),
                      gather_distributed=world_size() > 1)


def refit(method, num_images: int, batch_size: int) -> None:
    """Resize `method.criterion`'s queue by `fitted_queue_size`, warning when the data set is
    too small for the configured K."""
    global_batch = batch_size * world_size()
    size = fitted_queue_size(method.memory_bank_size, num_images, global_batch)
    if size != method.memory_bank_size:
        log.warning("%s: memory_bank_size=%d does not fit %d training images and a global batch of %d (the queue "
                    "holds at most N / %d keys, a multiple of the global batch); using a queue of %d keys",
                    type(method).__name__, method.memory_bank_size, num_images, global_batch, QUEUE_SHARE, size)
    if size != method.criterion.memory_bank.size[0]:
        method.criterion = queue_criterion(method.criterion.temperature, size, method.criterion.memory_bank.size[1])


def queue_state(criterion: NTXentLoss) -> dict:
    """The queued keys and the ring pointer of `criterion`'s memory bank, for a checkpoint."""
    bank = criterion.memory_bank
    return {"keys": bank.bank.detach().clone(), "pointer": bank.bank_ptr.detach().clone()}


def load_queue_state(criterion: NTXentLoss, state: dict) -> None:
    bank = criterion.memory_bank
    if tuple(state["keys"].shape) != tuple(bank.bank.shape):
        raise ValueError(f"the checkpoint's MoCo queue holds {tuple(state['keys'].shape)} keys, this run's "
                         f"{tuple(bank.bank.shape)}: resume with the memory_bank_size, batch size and data "
                         f"set of the run that wrote it")
    bank.bank.copy_(state["keys"])
    bank.bank_ptr.copy_(state["pointer"])
