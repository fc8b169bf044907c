"""MLflow tracking: one run per stage, nested under a pipeline's parent run.

Metrics are buffered and written with `log_batch` (one round trip for many values), so
logging never costs a training step more than a list append. Only rank 0 writes;
elsewhere `Tracker.start_run` returns a run that does nothing.

Many jobs share one store (a sweep of SLURM jobs writing to one SQLite file). MLflow already
sets SQLite's busy timeout (20 s), but SQLite still answers "database is locked" at once in
some cases (a reader upgrading to a writer), and a fresh file is being created by whichever
job comes first. So every write is retried with jittered exponential backoff; a metric flush
that still fails keeps its values in the buffer for the next flush instead of stopping
training; and what could not be written by the end of the run is saved to a JSON-lines file
(named in an error message) rather than lost. On resume, metric steps already in the store
are skipped, so a run killed between a flush and its checkpoint shows no step twice."""

from __future__ import annotations

import json
import logging
import os
import random
import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from sslpipe.distributed import is_main

log = logging.getLogger(__name__)

# An MLflow param value holds at most 6000 characters; log_batch takes at most 100 params.
_PARAM_MAX, _BATCH_PARAMS = 6000, 100


# no credentials in what MLflow stores: params, config.yaml, tags
_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]+):(?P<secret>[^@/\s]+)@")


def redact(text: str) -> str:
    """`postgresql://user:pw@host/db` -> `postgresql://user:***@host/db`; also `?token=` style secrets."""
    text = _CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)
    return re.sub(r"(?i)((?:token|password|secret|api_key|apikey)=)[^&\s]+", r"\1***", text)


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def tracking_uri(configured: str) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or configured


# File systems whose locking SQLite cannot rely on: "SQLite over a network, caveats and
# considerations" (sqlite.org/useovernet.html) and "How To Corrupt An SQLite Database File"
# section 2.1 (sqlite.org/howtocorrupt.html). NFS, SMB and the cluster file systems.
NETWORK_FS = frozenset({"nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "fuse.beegfs", "ceph",
                        "fuse.ceph", "glusterfs", "fuse.glusterfs", "fuse.sshfs", "9p", "afs", "panfs", "wekafs",
                        "fuse.juicefs", "orangefs", "pvfs2"})


class StoreLocationError(ValueError):
    """The default SQLite store would sit on a network file system."""


def mount_of(path: Path, mounts: str) -> tuple[str, str]:
    """(mount point, file system type) of the mount that holds `path` (which need not exist yet),
    from the text of /proc/mounts (whose fields escape spaces as \\040)."""
    path = Path(path).absolute()
    existing = path
    while not existing.exists() and existing != existing.parent:  # symlinks resolved where they exist
        existing = existing.parent
    here = str(existing.resolve() / path.relative_to(existing))
    best = ("/", "")
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].encode().decode("unicode_escape")
        inside = here == point or here.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best[0]):
            best = (point, fields[2])
    return best


def check_sqlite_location(uri: str, mounts: str | None = None) -> None:
    """Refuse a SQLite store on a network file system (see NETWORK_FS), naming the file system
    and the two ways out. `mounts`: /proc/mounts' text (read here when None; no check off Linux)."""
    if not uri.startswith("sqlite:///"):
        return
    db = Path(uri.removeprefix("sqlite:///"))
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return
    point, fstype = mount_of(db, mounts)
    if fstype in NETWORK_FS:
        raise StoreLocationError(
            f"the MLflow store {db} would be a SQLite file on {fstype} (mounted at {point}), a network file system: "
            "SQLite's locks are unreliable there and jobs writing at once can corrupt it (sqlite.org/useovernet.html). "
            "Either run an MLflow tracking server and set MLFLOW_TRACKING_URI=http://<host>:<port> (docs/cluster.md), "
            "or log offline with tracking.mode=offline and upload later: python -m sslpipe.sync <run folders>")


