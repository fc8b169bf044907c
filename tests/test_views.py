"""Views per method (sslpipe.data.views.plan_views): each method's built augmentation has the ops
and probabilities of its paper, adapts to what the data set fixes, takes its multi-crop
settings from the command line, and a bad views setting fails naming the bad value."""

from __future__ import annotations

import pytest
import torch

from sslpipe.config import build, compose
from sslpipe.data.views import MultiView
from sslpipe.stages.build import build_method


def built_views(*overrides: str) -> MultiView:
    cfg = compose(["stage=pretrain", *overrides])
    torch.manual_seed(0)
    _, plan = build_method(cfg, build(cfg.backbone))
    return MultiView(cfg.dataset.image_size, plan, [0.5] * cfg.dataset.channels, [0.25] * cfg.dataset.channels)


def ops(augment) -> dict[str, object]:
    """What one built view does, read from its modules: op name -> probability (crop: its scale,
    jitter: (p, brightness, contrast, saturation, hue))."""
    out = {}
    for op in augment.ops:
        name = type(op).__name__
        if name == "RandomResizedCrop":
            out["crop"] = op.scale
        elif name == "ColorJitter":
            out["jitter"] = (op.p, op.brightness, op.contrast, op.saturation, op.hue)
        else:
            out[{"RandomHorizontalFlip": "flip", "RandomGrayscale": "grayscale", "RandomGaussianBlur": "blur",
                 "RandomSolarize": "solarize", "RandomRotation": "rotation"}[name]] = op.p
    return out


def global_ops(views: MultiView) -> list[dict]:
    augs = list(views.global_augs) * (views.global_views if views.alike else 1)
    return [ops(a) for a in augs]


# An ImageNet-like data set fixes nothing (conf/dataset/imagefolder.yaml): the papers' views as they are.
RGB = ["dataset=imagefolder", "dataset.image_size=64", "backbone=smallcnn"]
BYOL_JITTER = (0.8, 0.4, 0.4, 0.2, 0.1)
ASYMMETRIC = [  # BYOL Table 6; MoCo v3, Barlow Twins, VICReg take the same
    {"crop": (0.08, 1.0), "flip": 0.5, "jitter": BYOL_JITTER, "grayscale": 0.2, "blur": 1.0},
    {"crop": (0.08, 1.0), "flip": 0.5, "jitter": BYOL_JITTER, "grayscale": 0.2, "blur": 0.1, "solarize": 0.2},
]


@pytest.mark.parametrize("method", ["byol", "mocov3", "barlowtwins", "vicreg"])
def test_asymmetric_views_of_byol_and_its_followers(method):
    assert global_ops(built_views(f"method={method}", *RGB)) == ASYMMETRIC


@pytest.mark.parametrize("method,expected", [
    # SimCLR appendix A: colour strength 1.0, blur half the time
    ("simclr", {"crop": (0.08, 1.0), "flip": 0.5, "jitter": (0.8, 0.8, 0.8, 0.8, 0.2), "grayscale": 0.2, "blur": 0.5}),
    # MoCo v1: jitter always, strong hue, no blur; v2 (and SimSiam): SimCLR-style jitter and blur
    ("mocov1", {"crop": (0.2, 1.0), "flip": 0.5, "jitter": (1.0, 0.4, 0.4, 0.4, 0.4), "grayscale": 0.2}),
    ("mocov2", {"crop": (0.2, 1.0), "flip": 0.5, "jitter": (0.8, 0.4, 0.4, 0.4, 0.1), "grayscale": 0.2, "blur": 0.5}),
    ("simsiam", {"crop": (0.2, 1.0), "flip": 0.5, "jitter": (0.8, 0.4, 0.4, 0.4, 0.1), "grayscale": 0.2, "blur": 0.5}),
])
def test_symmetric_views(method, expected):
    views = built_views(f"method={method}", *RGB)
    assert views.alike and global_ops(views) == [expected, expected]


def test_mae_takes_one_crop_and_flip_only():
    views = built_views("method=mae", "dataset=imagefolder", "dataset.image_size=32", "backbone=vit_tiny")
    assert global_ops(views) == [{"crop": (0.2, 1.0), "flip": 0.5}]


def test_swav_multi_crop():
    """SwaV appendix A: crops 0.14-1 and 0.05-0.14, SimCLR's colour ops, blur on every crop."""
    views = built_views("method=swav", *RGB, "method.views.local_views=6")
    simclr_jitter = (0.8, 0.8, 0.8, 0.8, 0.2)
    every = {"flip": 0.5, "jitter": simclr_jitter, "grayscale": 0.2, "blur": 0.5}
    assert global_ops(views) == [{"crop": (0.14, 1.0), **every}] * 2
    assert ops(views.local_aug) == {"crop": (0.05, 0.14), **every} and views.local_views == 6


