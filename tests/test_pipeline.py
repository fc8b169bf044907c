"""End to end: `python -m sslpipe stage=pipeline` on digits, checked through the MLflow store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from sslpipe.config import build, compose
from sslpipe.tensorfiles import read_tensors

pytestmark = pytest.mark.slow

PIPELINE = ["stage.pretrain.loop.max_steps=30", "stage.pretrain.batch_size=128", "stage.pretrain.loop.log_every=1",
            "stage.pretrain.loop.warmup_epochs=0", "stage.linear_probe.epochs=20", "stage.finetune.loop.max_steps=20",
            "stage.finetune.loop.epochs=3"]


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    from conftest import run_cli

    cwd = tmp_path_factory.mktemp("pipeline")
    out = run_cli([*PIPELINE, "hydra.run.dir=outputs/run"], cwd)
    assert out.returncode == 0, out.stderr[-3000:]
    return cwd, out


def _runs(cwd: Path):
    client = MlflowClient(tracking_uri=f"sqlite:///{cwd}/outputs/mlflow.db")
    exp = client.get_experiment_by_name("sslpipe")
    return client, client.search_runs([exp.experiment_id], max_results=100)


def test_prints_results_table(pipeline_run):
    _, out = pipeline_run
    assert "| step | pretrained | test/top1" in out.stdout
    for row in ("| knn | simclr |", "| linear_probe | simclr |", "| finetune | simclr |", "| knn | random |",
                "| linear_probe | random |"):
        assert row in out.stdout


def test_mlflow_parent_and_children(pipeline_run):
    cwd, _ = pipeline_run
    client, runs = _runs(cwd)
    parents = [r for r in runs if r.data.tags.get("sslpipe.stage") == "pipeline"]
    assert len(parents) == 1
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    stages = sorted(r.data.tags["sslpipe.stage"] for r in children)
    assert stages == sorted(["pretrain", "knn", "linear_probe", "finetune", "export", "knn", "linear_probe"])
    for r in [parent, *children]:
        for tag in ("sslpipe.stage", "sslpipe.method", "sslpipe.backbone", "sslpipe.dataset", "sslpipe.world_size"):
            assert tag in r.data.tags, (tag, r.data.tags)
        assert r.data.tags["sslpipe.method"] == "simclr"
        assert r.data.params["method.temperature"] == "0.2"  # flattened, dotted params
        assert r.info.status == "FINISHED"
    top1 = {}
    for r in children:
        if r.data.tags["sslpipe.stage"] in ("knn", "linear_probe", "finetune"):
            top1[r.data.tags["sslpipe.stage"], r.data.tags["sslpipe.pretrained"] == "random"] = r.data.metrics["test/top1"]
            assert "val/top1" in r.data.metrics and "test/f1_macro" in r.data.metrics
            names = [a.path for a in client.list_artifacts(r.info.run_id)]
            assert "classification_report.json" in names and "config.yaml" in names
    # thresholds from the random-init baselines measured in the same run, not fixed numbers
    assert top1["knn", False] > top1["knn", True] and top1["linear_probe", False] > top1["linear_probe", True], top1
    # (fine-tune here is 20 steps of a fresh head: test_default_run_beats_random_init_and_fine_tunes_well
    # holds it to the README's level)
    knn = [r for r in children if r.data.tags["sslpipe.stage"] == "knn" and r.data.tags["sslpipe.pretrained"] != "random"][0]
    assert knn.data.params["protocol.k"] == "20" and knn.data.params["protocol.temperature"] == "0.07"


def test_train_loss_falls(pipeline_run):
    cwd, _ = pipeline_run
    client, runs = _runs(cwd)
    pre = [r for r in runs if r.data.tags.get("sslpipe.stage") == "pretrain"][0]
    history = sorted(client.get_metric_history(pre.info.run_id, "train/loss"), key=lambda m: m.step)
    assert [m.step for m in history] == list(range(1, 31))
    first, last = sum(m.value for m in history[:5]) / 5, sum(m.value for m in history[-5:]) / 5
    assert last < first - 0.1, (first, last)
    for key in ("train/lr", "train/images_per_s"):
        assert client.get_metric_history(pre.info.run_id, key)


def test_export_loads_strictly_and_gives_same_features(pipeline_run):
    cwd, _ = pipeline_run
    export = cwd / "outputs" / "run" / "export"
    manifest = json.loads((export / "manifest.json").read_text())
    assert manifest["objective"] == "info_nce"
    assert manifest["downstream"]["compatible"][:3] == ["st-vision/classification", "st-nn/linear-probe", "st-nn/fine-tune"]
    assert manifest["recommended"] == {"batch_size": 256, "learning_rate": 0.005, "weight_decay": 0.0005,
                                       "warmup_epochs": 5, "total_epochs": 90}
    assert set(manifest["files"]) == {"encoder", "projector", "linear_head"}
    assert "linear_probe/test/top1" in manifest["metrics"]
    assert manifest["provenance"]["mlflow_run_id"]

    cfg = compose([])
    fresh = build(cfg.backbone)
    fresh.load_state_dict(read_tensors(export / "encoder.safetensors"), strict=True)
    final = torch.load(cwd / "outputs" / "run" / "pretrain" / "checkpoints" / "final.pt", weights_only=True)
    trained = build(cfg.backbone)
    trained.load_state_dict(final["encoder"], strict=True)
    x = torch.randn(8, 1, 16, 16)
    fresh.eval(), trained.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), trained(x))
    head = read_tensors(export / "linear_head.safetensors")
    assert head["weight"].shape == (10, fresh.num_features)


def test_probe_from_export_folder_and_runs_uri(pipeline_run):
    from conftest import run_cli

    """The export folder and the pretrain run's URI hold the pipeline's own encoder: a kNN from
    either scores exactly the pipeline's kNN test/top1 (same encoder, same data)."""
    cwd, _ = pipeline_run
    export = cwd / "outputs" / "run" / "export"
    _, before = _runs(cwd)
    [own] = [r.data.metrics["test/top1"] for r in before if r.data.tags.get("sslpipe.stage") == "knn"
             and r.data.tags.get("sslpipe.pretrained") != "random"]
    out = run_cli(["stage=knn", f"pretrained={export}"], cwd)
    assert out.returncode == 0, out.stderr[-2000:]
    client, runs = _runs(cwd)
    knn = [r for r in runs if r.data.params.get("pretrained.source") == str(export)]
    assert knn and knn[0].data.metrics["test/top1"] == own
    pre = [r for r in runs if r.data.tags.get("sslpipe.stage") == "pretrain"][0]
    out = run_cli(["stage=knn", f"pretrained=runs:/{pre.info.run_id}", "tracking.experiment=from-uri"], cwd)
    assert out.returncode == 0, out.stderr[-2000:]
    [from_uri] = client.search_runs([client.get_experiment_by_name("from-uri").experiment_id])
    assert from_uri.data.metrics["test/top1"] == own


