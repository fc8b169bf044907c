"""The one path from a composed config to results: seed, run folder, tracker, dispatch."""

from __future__ import annotations

import logging
import random
import time
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
    started = time.monotonic()
    result = dispatch(ctx)
    if cfg.stage.name != "pipeline":  # the pipeline writes its chain's table itself
        _results_table(ctx, result.metrics, time.monotonic() - started)
    return result.metrics


def _results_table(ctx, metrics: dict, wall_s: float) -> None:
    """A single stage's metrics as a compact table, printed and saved as results.md in its run folder."""
    from sslpipe.distributed import is_main
    from sslpipe.progress import write_results
    from sslpipe.reports import results_table

    if not is_main() or not metrics:
        return
    cfg = ctx.cfg
    title = f"results: {cfg.stage.name} {cfg.method.name} / {cfg.backbone.name} / {cfg.dataset.name}"
    if cfg.pretrained is not None:
        title += f" (pretrained={cfg.pretrained})"
    rows = [{"metric": k, "value": v} for k, v in metrics.items()] + [{"metric": "wall time (s)", "value": f"{wall_s:.1f}"}]
    write_results(ctx.run_dir, title, results_table(rows, ["metric", "value"]))
