"""How a stage sets up training: learning rates are given per 256 images and scaled to the
global batch (world size x per-rank batch x grad_accum; the 2-rank case is in
test_equivalence.py), the effective rate and global batch are logged; and which encoder a
pretrain run saves (DINO / iBOT: the teacher, as their papers evaluate)."""

from __future__ import annotations

import math

import pytest
import torch
from mlflow.tracking import MlflowClient

from sslpipe.engine import LrScale

FAST = ["device=cpu", "stage.pretrain.loop.epochs=1", "stage.pretrain.loop.max_steps=3", "stage.pretrain.loop.log_every=1",
        "tracking.log_checkpoints=false"]
FAST_FINETUNE = [o.replace("stage.pretrain.", "stage.finetune.") for o in FAST]


def test_lr_scale_rules():
    assert LrScale("linear", 512)(0.3) == pytest.approx(0.6)  # SimCLR: 0.3 x B/256
    assert LrScale("sqrt", 1024)(1.2) == pytest.approx(2.4)  # SimCLR B.1: 0.075 x sqrt(1024)
    assert LrScale("sqrt", 1024)(1.2) == pytest.approx(0.075 * math.sqrt(1024))
    assert LrScale("none", 64)(0.01) == 0.01
    assert LrScale("linear", 64).params(lr=0.004) == {"train.global_batch": "64", "train.lr_scaling": "linear",
                                                       "train.lr": "0.001"}
    with pytest.raises(ValueError, match="lr_scaling='cubic' is not one of: linear, sqrt, none"):
        LrScale("cubic", 256)


def _run(cli, *args):
    out = cli(*args)
    assert out.returncode == 0, out.stderr[-3000:]
    client = MlflowClient(tracking_uri=cli.store)
    [run] = client.search_runs([client.get_experiment_by_name("sslpipe").experiment_id])
    return client, run


@pytest.mark.parametrize("rule, batch, accum, expected", [("linear", 32, 2, 0.004 * 64 / 256),
                                                          ("sqrt", 64, 1, 0.004 * 0.5)])
def test_pretrain_steps_at_the_scaled_rate_and_logs_it(cli, rule, batch, accum, expected):
    client, run = _run(cli, "stage=pretrain", *FAST, f"stage.pretrain.batch_size={batch}", f"stage.pretrain.loop.grad_accum={accum}",
                       "stage.pretrain.optimizer.lr=0.004", f"stage.pretrain.lr_scaling={rule}", "stage.pretrain.loop.warmup_epochs=0",
                       "stage.pretrain.loop.min_lr_ratio=1.0")  # a constant schedule: every step at the effective rate
    params = run.data.params
    assert params["train.global_batch"] == str(batch * accum)
    assert float(params["train.lr"]) == pytest.approx(expected, rel=1e-5)
    steps = client.get_metric_history(run.info.run_id, "train/lr")
    assert steps and all(m.value == pytest.approx(expected, rel=1e-6) for m in steps)


def test_finetune_rates_are_per_256_images(cli):
    _, run = _run(cli, "stage=finetune", "pretrained=random", *FAST_FINETUNE, "stage.finetune.batch_size=64",
                  "stage.finetune.backbone_lr=0.002", "stage.finetune.head_lr=0.02")
    assert run.data.params["train.global_batch"] == "64"
    assert float(run.data.params["train.backbone_lr"]) == pytest.approx(0.0005)
    assert float(run.data.params["train.head_lr"]) == pytest.approx(0.005)


def test_bad_lr_scaling_is_refused_naming_the_choices(cli):
    out = cli("stage=pretrain", *FAST, "stage.pretrain.lr_scaling=cubic")
    assert out.returncode != 0
    assert "lr_scaling" in out.stderr and "cubic" in out.stderr and "linear, sqrt, none" in out.stderr


def _final_and_last(cli):
    folder = next((cli.cwd / "outputs").rglob("final.pt")).parent
    final = torch.load(folder / "final.pt", map_location="cpu", weights_only=True)
    last = torch.load(folder / "last.pt", map_location="cpu", weights_only=True)["model"]
    return final, last


def _part(state: dict, prefix: str) -> dict:
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


@pytest.mark.parametrize("encoder, prefix", [(None, "teacher_backbone."), ("student", "backbone.")])
def test_dino_saves_the_teacher_unless_asked_for_the_student(cli, encoder, prefix):
    args = ["stage=pretrain", "method=dino", *FAST, "stage.pretrain.batch_size=32", "stage.pretrain.optimizer.lr=0.05",
            "method.output_dim=256", "method.views.local_views=0", "stage.pretrain.loop.warmup_epochs=0"]
    _, run = _run(cli, *args, *([f"stage.pretrain.encoder={encoder}"] if encoder else []))
    final, last = _final_and_last(cli)
    saved, other = _part(last, prefix), _part(last, "backbone." if encoder is None else "teacher_backbone.")
    assert final["encoder"].keys() == saved.keys()
    assert all(torch.equal(final["encoder"][k], saved[k]) for k in saved)
    assert any(not torch.equal(saved[k], other[k]) for k in saved)  # after 3 steps teacher != student
    assert run.data.tags["sslpipe.encoder"] == final["encoder_from"] == (encoder or "teacher")


def test_ibot_saves_its_teacher_vit(cli):
    _, run = _run(cli, "stage=pretrain", "method=ibot", "backbone=vit_tiny", "+backbone.depth=2", *FAST,
                  "stage.pretrain.batch_size=16", "method.output_dim=256", "stage.pretrain.loop.warmup_epochs=0")
    final, last = _final_and_last(cli)
    teacher = _part(last, "teacher.vit.")
    assert final["encoder"].keys() == teacher.keys()
    assert all(torch.equal(final["encoder"][k], teacher[k]) for k in teacher)
    assert run.data.tags["sslpipe.encoder"] == "teacher"


def test_teacher_of_a_method_without_one_fails_before_training(cli):
    out = cli("stage=pretrain", *FAST, "method=simclr", "stage.pretrain.encoder=teacher")
    assert out.returncode != 0
    assert "stage.pretrain.encoder=teacher" in out.stderr and "SimCLR has no momentum teacher" in out.stderr
    assert not list((cli.cwd / "outputs").rglob("last.pt"))  # nothing trained
