"""Export loads where the manifest says (issue 16): for every backbone yaml, `stage=export`
through the CLI, then the encoder rebuilt by the manifest's constructor with strict keys (and by
`timm.create_model` itself where the manifest names timm) gives the features of the exported
weights; JSON snapshots round-trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_cli

from sslpipe.config import build, compose
from sslpipe import load_encoder  # the public name the README gives (sslpipe/__init__.py)

BACKBONES = sorted(p.stem for p in (REPO / "conf" / "backbone").glob("*.yaml"))
# Stock timm architectures: the manifest must send these to timm.create_model; the others
# (CIFAR stem, sslpipe's own CNNs) to sslpipe's builder, saying why.
TIMM = {"timm", "vit_tiny", "vit_small"}


def exported(tmp_path: Path, backbone: str, fmt: str = "safetensors") -> tuple[Path, torch.nn.Module]:
    """A randomly initialised encoder of `backbone` saved as a checkpoint, exported by the CLI."""
    cfg = compose([f"backbone={backbone}"])
    torch.manual_seed(3)
    encoder = build(cfg.backbone).eval()
    torch.save({"encoder": encoder.state_dict(), "projector": {}}, tmp_path / "final.pt")
    out = run_cli(["stage=export", f"backbone={backbone}", f"pretrained={tmp_path / 'final.pt'}",
                   f"stage.export.format={fmt}", f"stage.export.dir={tmp_path / 'export'}"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    return tmp_path / "export", encoder


@pytest.mark.slow
@pytest.mark.parametrize("backbone", BACKBONES)
def test_every_backbone_reloads_through_its_manifest(tmp_path, backbone):
    folder, encoder = exported(tmp_path, backbone)
    manifest = json.loads((folder / "manifest.json").read_text())
    spec = manifest["backbone"]["constructor"]
    x = torch.randn(4, 1, 16, 16)  # the digits default: 1 channel, 16 px
    with torch.no_grad():
        expected = encoder(x)
        assert torch.equal(load_encoder(folder)(x), expected)  # strict keys inside
    if backbone in TIMM:
        import timm

        from sslpipe.tensorfiles import read_tensors

        assert spec["call"] == "timm.create_model" and manifest["backbone"]["timm_name"] == spec["args"][0]
        model = timm.create_model(*spec["args"], **spec["kwargs"]).eval()
        model.load_state_dict(read_tensors(folder / "encoder.safetensors"), strict=True)
        with torch.no_grad():
            assert torch.equal(model(x), expected)
    else:
        assert spec["call"].startswith("sslpipe.backbones.") and spec["timm"].startswith("none: ")
        assert manifest["backbone"]["timm_name"] is None


@pytest.mark.parametrize("backbone", ["smallcnn", "yatcnn"])
def test_json_snapshots_round_trip(tmp_path, backbone):
    folder, encoder = exported(tmp_path, backbone, fmt="json")
    assert (folder / "encoder.json").exists()
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(load_encoder(folder)(x), encoder(x))
