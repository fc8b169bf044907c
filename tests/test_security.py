"""Security: checkpoints load with weights_only (no pickled code runs), secrets in tracking
URIs never reach params or artefacts."""

from __future__ import annotations

import os
import pickle

import pytest
from mlflow.tracking import MlflowClient

from conftest import FAST_PRETRAIN
from sslpipe.pretrained import pretrained_parts
from sslpipe.tracking import redact


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_checkpoint_with_code_is_refused_and_never_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"encoder": _Payload()}, f)
    with pytest.raises(ValueError, match="not a loadable checkpoint"):
        pretrained_parts(str(path))
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("text,secret", [
    ("postgresql://alice:hunter2@db.example/mlflow", "hunter2"),
    ("https://bob:s3cr3t@mlflow.example", "s3cr3t"),
    ("https://mlflow.example/?token=abc123&x=1", "abc123"),
])
def test_redact(text, secret):
    out = redact(text)
    assert secret not in out and "***" in out


def test_secret_in_tracking_uri_reaches_no_param_or_artifact(cli):
    store = cli.store
    out = cli("stage=pretrain", *FAST_PRETRAIN, "tracking.uri=postgresql://alice:hunter2@db.example/mlflow",
              env={"MLFLOW_TRACKING_URI": store})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "hunter2" not in out.stdout + out.stderr
    client = MlflowClient(tracking_uri=store)
    run = client.search_runs([client.get_experiment_by_name("sslpipe").experiment_id])[0]
    assert run.data.params["tracking.uri"] == "postgresql://alice:***@db.example/mlflow"
    assert not any("hunter2" in v for v in run.data.params.values())
    config = client.download_artifacts(run.info.run_id, "config.yaml", str(cli.cwd))
    text = open(config).read()
    assert "hunter2" not in text and "alice:***@" in text
