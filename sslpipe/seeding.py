"""Random streams: what is drawn where, and how a resumed run continues each stream.

- **Model construction** draws from the process RNG seeded with `seed` alone, the same on
  every rank, so a run's initial weights do not depend on the number of ranks (DDP
  broadcasts rank 0's anyway).
- **Training** re-seeds each rank's process RNG from (seed, rank) (`seed_rank_stream`) before
  its first step: the on-device view ops of rank r draw their own crops, flips and colours,
  never the ones another rank draws for its samples. A checkpoint keeps every rank's state
  (`gather_rng_states`) and a resumed rank takes back its own.
- **Masks** (MAE token masks, iBOT block masks) are drawn for the whole global batch from a
  stream every rank seeds and advances alike, and each rank keeps the rows of its own samples
  (`GlobalDraws`): two ranks mask different images differently, and the masks of a run do not
  depend on how many ranks share its batch. The streamed loader's crops are keyed by
  (seed, epoch, image index) instead (sslpipe.data.stream), for the same reason.
"""

from __future__ import annotations

import logging
import random
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)


def rank_seed(seed: int, rank: int) -> int:
    """A 63-bit seed for rank `rank` of a run seeded `seed` (numpy's SeedSequence mixes the
    pair, so (0, 1) and (1, 0) give unrelated streams)."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


def seed_process(seed: int) -> None:
    """Seed python's, numpy's and torch's (CPU and every CUDA device's) global RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_rank_stream(seed: int, rank: int) -> None:
    """Rank `rank`'s training stream: the global RNGs seeded from (seed, rank)."""
    seed_process(rank_seed(seed, rank))


def rng_state() -> dict:
    """This process's python, numpy, torch and CUDA RNG states (loadable with weights_only)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    # numpy's key array as a tensor, so that the checkpoint loads with weights_only=True
    state = {"torch": torch.get_rng_state(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng_states() -> list[dict]:
    """Every rank's `rng_state()`, in rank order (on every rank; one process: a list of one)."""
    from sslpipe.distributed import gather_objects

    return gather_objects(rng_state())


def restore_rank_stream(saved: dict | list, seed: int, rank: int, world_size: int, step: int) -> None:
    """Take back this rank's stream from a checkpoint's `rng` entry. A checkpoint written by
    another number of ranks has no stream for this one: it is re-seeded from (seed, rank,
    step) instead, and the run says so (the weights resume exactly; the draws cannot)."""
    states = saved["ranks"] if isinstance(saved, dict) and "ranks" in saved else [saved]
    if len(states) == world_size:
        set_rng_state(states[rank])
        return
    log.warning("the checkpoint holds the random streams of %d rank(s), this run has %d: rank %d's stream is "
                "re-seeded from (seed, rank, step %d), so its draws from here on differ from the original run's",
                len(states), world_size, rank, step)
    seed_process(rank_seed(rank_seed(seed, rank), step))


class GlobalDraws(nn.Module):
    """A random stream shared by all ranks, for draws over the global batch of which each rank
    keeps its own rows (its samples are the rank-th block of each global batch, see
    sslpipe.data.epoch_order). Seeded at construction from the process RNG, which every rank
    seeds alike while models are built. Its state is part of the owning module's state dict
    (`_extra_state`), so a checkpoint resumes it."""

    def __init__(self):
        super().__init__()
        self.generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
        self.python = random.Random(int(torch.randint(0, 2**62, (1,)).item()))

    def rows(self, local_batch: int) -> tuple[int, slice]:
        """(global batch size, this rank's rows of it)."""
        from sslpipe.distributed import rank, world_size

        return local_batch * world_size(), slice(rank() * local_batch, (rank() + 1) * local_batch)

    def rand(self, local_batch: int, *shape: int, device: torch.device | None = None) -> torch.Tensor:
        """Uniform [0, 1) of shape (local_batch, *shape): this rank's rows of one draw for the global batch."""
        total, mine = self.rows(local_batch)
        return torch.rand((total, *shape), generator=self.generator)[mine].to(device)

    @contextmanager
    def python_random(self):
        """Route the `random` module through this stream for the duration (lightly's
        `random_block_mask` draws from the module-level functions), then put it back."""
        outer = random.getstate()
        random.setstate(self.python.getstate())
        try:
            yield
        finally:
            self.python.setstate(random.getstate())
            random.setstate(outer)

    def get_extra_state(self) -> dict:
        return {"torch": self.generator.get_state(), "python": self.python.getstate()}

    def set_extra_state(self, state: dict) -> None:
        self.generator.set_state(state["torch"])
        self.python.setstate(state["python"])
