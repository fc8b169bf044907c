"""A checkpoint round-trips: what `atomic_save` writes, `load` (weights_only) gives back with
the same tensors, optimizer state and RNG streams; a failed save leaves the old file."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from sslpipe import checkpoint as ckpt
from sslpipe import seeding


def _trained_model_and_optimizer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        model(torch.randn(5, 3, 6, 6)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def test_model_optimizer_and_rng_round_trip(tmp_path):
    model, opt = _trained_model_and_optimizer()
    torch.manual_seed(7), np.random.seed(7), random.seed(7)
    path = ckpt.atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": seeding.rng_state(),
                             "step": 3}, tmp_path / "last.pt")
    expected = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])

    saved = ckpt.load(path)
    assert saved["step"] == 3
    fresh, fresh_opt = _trained_model_and_optimizer()
    for p in fresh.parameters():
        nn.init.zeros_(p) if p.dim() < 2 else nn.init.ones_(p)  # make sure loading is what restores them
    fresh.load_state_dict(saved["model"], strict=True)
    fresh_opt.load_state_dict(saved["optimizer"])
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name  # BatchNorm running stats included
    for a, b in zip(opt.state.values(), fresh_opt.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in ("step", "exp_avg", "exp_avg_sq"))

    torch.manual_seed(123), np.random.seed(123), random.seed(123)  # move every stream elsewhere
    seeding.set_rng_state(saved["rng"])
    assert torch.equal(torch.rand(4), expected[0])
    assert np.array_equal(np.random.rand(4), expected[1])
    assert [random.random() for _ in range(4)] == expected[2]


def test_a_failed_save_keeps_the_previous_file(tmp_path):
    path = ckpt.atomic_save({"step": 1, "w": torch.ones(3)}, tmp_path / "last.pt")

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle this")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        ckpt.atomic_save({"step": 2, "bad": Unpicklable()}, path)
    assert ckpt.load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


def test_temp_files_of_a_killed_writer_are_removed_by_the_next_save(tmp_path):
    # A SIGKILL mid-save leaves `.last.pt.<random>.tmp` (no except clause runs); the next
    # successful save of the same path removes it, and leaves other files alone.
    (tmp_path / ".last.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / ".best.pt.def456.tmp").write_bytes(b"another path's temp")
    ckpt.atomic_save({"step": 5}, tmp_path / "last.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".best.pt.def456.tmp", "last.pt"]
    assert ckpt.load(tmp_path / "last.pt")["step"] == 5
