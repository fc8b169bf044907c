"""`python -m sslpipe.report`: mean +- std over seeds, checked against numbers computed
independently from the MLflow store that a real 2-method x 2-seed sweep filled."""

from __future__ import annotations

import csv
import statistics
import subprocess
import sys

import pytest
from conftest import FAST_PIPELINE, run_cli

from sslpipe.report import RunRow, aggregate, main, markdown, parse_filter, value


def _run(method: str, seed: int, top1: float, pretrained: str = "/x/final.pt", stage: str = "linear_probe") -> RunRow:
    tags = {"sslpipe.stage": stage, "sslpipe.method": method, "sslpipe.backbone": "smallcnn",
            "sslpipe.dataset": "digits", "sslpipe.pretrained": pretrained}
    return RunRow(f"{method}{seed}{pretrained}", tags, {"seed": str(seed)}, {"test/top1": top1})


def test_groups_and_statistics():
    runs = [_run("simclr", 0, 0.90), _run("simclr", 1, 0.94), _run("byol", 0, 0.80), _run("byol", 1, 0.70),
            _run("byol", 0, 0.50, pretrained="random"), _run("simclr", 0, 1.0, stage="pretrain")]
    runs[-1].metrics = {"train/final_loss": 1.0}  # no chosen metric: left out
    groups = aggregate(runs, ["method", "init"], ["test/top1"])
    assert [g.key for g in groups] == [("byol", "pretrained"), ("byol", "random"), ("simclr", "pretrained")]
    mean, std, n = groups[0].stats("test/top1")
    assert (mean, n) == (pytest.approx(0.75), 2) and std == pytest.approx(statistics.stdev([0.8, 0.7]))
    assert groups[1].stats("test/top1") == (0.5, 0.0, 1)
    text = markdown(groups, ["method", "init"], ["test/top1"], 3)
    assert "| byol | pretrained | 2 | 0,1 | 0.750 ± 0.071 |" in text
    assert "| byol | random | 1 | 0 | 0.500 |" in text  # one run: no spread to show


def test_other_label_fractions_and_budgets_are_rows_not_seeds():
    runs = [_run("simclr", 0, 0.90), _run("simclr", 1, 0.94), _run("simclr", 0, 0.70), _run("simclr", 0, 0.60)]
    for run, fraction in zip(runs, ("1.0", "1.0", "0.1", "0.1")):
        run.params["protocol.label_fraction"] = fraction
    runs[3].params["protocol.epochs"] = "10"  # another budget too
    groups = aggregate(runs, ["method"], ["test/top1"])
    assert [len(g.runs) for g in groups] == [1, 1, 2]  # only the two seeds at fraction 1.0 are averaged
    text = markdown(groups, ["method"], ["test/top1"], 2)
    assert text.splitlines()[0] == "| method | protocol | runs | seeds | test/top1 |"
    assert "| simclr | protocol.epochs=- protocol.label_fraction=0.1 | 1 | 0 | 0.70 |" in text
    assert "| simclr | protocol.epochs=10 protocol.label_fraction=0.1 | 1 | 0 | 0.60 |" in text
    assert "| simclr | protocol.epochs=- protocol.label_fraction=1.0 | 2 | 0,1 | 0.92 ± 0.03 |" in text


def test_fine_tunes_with_other_views_are_rows_not_seeds():
    """A fine-tune without jitter (stage.finetune.view.*) or without augmentation is another
    recipe; a default run logged before `view` existed (its "{}") groups with one logged after."""
    runs = [_run("simclr", s, top1, stage="finetune") for s, top1 in ((0, 0.90), (1, 0.91), (0, 0.92), (0, 0.93))]
    runs[1].params["stage.finetune.view"] = "{}"
    runs[2].params["stage.finetune.view.jitter_prob"] = "0.0"
    runs[3].params["stage.finetune.augment"] = "False"
    groups = aggregate(runs, ["method"], ["test/top1"])
    assert sorted(len(g.runs) for g in groups) == [1, 1, 2]
    text = markdown(groups, ["method"], ["test/top1"], 3)
    assert "stage.finetune.view.jitter_prob=0.0" in text and "stage.finetune.augment=False" in text


def test_report_of_real_runs_keeps_label_fractions_apart(tmp_path):
    for fraction in ("0.1", "1.0"):
        out = run_cli(["stage=linear_probe", "pretrained=random", "device=cpu", "stage.linear_probe.epochs=2",
                       f"dataset.fraction={fraction}"], tmp_path)
        assert out.returncode == 0, out.stderr[-2000:]
    out = _report(tmp_path, "--group-by", "method", "--metrics", "test/top1")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "| method | protocol | runs | seeds | test/top1 |" and len(lines) == 4, out.stdout
    assert any("protocol.label_fraction=0.1 | 1 | 0 |" in line for line in lines)
    assert any("protocol.label_fraction=1.0 | 1 | 0 |" in line for line in lines)


