"""Every method through the command line, end to end: `stage=pipeline` pretrains, runs kNN on
the pretrained encoder and on a random-init one of the same architecture in the same run
(`stage.baseline=[knn]`), and exports; ViT methods on a ViT. Training runs as shipped: DINO's
and iBOT's teacher and centre move (tests/test_methods.py::test_loss_falls holds them fixed to
test the student's fit; here a collapse would show as a kNN at or below random init's).

The export folder is read back through its manifest (`sslpipe.load_encoder`) and must
give the features of the encoder the pipeline saved."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import run_cli
from sslpipe import checkpoint as ckpt
from sslpipe import load_encoder  # the public name the README gives (sslpipe/__init__.py)

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
METHODS = sorted(p.stem for p in (REPO / "conf" / "method").glob("*.yaml"))
VIT = ["backbone=vit_tiny", "+backbone.depth=2"]                   # 16 px digits -> 16 patches of 4 px
ON_A_VIT = {"mae", "ibot"}                                          # patch tokens: a ViT only
STEPS = 60
# measured margins over random init's kNN at 60 steps (test split of 270 digits): 0.011 for the
# autoencoder and 0.015-0.026 for BYOL (OMP 1 or 2 threads), 0.03-0.27 for the rest: those two train longer
LONGER = {"autoencoder": 150, "byol": 150}
RUN = ["stage=pipeline", "stage.stages=[knn,export]", "stage.baseline=[knn]", "stage.pretrain.batch_size=128",
       "stage.pretrain.monitor.every=0", "hydra.run.dir=outputs/run"]


@pytest.mark.parametrize("method", METHODS)
def test_method_pretrains_beats_random_knn_and_exports(method, tmp_path):
    steps = LONGER.get(method, STEPS)
    out = run_cli([*RUN, f"method={method}", f"stage.pretrain.loop.max_steps={steps}", *(VIT if method in ON_A_VIT else [])],
                  tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/outputs/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("sslpipe").experiment_id])
    by_stage = {(r.data.tags["sslpipe.stage"], r.data.tags["sslpipe.pretrained"] == "random"): r for r in runs}
    pretrain = by_stage[("pretrain", False)]
    assert pretrain.info.status == "FINISHED" and pretrain.data.tags["sslpipe.method"] == method
    losses = [m.value for m in client.get_metric_history(pretrain.info.run_id, "train/loss")]
    assert losses and all(torch.isfinite(torch.tensor(losses))), losses
    trained = by_stage[("knn", False)].data.metrics["test/top1"]
    random = by_stage[("knn", True)].data.metrics["test/top1"]
    print(f"{method}: kNN {trained:.4f} vs random init {random:.4f} after {steps} steps")
    assert trained > random, f"{method}: kNN {trained:.4f} after {steps} steps, random init {random:.4f}"

    run_dir = tmp_path / "outputs" / "run"
    export = run_dir / "export"
    manifest = json.loads((export / "manifest.json").read_text())
    assert manifest["method"] == method and manifest["provenance"]["mlflow_run_id"] == by_stage[("export", False)].info.run_id
    encoder = load_encoder(export)  # the manifest's constructor, strict keys
    saved = ckpt.load(run_dir / "pretrain" / "checkpoints" / "final.pt")["encoder"]
    assert encoder.state_dict().keys() == saved.keys()
    for k, v in saved.items():
        assert torch.equal(encoder.state_dict()[k], v), k
