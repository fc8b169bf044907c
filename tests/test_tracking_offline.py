"""Tracking where a cluster needs it: the default SQLite store refused on a network file system
(detection exercised on /proc/mounts text: no NFS server here), and offline runs uploaded
later by `python -m sslpipe.sync`, twice, into one copy of each run."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from conftest import run_cli
from sslpipe.tracking import StoreLocationError, check_sqlite_location, mount_of

MOUNTS = """\
proc /proc proc rw,nosuid,nodev,noexec,relatime 0 0
/dev/sda1 / ext4 rw,relatime 0 0
fileserver:/export/home /shared nfs4 rw,relatime,vers=4.2,hard,proto=tcp 0 0
tmpfs /shared/scratch tmpfs rw,nosuid,nodev 0 0
10.0.0.5@o2ib:/lustre /lus lustre rw,flock 0 0
//nas/lab /mnt/lab\\040data cifs rw,vers=3.0 0 0
"""


@pytest.mark.parametrize("path, fstype, point", [
    ("/shared/alice/proj/outputs/mlflow.db", "nfs4", "/shared"),
    ("/lus/proj/outputs/mlflow.db", "lustre", "/lus"),
    ("/mnt/lab data/outputs/mlflow.db", "cifs", "/mnt/lab data"),
])
def test_sqlite_on_a_network_file_system_is_refused_naming_it_and_the_ways_out(path, fstype, point):
    assert mount_of(Path(path), MOUNTS) == (point, fstype)
    with pytest.raises(StoreLocationError) as err:
        check_sqlite_location(f"sqlite:///{path}", MOUNTS)
    message = str(err.value)
    assert f"on {fstype} (mounted at {point})" in message and path in message
    assert "MLFLOW_TRACKING_URI" in message and "tracking.mode=offline" in message and "sslpipe.sync" in message


def test_local_file_systems_and_servers_pass():
    check_sqlite_location("sqlite:////shared/scratch/outputs/mlflow.db", MOUNTS)  # tmpfs inside the NFS mount
    check_sqlite_location("sqlite:////home/alice/outputs/mlflow.db", MOUNTS)      # ext4
    check_sqlite_location("http://tracking:5000", MOUNTS)                          # a server: no file here
    check_sqlite_location(f"sqlite:///{Path.cwd()}/outputs/mlflow.db")            # this machine's real mounts


def test_unknown_tracking_mode_is_a_clear_error(cli):
    out = cli("stage=knn", "pretrained=random", "tracking.mode=ofline")
    assert out.returncode != 0
    assert "tracking.mode='ofline'" in out.stderr and "offline" in out.stderr and "Traceback" not in out.stderr


# ---------------------------------------------------------------- offline, then sync
SWEEP = ["-m", "stage=pipeline", "stage.stages=[knn]", "stage.baseline=[]", "stage.pretrain.loop.max_steps=8",
         "stage.pretrain.loop.log_every=1", "backbone.width=8", "backbone.num_features=32", "method=simclr,byol",
         "tracking.mode=offline", "hydra.sweep.dir=multirun"]


def _sync(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return run_cli(list(args), cwd, module="sslpipe.sync")


def _all_runs(uri: str) -> list:
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    return [r for e in client.search_experiments() for r in
            client.search_runs([e.experiment_id], run_view_type=ViewType.ALL, max_results=1000)]


def _files(client, run_id: str, path: str | None = None) -> list[tuple[str, int]]:
    return sorted(x for a in client.list_artifacts(run_id, path)
                  for x in (_files(client, run_id, a.path) if a.is_dir else [(a.path, a.file_size)]))


@pytest.mark.slow
def test_offline_runs_synced_twice_land_once_with_everything(tmp_path):
    from mlflow.tracking import MlflowClient

    out = run_cli(SWEEP, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert not (tmp_path / "outputs" / "mlflow.db").exists()  # nothing reached the shared store
    stores = sorted((tmp_path / "multirun").rglob("tracking/mlflow.db"))
    assert len(stores) == 2
    offline = {r.info.run_id: (db, r) for db in stores for r in _all_runs(f"sqlite:///{db}")}
    assert len(offline) == 6  # per job: the pipeline's parent, pretrain and knn

    for attempt in range(2):
        done = _sync(tmp_path, "multirun")
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.count("new runs") == 2
    assert "0 new runs, 0 metric values, 0 params" in done.stdout  # the second sync adds nothing

    uri = f"sqlite:///{tmp_path}/outputs/mlflow.db"
    client = MlflowClient(uri)
    synced = _all_runs(uri)
    assert len(synced) == 6
    by_offline = {r.data.tags["sslpipe.offline_run_id"]: r for r in synced}
    assert by_offline.keys() == offline.keys()  # each offline run exactly once
    for source_id, (db, source) in offline.items():
        got = by_offline[source_id]
        assert got.data.params == source.data.params
        assert {k: v for k, v in got.data.tags.items() if k not in ("mlflow.parentRunId", "sslpipe.offline_run_id")} \
            == {k: v for k, v in source.data.tags.items() if k != "mlflow.parentRunId"}
        parent = source.data.tags.get("mlflow.parentRunId")
        assert (got.data.tags.get("mlflow.parentRunId") == by_offline[parent].info.run_id) if parent \
            else "mlflow.parentRunId" not in got.data.tags
        assert got.info.status == source.info.status == "FINISHED"
        src_client = MlflowClient(f"sqlite:///{db}")
        for key in source.data.metrics:
            want = sorted((m.step, m.value) for m in src_client.get_metric_history(source_id, key))
            have = sorted((m.step, m.value) for m in client.get_metric_history(got.info.run_id, key))
            assert have == want, key  # every step once
        shipped = _files(src_client, source_id)
        assert _files(client, got.info.run_id) == shipped
        assert shipped or source.data.tags["sslpipe.stage"] == "pipeline", source.data.tags  # stages log artefacts
    pretrain = [r for r in synced if r.data.tags["sslpipe.stage"] == "pretrain"]
    assert all(len(client.get_metric_history(r.info.run_id, "train/loss")) == 8 for r in pretrain)


def test_sync_names_a_missing_folder(tmp_path):
    out = _sync(tmp_path, "no-such-folder")
    assert out.returncode == 2 and "no-such-folder is not a folder" in out.stderr
    (tmp_path / "empty").mkdir()
    out = _sync(tmp_path, "empty")
    assert out.returncode == 2 and "no offline store" in out.stderr and "tracking.mode=offline" in out.stderr