def test_linear_protocols_are_separate_rows_and_augmented_learns(tmp_path):
    """The published protocol (SGD on fresh crops of the frozen encoder) is a named protocol:
    its runs are never averaged with the cached probe's; and it learns (random smallcnn features
    of digits are linearly separable far above the 0.1 of chance)."""
    import mlflow

    for protocol in ("cached", "augmented"):
        out = run_cli(["stage=linear_probe", "pretrained=random", "device=cpu", "stage.linear_probe.epochs=2",
                       f"stage.linear_probe.protocol={protocol}", "stage.linear_probe.augmented.epochs=10"], tmp_path)
        assert out.returncode == 0, out.stderr[-2000:]
    out = _report(tmp_path, "--group-by", "method", "--metrics", "test/top1")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 4 and any("protocol.protocol=augmented" in line for line in lines), out.stdout
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path}/outputs/mlflow.db")
    found = {r.data.params["protocol.protocol"]: r for e in client.search_experiments()
             for r in client.search_runs([e.experiment_id]) if "protocol.protocol" in r.data.params}
    augmented = found["augmented"]
    assert augmented.data.metrics["test/top1"] > 0.6, augmented.data.metrics
    assert float(augmented.data.params["train.lr"]) == 0.1  # its own rate (batch 256), not the cached probe's


def test_filter_keys():
    run = _run("simclr", 3, 0.9)
    assert value(run, "stage") == "linear_probe" and value(run, "seed") == "3" and value(run, "init") == "pretrained"
    assert value(run, "tags.sslpipe.method") == "simclr" and value(run, "params.seed") == "3"
    assert parse_filter("method!=byol,dino") == ("method", True, {"byol", "dino"})


def test_user_errors(tmp_path, capsys):
    assert main(["--tracking-uri", f"sqlite:///{tmp_path}/none.db"]) == 2
    assert "no MLflow store at" in capsys.readouterr().err
    assert main(["--tracking-uri", f"sqlite:///{tmp_path}/none.db", "--filter", "method"]) == 2
    assert "is not KEY=VALUE" in capsys.readouterr().err


# ---------------------------------------------------------------- a real sweep, read back independently
@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("sweep")
    out = run_cli(["-m", "stage=pipeline", "method=simclr,byol", "seed=0,1", *FAST_PIPELINE,
                   "stage.stages=[knn,linear_probe]"], cwd)
    assert out.returncode == 0, out.stderr[-3000:]
    return cwd


def _expected(store: str, stage: str) -> dict[str, tuple[float, float, list[str]]]:
    """{method: (mean, sample std, seeds)} of test/top1 over the pretrained `stage` runs, straight from MLflow."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store)
    runs = client.search_runs([client.get_experiment_by_name("sslpipe").experiment_id], max_results=1000)
    by_method: dict[str, list] = {}
    for r in runs:
        if r.data.tags["sslpipe.stage"] == stage and r.data.tags["sslpipe.pretrained"] != "random":
            by_method.setdefault(r.data.tags["sslpipe.method"], []).append(r)
    return {m: (statistics.fmean(r.data.metrics["test/top1"] for r in rs),
                statistics.stdev(r.data.metrics["test/top1"] for r in rs),
                sorted(r.data.params["seed"] for r in rs)) for m, rs in by_method.items()}


def _report(cwd, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sslpipe.report", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_report_mean_std_per_method(sweep):
    out = _report(sweep, "--filter", "stage=linear_probe", "--filter", "init=pretrained", "--group-by", "method")
    assert out.returncode == 0, out.stderr
    expected = _expected(f"sqlite:///{sweep}/outputs/mlflow.db", "linear_probe")
    assert sorted(expected) == ["byol", "simclr"] and all(seeds == ["0", "1"] for _, _, seeds in expected.values())
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "| method | runs | seeds | test/top1 |" and len(lines) == 4, out.stdout
    for method, (mean, std, _) in expected.items():
        assert f"| {method} | 2 | 0,1 | {mean:.4f} ± {std:.4f} |" in lines, (method, mean, std, out.stdout)


@pytest.mark.slow
def test_report_csv_default_groups(sweep):
    target = sweep / "report" / "knn.csv"
    out = _report(sweep, "--filter", "stage=knn", "--format", "csv", "--output", str(target))
    assert out.returncode == 0, out.stderr
    rows = list(csv.DictReader(target.open()))
    assert {(r["method"], r["init"]) for r in rows} == {(m, i) for m in ("simclr", "byol") for i in ("pretrained", "random")}
    expected = _expected(f"sqlite:///{sweep}/outputs/mlflow.db", "knn")
    for r in rows:
        assert r["stage"] == "knn" and r["backbone"] == "smallcnn" and r["dataset"] == "digits" and r["runs"] == "2"
        if r["init"] == "pretrained":
            mean, std, _ = expected[r["method"]]
            assert float(r["test/top1_mean"]) == pytest.approx(mean, abs=1e-12)
            assert float(r["test/top1_std"]) == pytest.approx(std, abs=1e-12)
