"""Every yaml in every config group composes; bad names fail with the valid choices."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from sslpipe.config import build, compose

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = ["method", "backbone", "dataset", "stage"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]


def compose_with(*overrides: str):
    return compose(overrides)


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes(group, option):
    cfg = compose_with(f"{group}={option}")
    assert cfg[group].name == option  # one name everywhere: the file name is the config's name
    OmegaConf.to_container(cfg[group], resolve=True)  # every interpolation inside the group resolves


@pytest.mark.parametrize("option", [o for g, o in OPTIONS if g == "backbone"])
def test_every_backbone_builds_with_timm_interface(option):
    import torch

    cfg = compose_with(f"backbone={option}")
    backbone = build(cfg.backbone)
    x = torch.randn(2, cfg.dataset.channels, cfg.dataset.image_size, cfg.dataset.image_size)
    assert backbone(x).shape == (2, backbone.num_features)


def test_embedded_dataset_builds_split():
    cfg = compose_with()
    splits = build(cfg.dataset.source)
    assert len(splits.train) + len(splits.val) + len(splits.test) == 1797
    assert splits.train.images.shape[1:] == (1, cfg.dataset.image_size, cfg.dataset.image_size)
    # stratified: every class in every split
    for split in (splits.train, splits.val, splits.test):
        assert set(split.labels.tolist()) == set(range(10))


def test_cfg_job_does_not_import_torch_or_mlflow():
    import subprocess

    code = ("import sys; sys.argv=['sslpipe','--cfg','job']; from sslpipe.__main__ import main\n"
            "try: main()\nexcept SystemExit: pass\n"
            "bad=[m for m in ('torch','mlflow','lightly','timm') if m in sys.modules]; print('IMPORTED', bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "IMPORTED []" in out.stdout, out.stdout + out.stderr
    assert "_target_: sslpipe.methods.simclr.SimCLR" in out.stdout


def test_unknown_method_names_valid_choices(cli):
    out = cli("method=nosuch")
    assert out.returncode != 0
    assert "nosuch" in out.stderr and "simclr" in out.stderr and "byol" in out.stderr
    assert "Traceback" not in out.stderr


def test_typo_key_names_the_key_and_valid_keys(cli):
    out = cli("stage=pretrain", "stage.pretrain.epoch=3")
    assert out.returncode != 0
    assert "stage.pretrain.epoch" in out.stderr
    assert "did you mean 'stage.pretrain.loop.epochs'" in out.stderr and "max_steps" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (cli.cwd / "outputs" / "mlflow.db").exists()  # nothing ran, nothing written
