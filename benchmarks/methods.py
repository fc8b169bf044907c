"""Pretrain every method (conf/method/*.yaml, globbed) for the same small budget on the
embedded digits data through the real CLI, then kNN and linear-probe test accuracy of each
frozen encoder against the random-init encoder. Prints a markdown table.

    OMP_NUM_THREADS=1 python benchmarks/methods.py --epochs 10 [--methods simclr byol] [--workdir DIR]

A script, not a test: minutes on a CPU. ViT methods (ibot, mae) run on backbone=vit_tiny and are
compared with a random-init vit_tiny; all others use the default smallcnn. Method yamls'
recommended learning rates are passed as `stage.pretrain.optimizer.lr` (LR below)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = sorted(p.stem for p in (REPO / "conf" / "method").glob("*.yaml"))
VIT_METHODS = {"ibot", "mae"}           # needs_vit: the only methods that need backbone=vit_tiny
LR = {"simsiam": 0.001, "simo2": 0.0003}  # as recommended in their yaml comments


def cli(args: list[str], cwd: Path, store: str) -> None:
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run([sys.executable, "-m", "sslpipe", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"sslpipe {' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")


def metrics(store: str, experiment: str) -> dict[str, float]:
    """test/top1 of the knn and linear_probe runs, and the last train/loss of the pretrain run."""
    import mlflow

    client = mlflow.tracking.MlflowClient(store)
    exp = client.get_experiment_by_name(experiment)
    out = {}
    for run in client.search_runs([exp.experiment_id]):
        stage = run.data.tags.get("sslpipe.stage")
        if stage in ("knn", "linear_probe"):
            out[stage] = run.data.metrics["test/top1"]
        elif stage == "pretrain":
            history = client.get_metric_history(run.info.run_id, "train/loss")
            out["first_loss"], out["last_loss"] = history[0].value, history[-1].value
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--methods", nargs="*", default=METHODS)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="sslpipe-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    store = f"sqlite:///{work}/mlflow.db"
    probes = ["stage=pipeline", "stage.stages=[knn,linear_probe]", "stage.baseline=[]"]
    rows = []
    for backbone in ("smallcnn", "vit_tiny"):
        if backbone == "vit_tiny" and not VIT_METHODS & set(args.methods):
            continue
        for stage in ("knn", "linear_probe"):
            cli([f"stage={stage}", "pretrained=random", f"backbone={backbone}", f"tracking.experiment=random-{backbone}"],
                work, store)
        m = metrics(store, f"random-{backbone}")
        rows.append((f"random init ({backbone})", backbone, m["knn"], m["linear_probe"], None, None, 0.0))
    for name in args.methods:
        backbone = "vit_tiny" if name in VIT_METHODS else "smallcnn"
        extra = [f"stage.pretrain.optimizer.lr={LR[name]}"] if name in LR else []
        t = time.perf_counter()
        cli([*probes, f"method={name}", f"backbone={backbone}", f"stage.pretrain.loop.epochs={args.epochs}",
             "stage.pretrain.loop.log_every=4", f"tracking.experiment=bench-{name}", *extra], work, store)
        m = metrics(store, f"bench-{name}")
        rows.append((name, backbone, m["knn"], m["linear_probe"], m["first_loss"], m["last_loss"],
                     time.perf_counter() - t))
        print(f"{name}: knn {m['knn']:.3f} linear {m['linear_probe']:.3f}", file=sys.stderr, flush=True)
    random = {r[1]: r for r in rows if r[0].startswith("random")}
    print(f"\nDigits (16 px), {args.epochs} pretraining epochs of batch 256 each; kNN k=20 T=0.07; "
          f"linear probe 100 epochs. MLflow store: {store}\n")
    print("| method | backbone | kNN top1 | linear top1 | train/loss first -> last | beats random (kNN / linear) | time (s) |")
    print("|---|---|---|---|---|---|---|")
    for name, backbone, knn, lin, first, last, secs in rows:
        base = random[backbone]
        loss = "-" if first is None else f"{first:.3f} -> {last:.3f}"
        beats = "-" if name.startswith("random") else f"{'yes' if knn > base[2] else 'NO'} / {'yes' if lin > base[3] else 'NO'}"
        print(f"| {name} | {backbone} | {knn:.3f} | {lin:.3f} | {loss} | {beats} | {secs:.0f} |")


if __name__ == "__main__":
    main()
