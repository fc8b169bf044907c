"""A real MLflow tracking server on a real PostgreSQL, started by the project's own command
(scripts/tracking-server.sh), under load: 16 runs at once log every step while the server is
restarted; every run ends with each of its steps stored exactly once. The 16 runs are one SLURM
array job on the test cluster (scripts/slurm-cluster.sh declares 16 CPUs for this), or 16 local
processes where SLURM is absent and CI is not set.

Runs where PostgreSQL (Debian's `postgresql`) and psycopg2 are installed; with CI=true a
missing one (or a missing SLURM) fails instead of skipping."""

from __future__ import annotations

import glob
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "tracking-server.sh"
pytestmark = pytest.mark.slow

RUNS, STEPS = 16, 120  # metrics reach the server every 50 steps and at the end (sslpipe.tracking.Run)
TRAIN = ["stage=pretrain", f"stage.pretrain.loop.max_steps={STEPS}", "stage.pretrain.loop.epochs=100", "stage.pretrain.batch_size=32", "stage.pretrain.loop.log_every=1",
         "stage.pretrain.monitor.every=0", "backbone.width=4", "backbone.num_features=16", "tracking.experiment=load"]


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


class _Array:
    """The RUNS training runs as one SLURM array job (one task per run, all running at once on the
    test cluster), or as local processes where there is no SLURM."""

    def __init__(self, folder: Path, env: dict):
        self.folder = folder
        command = [sys.executable, "-m", "sslpipe", *TRAIN]
        if shutil.which("sbatch"):
            script = folder / "runs.sbatch"
            script.write_text("#!/bin/bash\n"
                              f"#SBATCH --array=0-{RUNS - 1} --ntasks=1 --cpus-per-task=1 --mem=1G\n"
                              f"#SBATCH --output={folder}/runs/%a.log --chdir={folder}\n"
                              f"exec {' '.join(command)} seed=$SLURM_ARRAY_TASK_ID hydra.run.dir=runs/$SLURM_ARRAY_TASK_ID\n")
            (folder / "runs").mkdir()
            done = subprocess.run(["sbatch", "--parsable", str(script)], env=env, capture_output=True, text=True,
                                  timeout=60)
            assert done.returncode == 0, done.stderr
            self.job, self.procs = done.stdout.strip().split(";")[0], None
        else:
            if os.environ.get("CI") == "true":
                pytest.fail("CI=true but sbatch is absent: scripts/slurm-cluster.sh install && scripts/slurm-cluster.sh start")
            self.job = None
            self.procs = [subprocess.Popen([*command, f"seed={i}", f"hydra.run.dir=runs/{i}"], cwd=folder, env=env,
                                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                          for i in range(RUNS)]

    def _queue(self, *state: str) -> list[str]:
        out = subprocess.run(["squeue", "-h", "-r", "-j", self.job, "-o", "%T", *state], capture_output=True,
                             text=True, timeout=30)
        return out.stdout.split()

    def running(self) -> int:
        return self._queue().count("RUNNING") if self.job else sum(p.poll() is None for p in self.procs)

    def pending(self) -> int:
        return self._queue().count("PENDING") if self.job else 0

    def failed(self) -> list[str]:
        """What the runs that ended badly wrote last."""
        if self.job:
            out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", self.job, "-o", "JobID,State"], capture_output=True,
                                 text=True, timeout=30).stdout
            bad = [line.split("|")[0].split("_")[-1] for line in out.split() if re.search(r"FAIL|CANCEL|TIMEOUT|OUT_OF", line)]
            return [(self.folder / "runs" / f"{i}.log").read_text()[-2000:] for i in bad]
        return [p.stderr.read()[-2000:] for p in self.procs if p.poll() not in (None, 0)]

    def wait(self, timeout: float) -> list[str]:
        """Wait for every run; return the logs of those that failed."""
        deadline = time.time() + timeout
        if self.job:
            while self._queue() and time.time() < deadline:
                time.sleep(1)
            assert not self._queue(), f"array {self.job} still queued after {timeout}s"
            time.sleep(2)  # accounting catches up with the last task
            out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", self.job, "-o", "JobID,State"], capture_output=True,
                                 text=True, timeout=30).stdout.split()
            assert len(out) == RUNS, out
            return self.failed() + [line for line in out if not line.endswith("COMPLETED")]
        errors = [p.communicate(timeout=max(1.0, deadline - time.time()))[1] for p in self.procs]
        return [e[-2000:] for p, e in zip(self.procs, errors) if p.returncode]


def test_sixteen_runs_lose_and_duplicate_no_step_across_a_server_restart(server):
    from mlflow.tracking import MlflowClient

    uri, command, folder = server
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1"}
    runs = _Array(folder, env)
    client = MlflowClient(uri)

    def stored_steps() -> int:
        experiment = client.get_experiment_by_name("load")
        found = client.search_runs([experiment.experiment_id]) if experiment else []
        return max((len(client.get_metric_history(r.info.run_id, "train/loss")) for r in found), default=0)

    deadline = time.time() + 600
    while stored_steps() < 50 and time.time() < deadline:  # the first flushes have reached the server
        assert not runs.failed(), runs.failed()
        time.sleep(0.5)
    restarted_while_running, pending = runs.running(), runs.pending()
    command("restart")  # the server goes away for its whole start-up (~10-30 s) while runs log
    failures = runs.wait(timeout=900)
    assert not failures, failures
    assert restarted_while_running >= 4, restarted_while_running
    # All 16 array tasks had started: the cluster fits them at once. Not all need still be running:
    # on two loaded cores the first flush reached the server after 6 of 16 runs had ended (CI, e854290).
    assert pending == 0, f"{pending} of {RUNS} array tasks still pending at the restart"

    found = client.search_runs([client.get_experiment_by_name("load").experiment_id], max_results=100)
    assert len(found) == RUNS and {r.data.params["seed"] for r in found} == {str(i) for i in range(RUNS)}
    for r in found:
        assert r.info.status == "FINISHED"
        for key in ("train/loss", "train/lr"):
            steps = sorted(m.step for m in client.get_metric_history(r.info.run_id, key))
            assert steps == list(range(1, STEPS + 1)), (r.data.params["seed"], key, len(steps))  # none lost, none twice
        assert {a.path for a in client.list_artifacts(r.info.run_id)} >= {"config.yaml", "checkpoints"}
