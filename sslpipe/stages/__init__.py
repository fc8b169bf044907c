"""Stages: one file each, `run(ctx) -> StageResult`. A stage reads like a recipe: build
data, build model, fit or evaluate, log, return metrics. This module holds what they share."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from sslpipe.config import build, flatten
from sslpipe.data import Splits, concat, data_ratio_subset, stratified_fraction
from sslpipe.distributed import world_size
from sslpipe.preempt import StopSignal
from sslpipe.tracking import Run, Tracker
from sslpipe.validate import redact

log = logging.getLogger(__name__)

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


# ------------------------------------------------------------------ shared building blocks
_READ: dict[str, Splits] = {}


def read_splits(source: DictConfig) -> Splits:
    """`build(dataset.source)`, read once per process: the steps of a pipeline share the data
    set instead of reading (and, in memory, decoding) it again. Returns a shallow copy, which
    callers may reassign fields of."""
    import dataclasses

    key = OmegaConf.to_yaml(source, resolve=True)
    if key not in _READ:
        _READ.clear()  # one data set at a time
        _READ[key] = build(source)
    return dataclasses.replace(_READ[key])


def resolve_num_classes(ctx: Context) -> Splits:
    """Read the data set; where `dataset.num_classes` is null (imagefolder), set it from the
    class folders found. Records the loader used on `ctx`. Returns the splits as read."""
    splits = read_splits(ctx.cfg.dataset.source)
    ctx.loader = splits.loader
    if ctx.cfg.dataset.num_classes is None:
        with open_dict(ctx.cfg):
            ctx.cfg.dataset.num_classes = len(splits.classes)
        log.info("dataset.num_classes inferred from the data: %d", len(splits.classes))
    return splits


def build_splits(ctx: Context, labelled: bool) -> Splits:
    """The dataset's splits. `dataset.data_ratio` keeps that share of the training data at all;
    then with `labelled` the train split keeps `dataset.fraction` per class, and without it the
    train split becomes the pretraining pool, train + unlabeled."""
    from sslpipe.validate import check_splits

    ds = ctx.cfg.dataset
    splits = resolve_num_classes(ctx)
    ratio = ds.get("data_ratio", 1.0)
    splits.train = data_ratio_subset(splits.train, ratio, ctx.cfg.seed)
    if splits.unlabeled is not None:
        splits.unlabeled = data_ratio_subset(splits.unlabeled, ratio, ctx.cfg.seed)
        if not labelled:
            splits.train, splits.unlabeled = concat(splits.train, splits.unlabeled), None
    check_splits(splits, ds.name, ds.channels, ds.num_classes, ds.image_size, labelled)
    if labelled:
        splits.train = stratified_fraction(splits.train, ctx.cfg.dataset.fraction, ctx.cfg.seed)
    return splits


def build_backbone(ctx: Context) -> torch.nn.Module:
    return build(ctx.cfg.backbone)


def build_method(cfg: DictConfig, backbone: torch.nn.Module):
    """The method of `cfg.method` on `backbone`, and its views (`sslpipe.data.views.plan_views`:
    the method's paper views over the data set's). The view counts come from `method.views`;
    a method that takes local crops (DINO) gets their count as `local_views`."""
    import inspect

    from hydra.utils import get_class

    from sslpipe.data.views import plan_views

    cls = get_class(cfg.method._target_)
    takes_local = "local_views" in inspect.signature(cls).parameters
    views = OmegaConf.to_container(cfg.method.views, resolve=True) if "views" in cfg.method else None
    plan = plan_views(OmegaConf.to_container(cfg.dataset.augment, resolve=True), views, cfg.method.name,
                      cls.global_views, takes_local)
    extra = {"local_views": plan.local_views} if takes_local else {}
    return build(cfg.method, backbone=backbone, **extra), plan


def normalizer(ctx: Context):
    from sslpipe.data.views import Normalize

    return Normalize(list(ctx.cfg.dataset.norm.mean), list(ctx.cfg.dataset.norm.std))


# Features of the last few (weights, split) pairs: a pipeline's knn / linear / mlp probes (and
# visualize) run on the same encoder and splits, and read and encode the images once.
_FEATURES: dict[tuple, torch.Tensor] = {}
_FEATURES_KEPT = 8


def _fingerprint(backbone: torch.nn.Module, split, normalize) -> tuple:
    """Identity of (weights, images, normalisation): a digest of every tensor, so the random-init
    baselines of two stages share features only if their weights are equal too."""
    import hashlib

    digest = hashlib.sha1()
    for t in [*backbone.state_dict().values(), normalize.mean, normalize.std]:
        digest.update(t.detach().cpu().contiguous().numpy().tobytes() if t.numel() else b"")
    if hasattr(split, "images"):  # the pixels themselves (about 1 GB/s)
        digest.update(split.images.cpu().contiguous().numpy().tobytes())
    else:  # the files and how they are read
        digest.update(f"{split.paths.root}|{split.settings}".encode())
        digest.update(split.paths.data.tobytes())
        digest.update(split.paths.offsets.tobytes())
    digest.update(split.labels.cpu().numpy().tobytes())
    return digest.hexdigest(), len(split)


@torch.no_grad()
def extract_features(backbone: torch.nn.Module, split, normalize, device: torch.device, batch_size: int,
                     cache: bool = True) -> torch.Tensor:
    """Features of every image of `split` (its eval view), once, in eval mode: (N, num_features)
    on the CPU; reused while the weights and the split are the same (`cache=False`: weights
    that are still training, never reused). Under DDP each rank extracts its shard and all
    ranks get the whole split's features."""
    from sslpipe import distributed
    from sslpipe.data.loaders import eval_loader

    key = _fingerprint(backbone, split, normalize) if cache else None
    if key in _FEATURES:
        log.info("features of %d images reused (same weights and split)", len(split))
        return _FEATURES[key]
    backbone.eval().to(device)
    normalize = normalize.to(device)

    def extract(part) -> torch.Tensor:
        out = [backbone(normalize(x.to(device, non_blocking=True))).float() for x, _ in eval_loader(part, batch_size)]
        return torch.cat(out) if out else torch.empty(0, backbone.num_features, device=device)

    features = distributed.extract_features_sharded(extract, split).cpu()
    if not cache:
        return features
    while len(_FEATURES) >= _FEATURES_KEPT:
        _FEATURES.pop(next(iter(_FEATURES)))
    _FEATURES[key] = features
    return features


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