def offline_store(run_folder: Path) -> tuple[str, str]:
    """tracking.mode=offline: (uri, artifact root) of the run folder's own store, one writer,
    uploaded later by `python -m sslpipe.sync`."""
    folder = Path(run_folder).absolute() / "tracking"
    return f"sqlite:///{folder / 'mlflow.db'}", str(folder / "artifacts")


# Backoff for a store that is briefly unavailable: 0.05 s doubling to 5 s, within a budget.
RETRY_BUDGET_S = float(os.environ.get("SSLPIPE_TRACKING_RETRY_S", "120"))


def retry(fn, what: str, budget_s: float | None = None):
    """`fn()` until it succeeds or `budget_s` seconds have gone by (then its error is raised).
    Any error counts as transient: a locked SQLite file, a restarting tracking server."""
    budget = RETRY_BUDGET_S if budget_s is None else budget_s
    deadline, delay, attempt = time.monotonic() + budget, 0.05, 0
    while True:
        attempt += 1
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - mlflow/sqlalchemy raise many types for one cause
            if time.monotonic() + delay > deadline:
                raise
            if attempt == 3:
                log.warning("tracking store busy or unavailable (%s: %s); retrying %s", type(err).__name__,
                            str(err).splitlines()[0][:200], what)
            time.sleep(delay * random.uniform(0.5, 1.5))  # jitter: writers do not retry in lock-step
            delay = min(delay * 2, 5.0)


class Run:
    """A started MLflow run; metrics go through a buffer flushed every `flush_every` steps."""

    def __init__(self, client, run_id: str, flush_every: int = 50, resumed: bool = False, spill_dir: Path | None = None):
        self.client, self.id, self.flush_every = client, run_id, flush_every
        self._buffer: list = []
        self._calls = 0
        self.spill_dir = spill_dir
        # On resume: the last step already stored per metric key; those steps are not logged again.
        self._stored_until: dict[str, int] = self._stored_steps() if resumed else {}

    def _stored_steps(self) -> dict[str, int]:
        keys = retry(lambda: list(self.client.get_run(self.id).data.metrics), "reading the resumed run")
        return {k: max((m.step for m in retry(lambda: self.client.get_metric_history(self.id, k), "reading history")),
                       default=-1) for k in keys}

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._buffer += [Metric(k, float(v), now, int(step)) for k, v in metrics.items()
                         if int(step) > self._stored_until.get(k, -1)]
        self._calls += 1
        if self._calls % self.flush_every == 0:
            self.flush(budget_s=min(RETRY_BUDGET_S, 10.0), raise_errors=False)  # never stop training for the store

    def flush(self, budget_s: float | None = None, raise_errors: bool = True) -> None:
        """Write the buffered metrics. With `raise_errors=False` a store that stays unavailable
        leaves them buffered (logged once as a warning) for the next flush."""
        while self._buffer:
            chunk = self._buffer[:1000]  # MLflow's log_batch limit
            try:
                retry(lambda: self.client.log_batch(self.id, metrics=chunk), "writing metrics", budget_s)
            except Exception as err:  # noqa: BLE001
                if raise_errors:
                    raise
                log.warning("could not write %d metric values yet (%s); kept for the next flush", len(self._buffer), err)
                return
            del self._buffer[: len(chunk)]

    def _spill(self) -> Path:
        """The metrics that could not be written, as JSON lines, beside the store or here."""
        folder = self.spill_dir or Path.cwd()
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"unwritten-metrics-{self.id}.jsonl"
        with open(path, "a") as f:
            for m in self._buffer:
                f.write(json.dumps({"run_id": self.id, "key": m.key, "value": m.value, "timestamp": m.timestamp,
                                    "step": m.step}) + "\n")
        return path

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:_PARAM_MAX]) for k, v in params.items()]
        for i in range(0, len(items), _BATCH_PARAMS):
            chunk = items[i : i + _BATCH_PARAMS]
            retry(lambda: self.client.log_batch(self.id, params=chunk), "writing params")

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items()]
        retry(lambda: self.client.log_batch(self.id, tags=items), "writing tags")

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.id, text, artifact_file)

    def end(self, status: str = "FINISHED") -> None:
        try:
            self.flush()
        except Exception as err:  # noqa: BLE001 - the numbers must survive; say where they are
            path = self._spill()
            log.error("%d metric values of run %s could not be written to the tracking store (%s); saved to %s "
                      "(replay: python -m sslpipe.tracking replay %s)", len(self._buffer), self.id, err, path, path)
            self._buffer.clear()
        retry(lambda: self.client.set_terminated(self.id, status=status), "ending the run")