def test_dino_multi_crop_from_the_command_line():
    views = built_views("method=dino", *RGB, "method.views.local_views=4", "method.views.local_size=24",
                        "method.views.local_crop_scale=[0.1,0.3]")
    dino_jitter = (0.8, 0.4, 0.4, 0.2, 0.1)
    assert global_ops(views) == [
        {"crop": (0.4, 1.0), "flip": 0.5, "jitter": dino_jitter, "grayscale": 0.2, "blur": 1.0},
        {"crop": (0.4, 1.0), "flip": 0.5, "jitter": dino_jitter, "grayscale": 0.2, "blur": 0.1, "solarize": 0.2}]
    assert ops(views.local_aug) == {"crop": (0.1, 0.3), "flip": 0.5, "jitter": dino_jitter, "grayscale": 0.2,
                                    "blur": 0.5}
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    shapes = [tuple(v.shape) for v in views(images)]
    assert shapes == [(3, 3, 64, 64)] * 2 + [(3, 3, 24, 24)] * 4
    # the method itself is built for that many crops, and its step takes them
    cfg = compose(["stage=pretrain", "method=dino", *RGB, "method.views.local_views=4"])
    assert build_method(cfg, build(cfg.backbone))[0].local_views == 4


def test_views_adapt_to_what_the_data_set_fixes():
    """Digits (16 px, grey, not mirror-symmetric) fix flips, blur and crops: BYOL keeps its
    asymmetry only where the data allows it (solarize on view 2), no colour ops on grey."""
    first, second = global_ops(built_views("method=byol"))
    assert "blur" not in first and "flip" not in first and "grayscale" not in first
    assert first["crop"] == (0.5, 1.0) and first["jitter"] == (0.8, 0.4, 0.4, 0.0, 0.0)
    assert second == {**first, "solarize": 0.2}


def test_default_run_keeps_the_data_sets_view():
    """SimCLR on digits (the default run) sees exactly the digits yaml's own view, one batched
    call for both views: the README's default numbers depend on it."""
    views = built_views()
    cfg = compose(["stage=pretrain"])
    assert views.alike and views.plan.global_specs[0].crop_scale == tuple(cfg.dataset.augment.crop_scale)
    assert global_ops(views) == [{"crop": (0.5, 1.0), "rotation": 1.0, "jitter": (0.8, 0.4, 0.4, 0.0, 0.0)}] * 2


def test_streamed_views_cut_each_view_with_its_own_ops():
    views = built_views("method=byol", *RGB)
    views.in_workers = True
    crops = views.crops()
    assert [c.count for c in crops] == [1, 1]
    assert [c.augment.blur_prob for c in crops] == [1.0, 0.1] and [c.augment.solarize_prob for c in crops] == [0.0, 0.2]


@pytest.mark.parametrize("overrides,named", [
    (["method=byol", "method.views.per_view=[{blur_prob:1.0}]"], "per_view has 1 entries; byol takes 2"),
    (["method=byol", "+method.views.common.sharpen=0.5"], "method.views.common.sharpen is not a view op"),
    (["method=byol", "+method.views.local_views=2"], "method.views.local_views=2: byol takes no local crops"),
    (["method=mae", "method.views.global_views=2", "backbone=vit_tiny"], "method.views.global_views=2: mae takes 1"),
    (["dataset.augment.fixed=[blur]"], "dataset.augment.fixed names 'blur', not a view op"),
])
def test_bad_views_name_the_value(overrides, named):
    cfg = compose(["stage=pretrain", *overrides])
    with pytest.raises(ValueError, match=named.replace("[", r"\[")):
        build_method(cfg, build(cfg.backbone))


def test_finetune_view_sets_its_own_ops_over_the_data_sets():
    """Fine-tuning crops the data set's own view at scale >= crop_min; `stage.finetune.view` sets
    ops for the fine-tune alone (Fashion-MNIST: crops and flips, no jitter or rotation)."""
    from sslpipe.data.views import Augment
    from sslpipe.stages.finetune import finetune_spec

    def finetune_ops(*overrides: str) -> dict:
        cfg = compose(["stage=finetune", "dataset=fashion_mnist", *overrides])
        st = cfg.stage.finetune
        spec = finetune_spec(cfg.dataset.augment, st.crop_min, st.view)
        return ops(Augment(cfg.dataset.image_size, spec, [0.5], [0.25]))

    assert finetune_ops() == {"crop": (0.8, 1.0), "flip": 0.5, "rotation": 1.0, "jitter": (0.8, 0.4, 0.4, 0.0, 0.0)}
    assert finetune_ops("+stage.finetune.view={jitter_prob:0.0,rotation:0.0}") == {"crop": (0.8, 1.0), "flip": 0.5}
    pretraining = global_ops(built_views("dataset=fashion_mnist", "+stage.finetune.view={jitter_prob:0.0}"))
    assert pretraining == global_ops(built_views("dataset=fashion_mnist")) and "jitter" in pretraining[0]  # untouched


@pytest.mark.parametrize("override,named", [
    ("+stage.finetune.view={jitter:0.0}", "stage.finetune.view.jitter is not a view op; the ops are crop_scale"),
    ("+stage.finetune.view.hflip=1.5", r"stage.finetune.view.hflip=1.5 does not fit: expected a probability in \[0, 1\]"),
])
def test_bad_finetune_view_is_refused_before_any_work(override, named):
    from sslpipe.validate import ConfigError, validate

    with pytest.raises(ConfigError, match=named):
        validate(compose(["stage=pipeline", override]))
