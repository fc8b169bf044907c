"""Faults: a non-finite loss keeps the last good checkpoint; SIGKILL at random moments never
leaves a torn checkpoint, and the resumed run ends where an uninterrupted one does."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from sslpipe import checkpoint as ckpt
from sslpipe.data.epochs import EpochLoader
from sslpipe.data.split import Split
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
    out = cli("stage=pretrain", "stage.pretrain.loop.max_steps=3", "stage.pretrain.batch_size=64", "stage.pretrain.optimizer.lr=1e20",
              "stage.pretrain.loop.warmup_epochs=0")
    assert out.returncode != 0
    assert "loss became nan" in out.stderr and "Traceback" not in out.stderr


RUN = ["stage=pretrain", "stage.pretrain.loop.epochs=2", "stage.pretrain.batch_size=64", "stage.pretrain.loop.checkpoint_every=1", "stage.pretrain.loop.log_every=1",
       "backbone.width=8", "backbone.num_features=32"]


def _final_weights(run_dir: Path) -> dict:
    return ckpt.load(run_dir / "checkpoints" / "final.pt")["encoder"]


PROGRESS = re.compile(r"\[progress\] pretrain \S+: step (\d+)/(\d+)")


def _kill_after_steps(proc: subprocess.Popen, steps: int) -> int | None:
    """Read the attempt's progress lines (one per optimizer step); SIGKILL it once it has
    trained `steps` steps of its own. Returns the last step it reported, None if it ended first."""
    first = None
    for line in proc.stdout:
        seen = PROGRESS.search(line)
        if seen:
            step = int(seen.group(1))
            first = step if first is None else first
            if step - first + 1 >= steps:
                proc.send_signal(signal.SIGKILL)
                return step
    return None


def _checkpoint_step(run_dir: Path) -> int:
    path = run_dir / "checkpoints" / "last.pt"
    return ckpt.load(path)["loop"]["step"] if path.exists() else 0


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume(tmp_path):
    """Each relaunch trains a random 2-5 steps of its own (read from its progress lines, one
    per step) and is SIGKILLed, maybe mid-write of its per-step checkpoint: four times, each
    leaving a loadable checkpoint further on than the last; the fifth run finishes bitwise as
    an uninterrupted one, in one MLflow run."""
    reference = run_cli([*RUN, "hydra.run.dir=outputs/reference"], tmp_path)
    assert reference.returncode == 0, reference.stderr[-2000:]

    run_dir = tmp_path / "outputs" / "killed"
    rng = random.Random(1234)
    env = {**os.environ, "OMP_NUM_THREADS": "2", "SSLPIPE_PROGRESS": "log", "SSLPIPE_PROGRESS_S": "0"}
    before = 0
    for attempt in range(4):
        proc = subprocess.Popen([sys.executable, "-m", "sslpipe", *RUN, f"hydra.run.dir={run_dir}"], cwd=tmp_path,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            steps = rng.randint(2, 5)
            killed_at = _kill_after_steps(proc, steps)
        finally:
            proc.kill() if proc.poll() is None else None
            proc.wait()
        assert killed_at is not None, f"attempt {attempt} ended before training {steps} steps"
        assert proc.returncode == -signal.SIGKILL
        for f in (run_dir / "checkpoints").glob("*.pt"):  # every checkpoint on disk loads: none is torn
            ckpt.load(f)
        after = _checkpoint_step(run_dir)
        # it resumed at `before` and reported step killed_at = before + steps; the checkpoint of the
        # step before that was complete (a kill mid-write of the next one keeps it)
        assert killed_at == before + steps and after >= killed_at - 1 > before, (attempt, before, killed_at, after)
        before = after
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
