"""Faults: a non-finite loss keeps the last good checkpoint; SIGKILL at random moments never
leaves a torn checkpoint, and the resumed run ends where an uninterrupted one does."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from sslpipe import checkpoint as ckpt
from sslpipe.data import EpochLoader, Split
from sslpipe.engine import Loop, LoopSettings, NonFiniteLossError


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    data = Split(torch.randint(0, 255, (64, 1, 2, 2), dtype=torch.uint8), torch.zeros(64, dtype=torch.long))
    loader = EpochLoader(data, 8, shuffle=True, drop_last=True)
    calls = {"n": 0}

    def step(x, y, progress):
        calls["n"] += 1
        loss = model(x.float().flatten(1) / 255).pow(2).mean()
        return loss * float("nan") if calls["n"] == 6 else loss

    path = tmp_path / "last.pt"
    loop = Loop(model, step, torch.optim.SGD(model.parameters(), lr=0.1), loader,
                LoopSettings(epochs=3, checkpoint_every=2, log_every=1), torch.device("cpu"), path)
    with pytest.raises(NonFiniteLossError, match="at step 5"):
        loop.run()
    saved = ckpt.load(path)
    assert saved["loop"]["step"] == 4  # the last good one, not overwritten by the NaN step
    assert all(torch.isfinite(v).all() for v in saved["model"].values())


def test_nan_loss_on_the_cli_is_a_clear_error(cli):
    out = cli("stage=pretrain", "stage.max_steps=3", "stage.batch_size=64", "stage.optimizer.lr=1e20",
              "stage.warmup_epochs=0")
    assert out.returncode != 0
    assert "loss became nan" in out.stderr and "Traceback" not in out.stderr


RUN = ["stage=pretrain", "stage.epochs=2", "stage.batch_size=64", "stage.checkpoint_every=1", "stage.log_every=1",
       "backbone.width=8", "backbone.num_features=32"]


def _final_weights(run_dir: Path) -> dict:
    return ckpt.load(run_dir / "checkpoints" / "final.pt")["encoder"]


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume(tmp_path):
    reference = run_cli([*RUN, "hydra.run.dir=outputs/reference"], tmp_path)
    assert reference.returncode == 0, reference.stderr[-2000:]

    run_dir = tmp_path / "outputs" / "killed"
    rng = random.Random(1234)
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    kills = 0
    for _ in range(4):
        proc = subprocess.Popen([sys.executable, "-m", "sslpipe", *RUN, f"hydra.run.dir={run_dir}"], cwd=tmp_path,
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while not (run_dir / "checkpoints" / "last.pt").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.5))  # somewhere in training, maybe mid-write of a checkpoint
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        for f in (run_dir / "checkpoints").glob("*.pt"):  # every checkpoint on disk loads: none is torn
            ckpt.load(f)
    assert kills >= 2
    done = run_cli([*RUN, f"hydra.run.dir={run_dir}"], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))  # no temp files left behind by the finished run
    a, b = _final_weights(tmp_path / "outputs" / "reference"), _final_weights(run_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bitwise on CPU: same data order, same RNG, same steps

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/outputs/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("sslpipe").experiment_id])
    assert len(runs) == 2  # the killed-and-resumed run kept one MLflow run