def test_probe_without_pretrained_is_an_error(cli):
    out = cli("stage=linear_probe")
    assert out.returncode != 0
    assert "pretrained=random" in out.stderr


def test_default_run_beats_random_init_and_fine_tunes_well(cli):
    """`python -m sslpipe` with no arguments, as the README's main job (issue 2): the whole
    pipeline within 5 minutes on 2 cores, the pretrained encoder's linear probe at least 3
    points above random init's, fine-tuning at least 0.97 (the README reports the numbers)."""
    import time

    t0 = time.monotonic()
    out = cli(timeout=300)
    seconds = time.monotonic() - t0
    assert out.returncode == 0, out.stderr[-3000:]
    assert seconds < 300, seconds
    client = MlflowClient(tracking_uri=cli.store)
    runs = client.search_runs([client.get_experiment_by_name("sslpipe").experiment_id], max_results=100)
    top1 = {(r.data.tags["sslpipe.stage"], r.data.tags.get("sslpipe.pretrained") == "random"): r.data.metrics["test/top1"]
            for r in runs if r.data.tags.get("sslpipe.stage") in ("linear_probe", "finetune", "knn")}
    assert top1[("linear_probe", False)] >= top1[("linear_probe", True)] + 0.03, top1
    assert top1[("finetune", False)] >= 0.97, top1
    assert f"| linear_probe | simclr | {top1[('linear_probe', False)]:.4f} |" in out.stdout  # the printed table
