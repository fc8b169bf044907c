"""The one path from a composed config to results: seed, run folder, tracker, dispatch."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_dir() -> Path:
    """Hydra's output folder for this job (deterministic per sweep job under SLURM)."""
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def run(cfg: DictConfig) -> dict:
    from sslpipe.validate import validate

    validate(cfg)  # before anything is built or written

    from sslpipe.engine import resolve_device
    from sslpipe.stages import Context, dispatch
    from sslpipe.tracking import Tracker

    seed_everything(cfg.seed)
    tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment, cfg.tracking.artifact_root)
    ctx = Context(cfg=cfg, run_dir=run_dir(), device=resolve_device(cfg.device), tracker=tracker)
    result = dispatch(ctx)
    return result.metrics
