"""What a stage is given (`Context`: the config, its folder, device, tracker, stop signal, what
earlier pipeline steps hand it), what it returns (`StageResult`), and its MLflow run: tags,
params, the resolved config, classification metrics."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from sslpipe.config import flatten
from sslpipe.distributed import world_size
from sslpipe.preempt import StopSignal
from sslpipe.tracking import Run, Tracker, redact


@dataclass
class Context:
    cfg: DictConfig             # the whole config; cfg.stage names the stage, cfg.stage.<name> holds its settings
    run_dir: Path               # this stage's folder (checkpoints, plots, exports)
    device: torch.device
    tracker: Tracker
    parent_id: str | None = None
    run_name_suffix: str = ""
    loader: str | None = None   # memory | stream: how build_splits read the data (an MLflow tag)
    stop: StopSignal | None = None  # SIGUSR2 / SIGTERM seen (sslpipe.preempt): training loops poll it
    # what earlier pipeline steps hand this one (export: `linear_head`, the linear probe's head file,
    # and `metrics`, the probes' results for the manifest); results never go into the config
    inputs: dict = field(default_factory=dict)

    @property
    def settings(self) -> DictConfig:
        """This stage's settings: `stage.<name>` (conf/step/<name>.yaml), one spelling whether the
        stage runs alone (stage=pretrain) or as a step of stage=pipeline."""
        return self.cfg.stage[self.cfg.stage.name]

    def should_stop(self) -> bool:
        """Whether any rank caught a stop signal; a collective under DDP (every rank asks)."""
        return self.stop is not None and self.stop.requested()

    def for_stage(self, name: str, pretrained: str | None, sub_dir: str, suffix: str = "",
                  inputs: dict | None = None) -> "Context":
        """The context of one pipeline step: cfg.stage as `stage=<name>` alone composes it (the
        step's name, function and settings), so the step's run logs the same params."""
        cfg = self.cfg.copy()
        node = self.cfg.stage[name]
        with open_dict(cfg):
            cfg.stage = OmegaConf.create({name: node, "name": name, "_target_": node._target_})
            cfg.pretrained = pretrained
        return Context(cfg, self.run_dir / sub_dir, self.device, self.tracker, self.parent_id, suffix, self.loader,
                       self.stop, inputs or {})


@dataclass
class StageResult:
    """What a stage returns: its metrics, the files it made that later steps use, its MLflow run."""
    metrics: dict[str, float] = field(default_factory=dict)
    checkpoint: str | None = None   # pretrain / finetune / segment: the weights (a later step's pretrained=)
    head: str | None = None         # linear / mlp probe: the trained head's tensor file (export includes the linear one)
    export_dir: str | None = None   # export: the folder
    plots: str | None = None        # visualize: the folder of plots
    steps: dict[str, dict[str, float]] = field(default_factory=dict)  # stage=pipeline: each step's metrics
    run_id: str | None = None


def tags(ctx: Context) -> dict[str, str]:
    cfg = ctx.cfg
    out = {"sslpipe.stage": cfg.stage.name, "sslpipe.method": cfg.method.name, "sslpipe.backbone": cfg.backbone.name,
           "sslpipe.dataset": cfg.dataset.name, "sslpipe.world_size": str(world_size()),
           "sslpipe.pretrained": str(cfg.pretrained) if cfg.pretrained is not None else "none"}
    import os

    if ctx.loader:
        out["sslpipe.loader"] = ctx.loader
    if os.environ.get("SLURM_JOB_ID"):
        out["slurm.job_id"] = os.environ["SLURM_JOB_ID"]
    out.update(study_tags())
    return out


def study_tags() -> dict[str, str]:
    """Under a search sweeper (hydra/sweeper=search), the study's name and the trial number."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    hydra_cfg = HydraConfig.get()
    study = hydra_cfg.sweeper.get("study_name") if "OptunaSweeper" in str(hydra_cfg.sweeper.get("_target_")) else None
    return {"sslpipe.study": str(study), "sslpipe.trial": str(hydra_cfg.job.num)} if study else {}


@contextlib.contextmanager
def stage_run(ctx: Context, run_id: str | None = None):
    """Open this stage's MLflow run (or reopen `run_id` on resume), log tags, params and the
    resolved config.yaml; mark it KILLED when a stop signal ends it (the requeued job reopens
    it), FAILED if the stage raises, FINISHED otherwise."""
    cfg = ctx.cfg
    name = cfg.tracking.run_name or f"{cfg.stage.name}-{cfg.method.name}-{cfg.backbone.name}-{cfg.dataset.name}"
    run = ctx.tracker.start_run(name + ctx.run_name_suffix, tags(ctx), parent_id=ctx.parent_id, run_id=run_id)
    if run_id is None:
        run.log_params(flatten(cfg))
        run.log_text(redact(OmegaConf.to_yaml(cfg, resolve=True)), "config.yaml")
    from sslpipe.engine import Preempted

    try:
        yield run
    except Preempted:
        run.end("KILLED")
        raise
    except BaseException:
        run.end("FAILED")
        raise
    run.end("FINISHED")


def log_classification(run: Run, ctx: Context, predictions: dict[str, tuple], classes: list[str]) -> dict[str, float]:
    """Log `<split>/top1` and `<split>/f1_macro` for each split in `predictions`
    ({"val": (y_true, y_pred), "test": ...}), the test split's per-class report
    (classification_report.json) and confusion matrix plot. Returns the metrics."""
    import json

    from sslpipe.metrics import classification_metrics
    from sslpipe.plots import confusion_plot

    metrics: dict[str, float] = {}
    for split, (y_true, y_pred) in predictions.items():
        m, report = classification_metrics(y_true.numpy(), y_pred.numpy(), classes, split)
        metrics.update(m)
        if split == "test":
            ctx.run_dir.mkdir(parents=True, exist_ok=True)
            run.log_text(json.dumps(report, indent=2), "classification_report.json")
            plot = confusion_plot(y_true.numpy(), y_pred.numpy(), classes, ctx.run_dir / "confusion_matrix.png",
                                  f"{ctx.cfg.stage.name} ({ctx.cfg.pretrained})")
            run.log_artifact(plot, "plots")
    run.log_metrics(metrics, step=0)
    return metrics


def protocol_params(ctx: Context, **values) -> dict[str, str]:
    """Settings that make two probe numbers comparable, logged as params of the same run."""
    return {"protocol.label_fraction": str(ctx.cfg.dataset.fraction), **{f"protocol.{k}": str(v) for k, v in values.items()}}