class NullRun(Run):
    """What ranks other than 0 get: every call does nothing."""

    def __init__(self):
        self.id = None

    def log_metrics(self, metrics, step): pass
    def flush(self, budget_s=None, raise_errors=True): pass
    def log_params(self, params): pass
    def set_tags(self, tags): pass
    def log_artifact(self, path, artifact_path=None): pass
    def log_text(self, text, artifact_file): pass
    def end(self, status="FINISHED"): pass


class Tracker:
    def __init__(self, uri: str, experiment: str, artifact_root: str | None = None, environment: bool = True):
        self.uri = tracking_uri(uri) if environment else uri  # environment: MLFLOW_TRACKING_URI wins
        self.experiment_name, self.artifact_root = experiment, artifact_root
        self._client = None
        self._experiment_id = None

    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            if not self.uri.startswith("sqlite:///"):
                self._client = MlflowClient(tracking_uri=self.uri)
            else:
                db = Path(self.uri.removeprefix("sqlite:///"))
                db.parent.mkdir(parents=True, exist_ok=True)
                # The first use of a SQLite file creates and migrates its tables. Two jobs doing
                # that at once leave it half-migrated for good ("table _alembic_tmp_... already
                # exists"), so the first use is serialised with a lock file beside it.
                import fcntl

                with open(db.with_name(db.name + ".init.lock"), "w") as lock:
                    fcntl.lockf(lock, fcntl.LOCK_EX)
                    client = MlflowClient(tracking_uri=self.uri)
                    retry(lambda: client.search_experiments(max_results=1), "opening the store")
                self._client = client
        return self._client

    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            self._experiment_id = retry(self._get_or_create_experiment, "opening the experiment")
        return self._experiment_id

    def _get_or_create_experiment(self) -> str:
        # A fresh store: several jobs may create its tables and the experiment at the same
        # moment; the losers fail and, retried, find what the winner made.
        found = self.client.get_experiment_by_name(self.experiment_name)
        if found is not None:
            return found.experiment_id
        location = None
        if self.uri.startswith(("http://", "https://")):
            location = None  # a tracking server stores artefacts where it was told (--artifacts-destination)
        elif self.artifact_root and "://" not in self.artifact_root:
            location = Path(self.artifact_root).resolve().as_uri()
        elif self.artifact_root:
            location = self.artifact_root
        return self.client.create_experiment(self.experiment_name, artifact_location=location)

    @property
    def spill_dir(self) -> Path | None:
        if self.uri.startswith("sqlite:///"):
            return Path(self.uri.removeprefix("sqlite:///")).parent / "unwritten"
        return None

    def start_run(self, name: str, tags: dict[str, Any], parent_id: str | None = None,
                  run_id: str | None = None) -> Run:
        """A new run, or the existing `run_id` (resume) set back to RUNNING."""
        if not is_main():
            return NullRun()
        if run_id is not None:
            retry(lambda: self.client.update_run(run_id, status="RUNNING"), "reopening the run")
            run = Run(self.client, run_id, resumed=True, spill_dir=self.spill_dir)
            run.set_tags(tags)  # this attempt's slurm.job_id and world size (a resubmitted job has a new id)
            return run
        tags = {k: str(v) for k, v in tags.items()}
        if parent_id:
            tags["mlflow.parentRunId"] = parent_id
        commit = git_commit()
        if commit:
            tags["mlflow.source.git.commit"] = commit
        experiment_id = self.experiment_id
        created = retry(lambda: self.client.create_run(experiment_id, run_name=name, tags=tags), "creating the run")
        return Run(self.client, created.info.run_id, spill_dir=self.spill_dir)


