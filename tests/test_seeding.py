"""Random streams under DDP (two gloo processes): the ranks draw different augmentations and
masks for the same images, and a rank restored from a checkpoint's streams continues its own
draws exactly; the split BatchNorm one process uses to stand in for per-rank BN."""

from __future__ import annotations

import os
import socket

import pytest
import torch

from sslpipe.batchnorm import SplitBatchNorm, convert_split_bn


def _draws_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from sslpipe import distributed, seeding
    from sslpipe.data.views import AugmentSpec, MultiView, ViewPlan

    distributed.setup(torch.device("cpu"))
    seeding.seed_process(0)  # model construction: alike on every rank
    views = MultiView(16, ViewPlan.uniform(AugmentSpec(), global_views=2, local_views=2), [0.5], [0.25])
    draws = seeding.GlobalDraws()
    images = torch.arange(8 * 16 * 16, dtype=torch.int64).remainder(251).to(torch.uint8).view(8, 1, 16, 16)
    seeding.seed_rank_stream(0, rank)  # what Loop.run does before the first step
    first = (views(images), draws.rand(8, 17))
    streams, mask_state = seeding.gather_rng_states(), draws.get_extra_state()  # what a checkpoint keeps
    second = (views(images), draws.rand(8, 17))
    seeding.seed_process(12345)  # a fresh process after a crash: nothing of the old streams is left
    draws.set_extra_state(mask_state)
    seeding.restore_rank_stream({"ranks": streams}, 0, rank, 2, step=1)
    resumed = (views(images), draws.rand(8, 17))
    torch.save({"first": first, "second": second, "resumed": resumed}, f"{out}/rank{rank}.pt")
    distributed.teardown()


@pytest.fixture(scope="module")
def draws(tmp_path_factory):
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("draws")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_draws_worker, args=(port, str(out)), nprocs=2, start_method="spawn")
    return [torch.load(out / f"rank{r}.pt") for r in (0, 1)]


def test_two_ranks_draw_different_crops_and_masks_for_the_same_images(draws):
    (views0, mask0), (views1, mask1) = draws[0]["first"], draws[1]["first"]
    for v0, v1 in zip(views0, views1):  # 2 global + 2 local views
        assert not torch.allclose(v0, v1)
    assert not torch.equal(mask0, mask1)


def test_a_resumed_rank_continues_its_own_stream(draws):
    for rank in (0, 1):
        (views, mask), (views_r, mask_r) = draws[rank]["second"], draws[rank]["resumed"]
        assert all(torch.equal(a, b) for a, b in zip(views, views_r))
        assert torch.equal(mask, mask_r)
        assert not torch.equal(draws[rank]["first"][1], mask)  # the stream moved on between steps


def test_resume_with_another_world_size_reseeds_and_says_so(caplog):
    from sslpipe import seeding

    seeding.seed_process(0)
    saved = {"ranks": [seeding.rng_state(), seeding.rng_state()]}
    with caplog.at_level("WARNING"):
        seeding.restore_rank_stream(saved, seed=0, rank=0, world_size=4, step=7)
    assert "2 rank(s), this run has 4" in caplog.text


def test_split_batchnorm_normalises_each_group_alone():
    """A batch of 8 in 2 groups: each group's output is what BatchNorm gives that group alone
    (per-device BN on 2 devices); eval and state-dict keys are plain BatchNorm's."""
    torch.manual_seed(0)
    bn = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6))
    split = convert_split_bn(torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6)), 2)
    split.load_state_dict(bn.state_dict())
    assert isinstance(split[1], SplitBatchNorm) and split.state_dict().keys() == bn.state_dict().keys()
    x = torch.randn(8, 4) * 3 + torch.arange(8)[:, None]  # the halves have different statistics
    out = split(x)
    ref = torch.cat([bn(x[:4]), bn(x[4:])])
    assert torch.allclose(out, ref, atol=1e-6)
    assert not torch.allclose(out, bn(x), atol=1e-3)
    with pytest.raises(ValueError, match="batch of 7 does not split into 2"):
        split(x[:7])
