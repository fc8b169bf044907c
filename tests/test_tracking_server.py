"""A real MLflow tracking server on a real PostgreSQL, started by the project's own command
(scripts/tracking-server.sh), under load: 16 runs at once log every step while the server is
restarted; every run ends with each of its steps stored exactly once.

Runs where PostgreSQL (Debian's `postgresql`) and psycopg2 are installed; with CI=true a
missing one fails instead of skipping."""

from __future__ import annotations

import glob
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "tracking-server.sh"
pytestmark = pytest.mark.slow

RUNS, STEPS = 16, 120  # metrics reach the server every 50 steps and at the end (sslpipe.tracking.Run)
TRAIN = ["stage=pretrain", f"stage.max_steps={STEPS}", "stage.epochs=100", "stage.batch_size=32", "stage.log_every=1",
         "stage.monitor.every=0", "backbone.width=4", "backbone.num_features=16", "tracking.experiment=load"]


def _missing() -> str | None:
    if not glob.glob("/usr/lib/postgresql/*/bin/initdb"):
        return "PostgreSQL is not installed (apt-get install postgresql)"
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        return "psycopg2 is not installed (pip install -e '.[server]')"
    return None


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    why = _missing()
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {why}")
        pytest.skip(why)
    folder = tmp_path_factory.mktemp("server")
    port, pg_port = random.randint(20000, 29999), random.randint(30000, 39999)
    env = {**os.environ, "SSLPIPE_SERVER_DIR": str(folder / "server"), "SSLPIPE_SERVER_PORT": str(port),
           "SSLPIPE_PG_PORT": str(pg_port), "SSLPIPE_PYTHON": sys.executable}

    def command(what: str) -> str:
        done = subprocess.run([str(SCRIPT), what], cwd=folder, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{what}: {done.stdout}\n{done.stderr}"
        return done.stdout

    started = command("start")
    uri = f"http://127.0.0.1:{port}"
    assert f"export MLFLOW_TRACKING_URI={uri}" in started
    yield uri, command, folder
    command("stop")
    assert "PostgreSQL: stopped" in command("status")


def test_sixteen_runs_lose_and_duplicate_no_step_across_a_server_restart(server):
    from mlflow.tracking import MlflowClient

    uri, command, folder = server
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "sslpipe", *TRAIN, f"seed={i}", f"hydra.run.dir=runs/{i}"],
                              cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for i in range(RUNS)]
    client = MlflowClient(uri)

    def stored_steps() -> int:
        experiment = client.get_experiment_by_name("load")
        runs = client.search_runs([experiment.experiment_id]) if experiment else []
        return max((len(client.get_metric_history(r.info.run_id, "train/loss")) for r in runs), default=0)

    deadline = time.time() + 600
    while stored_steps() < 50 and time.time() < deadline:  # the first flushes have reached the server
        assert all(p.poll() in (None, 0) for p in procs), [p.stderr.read()[-2000:] for p in procs if p.poll()]
        time.sleep(0.5)
    restarted_while_running = sum(p.poll() is None for p in procs)
    command("restart")  # the server goes away for its whole start-up (~10-30 s) while runs log
    errors = [p.communicate(timeout=900)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for p, e in zip(procs, errors) if p.returncode]
    assert restarted_while_running >= 4, restarted_while_running

    runs = client.search_runs([client.get_experiment_by_name("load").experiment_id], max_results=100)
    assert len(runs) == RUNS and {r.data.params["seed"] for r in runs} == {str(i) for i in range(RUNS)}
    for r in runs:
        assert r.info.status == "FINISHED"
        for key in ("train/loss", "train/lr"):
            steps = sorted(m.step for m in client.get_metric_history(r.info.run_id, key))
            assert steps == list(range(1, STEPS + 1)), (r.data.params["seed"], key, len(steps))  # none lost, none twice
        assert {a.path for a in client.list_artifacts(r.info.run_id)} >= {"config.yaml", "checkpoints"}