def open_tracker(tracking, folder: Path) -> Tracker:
    """The run's tracker: the shared store (`tracking.uri`, or MLFLOW_TRACKING_URI), refused when it
    is a SQLite file on a network file system; or with `tracking.mode=offline` a store in the run
    folder (`<run folder>/tracking/`), uploaded later by `python -m sslpipe.sync`."""
    mode = tracking.get("mode", "shared")
    if mode == "offline":
        uri, artifacts = offline_store(folder)
        return Tracker(uri, tracking.experiment, artifacts, environment=False)
    if mode != "shared":
        raise ValueError(f"tracking.mode={mode!r}: choose shared (tracking.uri or MLFLOW_TRACKING_URI) or offline "
                         "(a store in the run folder, uploaded later by python -m sslpipe.sync)")
    check_sqlite_location(tracking_uri(tracking.uri))
    return Tracker(tracking.uri, tracking.experiment, tracking.artifact_root)


def resolve_run_checkpoint(spec: str, uri: str | None = None) -> str:
    """runs:/<id> -> a local checkpoint: the path the run recorded (tag `sslpipe.checkpoint`)
    when it still exists here, else the run's `checkpoints/` artefact, downloaded."""
    from mlflow.tracking import MlflowClient

    run_id = spec.removeprefix("runs:/").strip("/").split("/")[0]
    client = MlflowClient(tracking_uri=tracking_uri(uri) if uri else os.environ.get("MLFLOW_TRACKING_URI"))
    try:
        run = client.get_run(run_id)
    except Exception as err:  # noqa: BLE001 - mlflow raises its own exception types per store
        raise FileNotFoundError(f"pretrained='{spec}': no MLflow run '{run_id}' in {client.tracking_uri} ({err})") from None
    local = run.data.tags.get("sslpipe.checkpoint")
    if local and Path(local).exists():
        return local
    target = tempfile.mkdtemp(prefix="sslpipe-run-")
    try:
        folder = client.download_artifacts(run_id, "checkpoints", target)
    except Exception as err:  # noqa: BLE001
        raise FileNotFoundError(f"pretrained='{spec}': run {run_id} has no checkpoints artefact ({err})") from None
    files = sorted(Path(folder).glob("*"))
    if not files:
        raise FileNotFoundError(f"pretrained='{spec}': run {run_id} has an empty checkpoints artefact")
    return str(files[0])


def default_store() -> str:
    """The store a run launched from here writes to: MLFLOW_TRACKING_URI, else conf/config.yaml's
    `tracking.uri`, `outputs/mlflow.db` under the launch folder (here)."""
    return tracking_uri(f"sqlite:///{Path.cwd() / 'outputs' / 'mlflow.db'}")


def replay(path: str | Path, uri: str | None = None) -> int:
    """Write a spilled `unwritten-metrics-<run id>.jsonl` into the store (default: the project's,
    `default_store()`); returns the count."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri or default_store())
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    for run_id in {r["run_id"] for r in rows}:
        metrics = [Metric(r["key"], r["value"], r["timestamp"], r["step"]) for r in rows if r["run_id"] == run_id]
        for i in range(0, len(metrics), 1000):
            chunk = metrics[i : i + 1000]
            retry(lambda: client.log_batch(run_id, metrics=chunk), "replaying metrics")
    return len(rows)


if __name__ == "__main__":  # python -m sslpipe.tracking replay <file> [<uri>]
    import sys

    if len(sys.argv) < 3 or sys.argv[1] != "replay":
        sys.exit("usage: python -m sslpipe.tracking replay <unwritten-metrics-*.jsonl> [<tracking uri>]")
    store = sys.argv[3] if len(sys.argv) > 3 else default_store()
    if not Path(sys.argv[2]).is_file():
        sys.exit(f"replay: no file {sys.argv[2]!r}; give the unwritten-metrics-<run id>.jsonl named in the run's log")
    print(f"replayed {replay(sys.argv[2], store)} metric values into {store}")
