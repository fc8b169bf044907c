"""Shared fixtures. End-to-end tests run the real CLI in a subprocess, in a temporary
working directory, so outputs/ and the SQLite MLflow store land there."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_cli(args: list[str], cwd: Path, env: dict | None = None, timeout: int = 600, module: str = "sslpipe"):
    """`python -m sslpipe <args>` in `cwd`; returns the CompletedProcess (text output)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), **(env or {})}
    full_env.pop("MLFLOW_TRACKING_URI", None) if env is None or "MLFLOW_TRACKING_URI" not in env else None
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def cli(tmp_path):
    """Run the CLI in tmp_path; asserts nothing itself."""
    def _run(*args: str, env: dict | None = None, timeout: int = 600):
        return run_cli(list(args), tmp_path, env=env, timeout=timeout)
    _run.cwd = tmp_path
    _run.store = f"sqlite:///{tmp_path}/outputs/mlflow.db"
    return _run


# Shrunk budgets for end-to-end runs on the embedded digits data.
FAST_PRETRAIN = ["stage.pretrain.loop.epochs=1", "stage.pretrain.loop.max_steps=3", "stage.pretrain.batch_size=64"]
FAST_PIPELINE = ["stage.pretrain.loop.max_steps=3", "stage.pretrain.batch_size=64", "stage.linear_probe.epochs=2",
                 "stage.finetune.loop.max_steps=2", "stage.finetune.loop.epochs=1"]
