"""The negative-key queue of MoCo v1/v2, sized to the data it will see, with the sample id of
every key so that no query meets a key of its own image among its negatives.

Hand-written (`KeyQueue`, `queue_info_nce`) rather than lightly's `NTXentLoss` memory bank,
which keeps keys only: with a reshuffle every epoch, a query among the first K of an epoch
finds a key of its own image from the previous epoch in the queue with probability
(K - p) / N at position p, about K^2 / (2 N^2) of all queries (half of them at K = N - B), and
only the key's sample id tells it apart. The queue holds the last K keys of the global batch
(gathered in rank order, so it does not depend on the number of ranks) and their ids; a
query's logits against queued keys of its own id are masked out. The rule in
`fitted_queue_size` remains: K at most N / 10 and a multiple of the global batch (MoCo asserts
K % batch == 0, so each enqueue replaces exactly one batch of keys)."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from sslpipe.distributed import world_size

log = logging.getLogger(__name__)


QUEUE_SHARE = 10  # K <= N / QUEUE_SHARE: keys from the last tenth of the data at most


def fitted_queue_size(requested: int, num_images: int, global_batch: int) -> int:
    """The largest multiple of `global_batch` that is at most `requested` and at most
    num_images / 10; one global batch when even that is more."""
    cap = min(requested, num_images // QUEUE_SHARE)
    return max(global_batch, cap // global_batch * global_batch)


class KeyQueue(nn.Module):
    """The last `size` keys (unit vectors, (size, dim)) and the sample ids they came from (-1:
    the random start, no image's), a ring written from `pointer`. Buffers, not parameters; kept
    out of the state dict (the method's extra state holds them, with a clear error on a size
    mismatch)."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1), persistent=False)
        self.register_buffer("ids", torch.full((size,), -1, dtype=torch.long), persistent=False)
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long), persistent=False)

    @property
    def size(self) -> int:
        return len(self.keys)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, ids: torch.Tensor) -> None:
        """Write the global batch's keys and ids over the oldest entries."""
        where = (int(self.pointer) + torch.arange(len(keys), device=self.keys.device)) % self.size
        self.keys[where] = F.normalize(keys.to(self.keys.dtype), dim=1)
        self.ids[where] = ids.to(self.ids.device)
        self.pointer.fill_((int(self.pointer) + len(keys)) % self.size)


def queue_info_nce(query: torch.Tensor, key: torch.Tensor, ids: torch.Tensor, queue: KeyQueue,
                   temperature: float) -> torch.Tensor:
    """MoCo's InfoNCE (Algorithm 1): each query's cosine similarity with its key (positive) and
    with the K queued keys (negatives), over the temperature, cross-entropy to the positive;
    queued keys of the query's own sample id are no negatives (masked)."""
    q, k = F.normalize(query, dim=1), F.normalize(key, dim=1)
    positive = (q * k).sum(1, keepdim=True)
    # a copy: the queue is overwritten after this step, before backward reads it (lightly clones too)
    negatives = (q @ queue.keys.t().to(q.dtype).clone()).masked_fill(queue.ids[None, :] == ids[:, None],
                                                                   float("-inf"))
    logits = torch.cat([positive, negatives], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


def refit(method, num_images: int, batch_size: int) -> None:
    """Resize `method.queue` by `fitted_queue_size`, warning when the data set is too small for
    the configured K."""
    global_batch = batch_size * world_size()
    size = fitted_queue_size(method.memory_bank_size, num_images, global_batch)
    if size != method.memory_bank_size:
        log.warning("%s: memory_bank_size=%d does not fit %d training images and a global batch of %d (the queue "
                    "holds at most N / %d keys, a multiple of the global batch); using a queue of %d keys",
                    type(method).__name__, method.memory_bank_size, num_images, global_batch, QUEUE_SHARE, size)
    if size != method.queue.size:
        method.queue = KeyQueue(size, method.queue.keys.shape[1]).to(method.queue.keys.device)


def queue_state(queue: KeyQueue) -> dict:
    """The queued keys, their ids and the ring pointer, for a checkpoint."""
    return {"keys": queue.keys.detach().clone(), "ids": queue.ids.clone(), "pointer": queue.pointer.clone()}


def load_queue_state(queue: KeyQueue, state: dict) -> None:
    if tuple(state["keys"].shape) != tuple(queue.keys.shape):
        raise ValueError(f"the checkpoint's MoCo queue holds {tuple(state['keys'].shape)} keys, this run's "
                         f"{tuple(queue.keys.shape)}: resume with the memory_bank_size, batch size and data "
                         f"set of the run that wrote it")
    queue.keys.copy_(state["keys"])
    queue.ids.copy_(state["ids"])
    queue.pointer.copy_(state["pointer"].reshape(queue.pointer.shape))
