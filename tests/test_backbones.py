"""Backbones keep timm's interface, and `pretrained=` loads plain timm / torchvision state
dicts and wrapped checkpoints, or fails naming the keys that do not fit."""

from __future__ import annotations

import pytest
import torch
from mlflow.tracking import MlflowClient

from sslpipe.pretrained import load_encoder_state
from sslpipe.config import build, compose


def backbone_of(*overrides: str) -> torch.nn.Module:
    return build(compose(list(overrides)).backbone)


# ------------------------------------------------------------------ backbones
def test_resnet50_has_cifar_stem():
    model = backbone_of("backbone=resnet50", "dataset=cifar10")
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, torch.nn.Identity)
    assert model.num_features == 2048
    x = torch.randn(2, 3, 32, 32)
    assert model.forward_features(x).shape == (2, 2048, 4, 4)  # 32 px keeps a 4x4 map (a 7x7/2 stem: 1x1)


def test_timm_backbone_by_name_convnext_atto():
    model = backbone_of("backbone=timm", "backbone.model_name=convnext_atto")  # digits: 1 channel
    assert model.num_features == 320
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 320)
    # timm's own checkpoint (RGB stem, 1000-class head) loads: head dropped, stem summed to 1 channel
    state = __import__("timm").create_model("convnext_atto").state_dict()
    load_encoder_state(model, state, "convnext_atto.pt")
    assert torch.allclose(model.stem[0].weight, state["stem.0.weight"].sum(1, keepdim=True))
    assert torch.equal(model.stages[3].blocks[1].mlp.fc2.weight, state["stages.3.blocks.1.mlp.fc2.weight"])


def test_yatcnn_is_built_from_nmn_yat_layers_and_trains():
    from nmn.torch import YatConv2D

    model = backbone_of("backbone=yatcnn")
    assert all(isinstance(c, YatConv2D) for c in model.convs) and len(model.convs) == 4
    x = torch.rand(8, 1, 16, 16)
    features = model(x)
    assert features.shape == (8, model.num_features) == (8, 128)
    assert not torch.allclose(features[0], features[1])  # features depend on the input
    features.pow(2).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())
    # its weights survive the strict load path
    clone = backbone_of("backbone=yatcnn")
    load_encoder_state(clone, {f"module.{k}": v for k, v in model.state_dict().items()}, "yatcnn.pt")
    assert torch.equal(clone.eval()(x), model.eval()(x))


# ------------------------------------------------------------------ loading foreign weights in-process
def test_torchvision_resnet18_loads_into_timm_resnet18():
    import torchvision

    tv = torchvision.models.resnet18()  # keys equal timm's resnet18; fc is the head we drop
    model = backbone_of("backbone=timm", "backbone.model_name=resnet18", "dataset=cifar10")
    load_encoder_state(model, {f"encoder_q.{k}": v for k, v in tv.state_dict().items()}, "tv.pth")
    for key in ("conv1.weight", "layer4.1.bn2.running_var", "layer2.0.downsample.0.weight"):
        assert torch.equal(model.state_dict()[key], tv.state_dict()[key]), key


def test_mismatch_names_the_keys():
    import timm

    model = backbone_of("backbone=timm", "backbone.model_name=resnet18", "dataset=cifar10")
    state = timm.create_model("resnet34").state_dict()
    with pytest.raises(ValueError) as err:
        load_encoder_state(model, state, "r34.pt")
    assert "96 unexpected" in str(err.value) and "layer1.2.bn1.bias" in str(err.value)
    state = timm.create_model("resnet18").state_dict()
    state["layer1.0.bn1.weight"] = torch.ones(3)
    del state["layer3.1.bn2.bias"]
    with pytest.raises(ValueError) as err:
        load_encoder_state(model, state, "broken.pt")
    assert "layer3.1.bn2.bias" in str(err.value) and "layer1.0.bn1.weight: checkpoint (3,) vs model (64,)" in str(err.value)


# ------------------------------------------------------------------ end to end: pretrained= through the CLI
PROBE = ["stage=linear_probe", "backbone=timm", "backbone.model_name=resnet18", "dataset=digits", "stage.linear_probe.epochs=2"]


@pytest.fixture(scope="module")
def timm_checkpoints(tmp_path_factory):
    import timm

    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    state = timm.create_model("resnet18").state_dict()
    paths = {"plain": folder / "resnet18.pth", "module": folder / "ddp.pth", "backbone": folder / "lightning.ckpt",
             "r34": folder / "resnet34.pth"}
    torch.save(state, paths["plain"])
    torch.save({f"module.{k}": v for k, v in state.items()}, paths["module"])
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in state.items()}}, paths["backbone"])
    torch.save(timm.create_model("resnet34").state_dict(), paths["r34"])
    return paths


def _probe_top1(cli, path) -> float:
    client = MlflowClient(tracking_uri=cli.store)
    runs = client.search_runs([client.get_experiment_by_name("sslpipe").experiment_id],
                              filter_string=f"params.`pretrained.source` = '{path}'")
    assert len(runs) == 1
    return runs[0].data.metrics["test/top1"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["plain", "module", "backbone"])
def test_timm_checkpoint_loads_and_probes(cli, timm_checkpoints, kind):
    path = timm_checkpoints[kind]
    out = cli(*PROBE, f"pretrained={path}", env={"OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "test/top1" in out.stdout
    assert "dropped the classifier fc.bias, fc.weight" in out.stdout + out.stderr  # said, not hidden
    assert 0.2 < _probe_top1(cli, path) <= 1.0  # above chance (0.1) on digits


@pytest.mark.slow
def test_wrong_architecture_fails_naming_keys(cli, timm_checkpoints):
    out = cli(*PROBE, f"pretrained={timm_checkpoints['r34']}", env={"OMP_NUM_THREADS": "1"})
    assert out.returncode != 0
    assert "do not fit the backbone" in out.stderr and "layer1.2.bn1.bias" in out.stderr
    assert "Traceback" not in out.stderr
