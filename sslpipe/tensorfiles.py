"""Tensor files of an export folder: safetensors, or JSON snapshots
`{name: {"shape": [...], "data": [...row-major...]}}` for tools that read JSON (the row-major,
shape-tagged snapshots of spiral-selfsup's st-model-hub exports)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sslpipe.atomic import atomic_write

FORMATS = ("safetensors", "json")


def write_tensors(tensors: dict[str, torch.Tensor], path: Path) -> dict:
    """Write `tensors` to `path` (format from its suffix); returns {name: shape} for the manifest."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        atomic_write(path, lambda tmp: save_file(tensors, tmp))
    elif path.suffix == ".json":
        snapshot = {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch."),
                        "data": v.flatten().tolist()} for k, v in tensors.items()}
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(snapshot)))
    else:
        raise ValueError(f"unknown tensor file suffix '{path.suffix}'; valid: .safetensors, .json")
    return {k: list(v.shape) for k, v in tensors.items()}


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    snapshot = json.loads(path.read_text())
    return {k: torch.tensor(v["data"], dtype=getattr(torch, v.get("dtype", "float32"))).reshape(v["shape"])
            for k, v in snapshot.items()}


def constructor(build: dict) -> dict:
    """How another program builds the exported encoder's architecture, from the backbone's
    config (`build`, less `name`): `timm.create_model(name, **kwargs)` where a stock timm model
    with those kwargs is the same network (the ViTs with patch_size / img_size, any timm model
    without the CIFAR stem), else sslpipe's builder, which no timm call reproduces (the CIFAR-stem
    ResNets: timm's resnet with conv1 replaced by a 3x3/1 conv and no max-pool; the small CNNs)."""
    build = {k: v for k, v in build.items() if k != "name"}
    target = build.pop("_target_")
    if target == "sslpipe.backbones.TimmBackbone" and not build.get("cifar_stem"):
        build.pop("cifar_stem", None)
        name = build.pop("model_name")
        return {"call": "timm.create_model", "args": [name], "kwargs": {**build, "num_classes": 0}}
    why = ("the CIFAR stem (3x3/1 conv1, no max-pool) is no stock timm model" if build.get("cifar_stem")
           else "not a timm model")
    return {"call": target, "args": [], "kwargs": build, "timm": f"none: {why}"}


def load_encoder(folder: str | Path) -> torch.nn.Module:
    """The exported encoder, built as the manifest's `backbone.constructor` says and loaded with
    strict keys: one call for any export folder (`sslpipe.load_encoder(path)`)."""
    import importlib

    folder = Path(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    spec = manifest["backbone"]["constructor"]
    module, _, name = spec["call"].rpartition(".")
    model = getattr(importlib.import_module(module), name)(*spec["args"], **spec["kwargs"])
    model.load_state_dict(read_tensors(folder / manifest["files"]["encoder"]["path"]), strict=True)
    return model.eval()
