"""What watching a run costs: the pretrain stage with the online kNN and collapse signals at
their default interval (`stage.pretrain.monitor.every=auto`, about 10 checks) against the same run with
them off (`stage.pretrain.monitor.every=0`), alternating, through the real CLI; the stage's own time is
the MLflow run's start-to-end. Prints a markdown table with the ratio.

    OMP_NUM_THREADS=1 python benchmarks/monitor.py [--epochs 10 40] [--rounds 2] [--method simclr]

A script, not a test: minutes on a CPU."""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def stage_seconds(args: list[str], work: Path, method: str) -> tuple[float, int]:
    """Seconds the pretrain run took (MLflow start to end) and how many checks it logged."""
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{work}/mlflow.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run([sys.executable, "-m", "sslpipe", "stage=pretrain", "device=cpu", f"method={method}",
                           "tracking.log_checkpoints=false", f"hydra.run.dir={work}/run", *args],
                          cwd=work, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    client = MlflowClient(store)
    [run] = client.search_runs([client.get_experiment_by_name("sslpipe").experiment_id])
    checks = len(client.get_metric_history(run.info.run_id, "online/knn_top1"))
    return (run.info.end_time - run.info.start_time) / 1000, checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, nargs="+", default=[10, 40])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--method", default="simclr")
    args = parser.parse_args()
    rows = []
    for epochs in args.epochs:
        times: dict[str, list[float]] = {"auto": [], "0": []}
        checks = 0
        for _ in range(args.rounds):
            for every in ("auto", "0"):
                with tempfile.TemporaryDirectory() as tmp:
                    seconds, n = stage_seconds([f"stage.pretrain.loop.epochs={epochs}", f"stage.pretrain.monitor.every={every}"], Path(tmp),
                                               args.method)
                times[every].append(seconds)
                checks = max(checks, n)
        on, off = statistics.median(times["auto"]), statistics.median(times["0"])
        rows.append((epochs, checks, on, off))
    print(f"\n{args.method} on digits (1257 train images, 4 steps per epoch), medians of {args.rounds} rounds\n")
    print("| epochs | checks | stage s, monitor on | stage s, off | cost |")
    print("|---|---|---|---|---|")
    for epochs, checks, on, off in rows:
        print(f"| {epochs} | {checks} | {on:.1f} | {off:.1f} | {100 * (on / off - 1):+.1f} % |")


if __name__ == "__main__":
    main()
