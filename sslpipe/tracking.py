"""MLflow tracking: one run per stage, nested under a pipeline's parent run.

Metrics are buffered and written with `log_batch` (one round trip for many values), so
logging never costs a training step more than a list append. Only rank 0 writes;
elsewhere `Tracker.start_run` returns a run that does nothing."""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from sslpipe.distributed import is_main

log = logging.getLogger(__name__)

# An MLflow param value holds at most 6000 characters; log_batch takes at most 100 params.
_PARAM_MAX, _BATCH_PARAMS = 6000, 100


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def tracking_uri(configured: str) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or configured


class Run:
    """A started MLflow run; metrics go through a buffer flushed every `flush_every` steps."""

    def __init__(self, client, run_id: str, flush_every: int = 50):
        self.client, self.id, self.flush_every = client, run_id, flush_every
        self._buffer: list = []
        self._calls = 0

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._buffer += [Metric(k, float(v), now, int(step)) for k, v in metrics.items()]
        self._calls += 1
        if self._calls % self.flush_every == 0:
            self.flush()

    def flush(self) -> None:
        while self._buffer:
            chunk = self._buffer[:1000]  # MLflow's log_batch limit
            self.client.log_batch(self.id, metrics=chunk)
            del self._buffer[: len(chunk)]

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:_PARAM_MAX]) for k, v in params.items()]
        for i in range(0, len(items), _BATCH_PARAMS):
            self.client.log_batch(self.id, params=items[i : i + _BATCH_PARAMS])

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.id, text, artifact_file)

    def end(self, status: str = "FINISHED") -> None:
        self.flush()
        self.client.set_terminated(self.id, status=status)


class NullRun(Run):
    """What ranks other than 0 get: every call does nothing."""

    def __init__(self):
        self.id = None

    def log_metrics(self, metrics, step): pass
    def flush(self): pass
    def log_params(self, params): pass
    def set_tags(self, tags): pass
    def log_artifact(self, path, artifact_path=None): pass
    def log_text(self, text, artifact_file): pass
    def end(self, status="FINISHED"): pass


class Tracker:
    def __init__(self, uri: str, experiment: str, artifact_root: str | None = None):
        self.uri = tracking_uri(uri)
        self.experiment_name, self.artifact_root = experiment, artifact_root
        self._client = None
        self._experiment_id = None

    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            if self.uri.startswith("sqlite:///"):
                Path(self.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            found = self.client.get_experiment_by_name(self.experiment_name)
            if found is not None:
                self._experiment_id = found.experiment_id
            else:
                location = None
                if self.artifact_root and "://" not in self.artifact_root:
                    location = Path(self.artifact_root).resolve().as_uri()
                elif self.artifact_root:
                    location = self.artifact_root
                self._experiment_id = self.client.create_experiment(self.experiment_name, artifact_location=location)
        return self._experiment_id

    def start_run(self, name: str, tags: dict[str, Any], parent_id: str | None = None,
                  run_id: str | None = None) -> Run:
        """A new run, or the existing `run_id` (resume) set back to RUNNING."""
        if not is_main():
            return NullRun()
        if run_id is not None:
            self.client.update_run(run_id, status="RUNNING")
            return Run(self.client, run_id)
        tags = {k: str(v) for k, v in tags.items()}
        if parent_id:
            tags["mlflow.parentRunId"] = parent_id
        commit = git_commit()
        if commit:
            tags["mlflow.source.git.commit"] = commit
        created = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        return Run(self.client, created.info.run_id)


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
