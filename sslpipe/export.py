"""Tensor files of an export folder: safetensors, or JSON snapshots
`{name: {"shape": [...], "data": [...row-major...]}}` for tools that read JSON (seed 000)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

FORMATS = ("safetensors", "json")


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_tensors(tensors: dict[str, torch.Tensor], path: Path) -> dict:
    """Write `tensors` to `path` (format from its suffix); returns {name: shape} for the manifest."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        _atomic_write(path, lambda tmp: save_file(tensors, tmp))
    elif path.suffix == ".json":
        snapshot = {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch."),
                        "data": v.flatten().tolist()} for k, v in tensors.items()}
        _atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(snapshot)))
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
