"""Training checkpoints: written atomically (sslpipe.atomic), read with weights_only. What a
stage resumes from; loading an encoder from what `pretrained=` names is sslpipe.pretrained."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sslpipe.atomic import atomic_write


def atomic_save(obj: Any, path: str | Path) -> Path:
    """torch.save through sslpipe.atomic: a crash leaves the old checkpoint or the new one."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load(path: str | Path) -> dict:
    """Load a checkpoint with `weights_only=True`: no pickled code runs."""
    return torch.load(path, map_location="cpu", weights_only=True)
