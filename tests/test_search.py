"""Hyper-parameter search through Hydra's Optuna sweeper (`hydra/sweeper=search`): trials are
runs that return a validation metric; the study maximises it and reports the best trial. The
same study on the real SLURM cluster is in tests/test_slurm.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import run_cli

pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="pip install sslpipe[search]")

# 4 trials of a short pipeline (10 pretrain steps, then the cached linear probe), SimCLR's
# temperature searched; the objective is the probe's val/top1, never its test/top1.
STUDY = ["-m", "hydra/sweeper=search", "objective=linear_probe/val/top1", "stage.stages=[linear_probe]",
         "stage.baseline=[]", "stage.pretrain.loop.max_steps=10", "backbone.width=8", "backbone.num_features=32",
         "stage.linear_probe.epochs=20", "hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=2",
         "method.temperature=interval(0.05,0.5)", "hydra.sweep.dir=multirun"]


def check_study(cwd: Path) -> None:
    """4 trials, each a pipeline parent run tagged with the study and its trial number; the
    reported best value is the best trial's linear probe val/top1, with that trial's temperature."""
    client = MlflowClient(f"sqlite:///{cwd}/outputs/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("sslpipe").experiment_id], max_results=200)
    parents = [r for r in runs if r.data.tags["sslpipe.stage"] == "pipeline"]
    assert sorted(r.data.tags["sslpipe.trial"] for r in parents) == ["0", "1", "2", "3"]
    assert {r.data.tags["sslpipe.study"] for r in runs} == {"simclr-digits"}
    probes = {r.data.tags["mlflow.parentRunId"]: r for r in runs if r.data.tags["sslpipe.stage"] == "linear_probe"}
    trials = [(probes[p.info.run_id].data.metrics["val/top1"], float(p.data.params["method.temperature"]))
              for p in parents]
    assert len({t for _, t in trials}) == 4  # four different temperatures proposed
    best = yaml.safe_load((cwd / "multirun" / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(max(v for v, _ in trials))
    assert best["best_params"]["method.temperature"] in [t for v, t in trials if v == max(v for v, _ in trials)]
    # sslpipe.report shows the study's trials, the best first
    out = run_cli(["--filter", "study=simclr-digits", "--filter", "stage=linear_probe", "--group-by",
                   "trial,method.temperature", "--metrics", "val/top1", "--best-first"], cwd, module="sslpipe.report")
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 4, out.stdout
    values = [float(row.split("|")[-2].split()[0]) for row in rows]  # the last column: val/top1 (mean)
    assert values == sorted(values, reverse=True) and values[0] == pytest.approx(best["best_value"], abs=1e-4), out.stdout


@pytest.mark.slow
def test_optuna_study_of_four_trials_maximises_the_probe_val_top1(tmp_path):
    out = run_cli(STUDY, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Best value:" in out.stdout + out.stderr
    check_study(tmp_path)


def test_a_test_metric_objective_is_refused(cli):
    out = cli("stage=knn", "pretrained=random", "objective=test/top1")
    assert out.returncode != 0
    assert "objective=test/top1" in out.stderr and "val/top1" in out.stderr and "Traceback" not in out.stderr


def test_an_unknown_objective_names_the_metrics_there_are(cli):
    out = cli("stage=knn", "pretrained=random", "objective=val/top5")
    assert out.returncode != 0
    assert "objective=val/top5 is not a metric" in out.stderr and "val/top1" in out.stderr
