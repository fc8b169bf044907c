"""Upload what `tracking.mode=offline` runs wrote (each run folder's own store, `<run
folder>/tracking/`) into the shared store, once the network is reachable:

    python -m sslpipe.sync <run folders or a multirun folder> [--uri <tracking uri>]

Default target: MLFLOW_TRACKING_URI, else the project's `outputs/mlflow.db` under the current
folder. Idempotent: each offline run becomes one run in the target, found again on the next
sync by its tag `sslpipe.offline_run_id`; a sync adds only the metric values (by key, step and
timestamp), params and tags the target lacks, and uploads the artefacts again (same paths). The
hierarchy is kept: a child's `mlflow.parentRunId` names its parent's run in the target.

Written by hand: MLflow has no command that merges one store's runs into another
(`mlflow experiments export/import` belongs to the separate mlflow-export-import project,
which creates new runs on every import)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse

from sslpipe.tracking import check_sqlite_location, default_store, retry

OFFLINE_ID = "sslpipe.offline_run_id"


def find_stores(paths: list[str | Path]) -> list[Path]:
    """Every offline store (`tracking/mlflow.db`) in or under the given folders."""
    found: list[Path] = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise FileNotFoundError(f"{p} is not a folder; give run folders or a multirun folder")
        found += [p / "tracking" / "mlflow.db"] if (p / "tracking" / "mlflow.db").exists() else []
        found += [db for db in sorted(p.rglob("tracking/mlflow.db")) if db not in found]
    return found


def _artifact_location(target) -> str | None:
    """Where a new experiment's artefacts go: beside a SQLite store, as the project's runs do
    (`outputs/mlartifacts` next to `outputs/mlflow.db`); a server's own store otherwise."""
    uri = target.tracking_uri
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).absolute().parent / "mlartifacts").as_uri()
    return None


def _local(uri: str) -> Path:
    return Path(unquote(urlparse(uri).path)) if uri.startswith("file:") else Path(uri)


def _parents_first(runs: list) -> list:
    ids = {r.info.run_id for r in runs}
    depth = {}

    def level(run) -> int:
        parent = run.data.tags.get("mlflow.parentRunId")
        if run.info.run_id not in depth:
            depth[run.info.run_id] = 0 if parent not in ids else 1 + level(by_id[parent])
        return depth[run.info.run_id]

    by_id = {r.info.run_id: r for r in runs}
    return sorted(runs, key=level)


def sync_store(db: Path, target) -> dict[str, int]:
    """Upload one offline store into `target` (an MlflowClient); returns counts of what was new."""
    from mlflow.entities import Metric, Param, RunTag, ViewType
    from mlflow.tracking import MlflowClient

    source = MlflowClient(tracking_uri=f"sqlite:///{db.absolute()}")
    counts = {"runs": 0, "metrics": 0, "params": 0}
    for experiment in source.search_experiments(view_type=ViewType.ALL):
        found = retry(lambda: target.get_experiment_by_name(experiment.name), "finding the experiment")
        experiment_id = found.experiment_id if found else retry(
            lambda: target.create_experiment(experiment.name, artifact_location=_artifact_location(target)),
            "creating the experiment")
        runs = source.search_runs([experiment.experiment_id], run_view_type=ViewType.ALL, max_results=50000)
        mapped: dict[str, str] = {}
        for run in _parents_first(runs):
            tags = dict(run.data.tags)
            if tags.get("mlflow.parentRunId") in mapped:
                tags["mlflow.parentRunId"] = mapped[tags["mlflow.parentRunId"]]
            tags[OFFLINE_ID] = run.info.run_id
            there = target.search_runs([experiment_id], filter_string=f"tags.`{OFFLINE_ID}` = '{run.info.run_id}'",
                                       run_view_type=ViewType.ALL)
            if there:
                run_id = there[0].info.run_id
            else:
                run_id = retry(lambda: target.create_run(experiment_id, start_time=run.info.start_time, tags=tags,
                                                         run_name=run.info.run_name), "creating the run").info.run_id
                counts["runs"] += 1
            mapped[run.info.run_id] = run_id
            have = target.get_run(run_id).data
            params = [Param(k, v) for k, v in run.data.params.items() if k not in have.params]
            new_tags = [RunTag(k, v) for k, v in tags.items() if have.tags.get(k) != v]
            metrics = []
            for key in run.data.metrics:
                stored = {(m.step, m.timestamp, m.value) for m in target.get_metric_history(run_id, key)}
                metrics += [Metric(key, m.value, m.timestamp, m.step) for m in source.get_metric_history(run.info.run_id, key)
                            if (m.step, m.timestamp, m.value) not in stored]
            for i in range(0, max(len(params), len(new_tags)), 100):  # log_batch's limits: 100 params / tags,
                retry(lambda: target.log_batch(run_id, params=params[i : i + 100], tags=new_tags[i : i + 100]),
                      "writing params and tags")
            for i in range(0, len(metrics), 1000):  # ... 1000 metric values
                retry(lambda: target.log_batch(run_id, metrics=metrics[i : i + 1000]), "writing metrics")
            counts["metrics"] += len(metrics)
            counts["params"] += len(params)
            artifacts = _local(run.info.artifact_uri)
            if artifacts.is_dir() and any(artifacts.iterdir()):
                retry(lambda: target.log_artifacts(run_id, str(artifacts)), "uploading artefacts")
            if run.info.status != "RUNNING":
                retry(lambda: target.set_terminated(run_id, run.info.status, run.info.end_time), "ending the run")
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sslpipe.sync", description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", help="run folders, or a multirun folder holding them")
    parser.add_argument("--uri", default=None, help="target store (default: MLFLOW_TRACKING_URI, else ./outputs/mlflow.db)")
    args = parser.parse_args(argv)
    from mlflow.tracking import MlflowClient

    uri = args.uri or default_store()
    try:
        stores = find_stores(args.folders)
        check_sqlite_location(uri)
    except (FileNotFoundError, ValueError) as err:
        print(f"sync: {err}", file=sys.stderr)
        return 2
    if not stores:
        print(f"sync: no offline store (tracking/mlflow.db) under {' '.join(args.folders)}; runs write one with "
              "tracking.mode=offline", file=sys.stderr)
        return 2
    target = MlflowClient(tracking_uri=uri)
    for db in stores:
        counts = sync_store(db, target)
        print(f"{db}: {counts['runs']} new runs, {counts['metrics']} metric values, {counts['params']} params -> {uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
