"""What stages build from the config: the data set's splits (read once per process, subsets
applied, checked), the backbone, the method with its views, the normaliser."""

from __future__ import annotations

import logging

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from sslpipe.config import build
from sslpipe.data.split import Splits, concat, data_ratio_subset, stratified_fraction
from sslpipe.stages.context import Context

log = logging.getLogger(__name__)

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
    from sslpipe.data.split import check_splits

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
