"""Start-up: `python -m sslpipe --cfg job` vs a bare Hydra app over a config of the same size,
and the time to the first training step vs a bare PyTorch script doing one step.

The bare Hydra app is generated in a temp folder: sslpipe's conf/ tree copied (same groups,
files and bytes) under a ten-line `@hydra.main` that does nothing. Runs alternate; medians.

    python benchmarks/startup.py
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import header, median, table  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

BARE_APP = '''import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def app(cfg: DictConfig) -> None:
    pass


if __name__ == "__main__":
    app()
'''

BARE_STEP = '''import torch
from sklearn.datasets import load_digits
from sslpipe.backbones import SmallCNN
from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
import kornia.augmentation as K
x = torch.from_numpy(load_digits().images[:256]).float().div(16).unsqueeze(1)
x = torch.nn.functional.interpolate(x, size=16)
backbone = SmallCNN(in_chans=1)
head = SimCLRProjectionHead(128, 512, 128)
aug = K.RandomResizedCrop((16, 16), scale=(0.5, 1.0))
params = list(backbone.parameters()) + list(head.parameters())
opt = torch.optim.AdamW(params, lr=2e-3)
loss = NTXentLoss(temperature=0.2)(head(backbone(aug(x))), head(backbone(aug(x))))
loss.backward()
opt.step()
print("first step done", float(loss))
'''


def timed(cmd: list[str], cwd: Path, env: dict) -> float:
    t = time.perf_counter()
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--step-rounds", type=int, default=3)
    args = p.parse_args()
    header("Start-up: --cfg job and the first training step", "cpu")

    tmp = Path(tempfile.mkdtemp(prefix="sslpipe-bench-"))
    app = tmp / "bare_app"
    shutil.copytree(REPO / "conf", app / "conf", ignore=shutil.ignore_patterns("__pycache__", "*.py"))
    (app / "app.py").write_text(BARE_APP)
    (tmp / "bare_step.py").write_text(BARE_STEP)
    n_files = len(list((app / "conf").rglob("*.yaml")))
    n_bytes = sum(f.stat().st_size for f in (app / "conf").rglob("*.yaml"))
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "HYDRA_FULL_ERROR": "1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db", "SSLPIPE_PROGRESS": "off"}

    ours_cmd = [sys.executable, "-m", "sslpipe", "--cfg", "job"]
    bare_cmd = [sys.executable, "app.py", "--cfg", "job"]
    timed(ours_cmd, tmp, env), timed(bare_cmd, app, env)  # warm the file cache
    ours, bare = [], []
    for _ in range(args.rounds):
        ours.append(timed(ours_cmd, tmp, env))
        bare.append(timed(bare_cmd, app, env))

    first_cmd = [sys.executable, "-m", "sslpipe", "stage=pretrain", "stage.pretrain.loop.epochs=1", "stage.pretrain.loop.max_steps=1",
                 "device=cpu", f"tracking.artifact_root={tmp}/artifacts"]
    step_cmd = [sys.executable, "bare_step.py"]
    first, step = [], []
    for _ in range(args.step_rounds):
        first.append(timed(first_cmd, tmp, env))
        step.append(timed(step_cmd, tmp, env))

    print(f"config tree: {n_files} yaml files, {n_bytes} bytes (copied into the bare app)\n")
    table(["command", "wall s (median)", "min", "max", "ratio vs baseline"], [
        ["bare Hydra app --cfg job (baseline)", median(bare), min(bare), max(bare), 1.0],
        ["python -m sslpipe --cfg job", median(ours), min(ours), max(ours), median(ours) / median(bare)],
        ["bare PyTorch script, one SimCLR step on digits (baseline)", median(step), min(step), max(step), 1.0],
        ["python -m sslpipe stage=pretrain stage.pretrain.loop.max_steps=1 (whole run: MLflow run, checkpoint, plot)",
         median(first), min(first), max(first), median(first) / median(step)],
    ])


if __name__ == "__main__":
    main()
