"""The optimizer as the SSL papers set it up: which parameters get weight decay, its
schedule, and gradient clipping. The training loop (sslpipe.engine.Loop) applies the per-step
parts; the stages build the parameter groups."""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Iterable

import torch
from torch import nn

# Parameters named so (the last part of the name) are embeddings or tokens: no weight decay,
# as DINO's utils.get_params_groups, MAE and timm's ViT `no_weight_decay()` set them.
TOKEN_NAMES = ("pos_embed", "cls_token", "mask_token", "dist_token", "reg_token")


def no_decay_names(model: nn.Module) -> set[str]:
    """Full names of `model`'s position embeddings and tokens: what any submodule's
    `no_weight_decay()` (timm's ViTs) lists, and parameters named as in TOKEN_NAMES."""
    names = {name for name, _ in model.named_parameters() if name.rsplit(".", 1)[-1] in TOKEN_NAMES}
    for prefix, module in model.named_modules():
        if callable(getattr(module, "no_weight_decay", None)):
            names |= {f"{prefix}.{n}" if prefix else n for n in module.no_weight_decay()}
    return names


def weight_decay_groups(model: nn.Module, weight_decay: float, exclude: bool = True,
                        fixed_lr_modules: Iterable[str] = ()) -> list[dict]:
    """The trainable parameters in two groups: biases, norm weights (every 1-d parameter),
    position embeddings and tokens without weight decay, the rest with `weight_decay`
    (timm's `param_groups_weight_decay`). Lightly's LARS skips its trust-ratio adaptation
    for a group without weight decay, so the same groups also exclude them from LARS, as
    SimCLR and BYOL do. `exclude=False`: one group, every parameter decayed.

    The parameters of the submodules named in `fixed_lr_modules` (SimSiam's predictor) go in
    groups of their own, after the others, marked `fixed_lr: True`: the loop keeps their
    learning rate at the base value (sslpipe.engine.Loop)."""
    from timm.optim import param_groups_weight_decay

    if not exclude:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    else:
        groups = param_groups_weight_decay(model, weight_decay, no_weight_decay_list=no_decay_names(model))
    fixed = {id(p) for name in fixed_lr_modules for p in model.get_submodule(name).parameters()}
    if not fixed:
        return [g for g in groups if g["params"]]
    scheduled = [{**g, "params": [p for p in g["params"] if id(p) not in fixed]} for g in groups]
    constant = [{**g, "params": [p for p in g["params"] if id(p) in fixed], "fixed_lr": True} for g in groups]
    return [g for g in scheduled + constant if g["params"]]


def clip_per_parameter(params: Iterable[torch.Tensor], max_norm: float) -> None:
    """Scale each parameter's gradient to norm <= max_norm on its own, as DINO's and iBOT's
    `utils.clip_gradients` do (not one global norm): torch's clip_grad_norm_ per parameter."""
    for p in params:
        if p.grad is not None:
            torch.nn.utils.clip_grad_norm_([p], max_norm)


def schedule_weight_decay(optimizer: torch.optim.Optimizer, progress: float, end: float) -> None:
    """Cosine from each decayed group's initial weight decay to `end` over training
    (DINO / iBOT: 0.04 -> 0.4, `utils.cosine_scheduler` per iteration). Groups without weight
    decay keep none. The initial value is kept in the group (and so in its checkpoint)."""
    for group in optimizer.param_groups:
        start = group.setdefault("initial_weight_decay", group["weight_decay"])
        if start > 0:
            group["weight_decay"] = end + (start - end) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def optimizer_config(stage, method):
    """The optimizer node a pretraining run builds: the stage's (`stage.pretrain.optimizer`, default), or
    with `stage.pretrain.optimizer_from=method` the one the method's paper trains with (`optim.optimizer`
    in its yaml: LARS for SimCLR / BYOL / Barlow Twins / VICReg / SwaV, SGD for MoCo v1/v2 and
    SimSiam, AdamW for DINO / iBOT / MAE), its lr per 256 images as the paper gives it."""
    source = stage.get("optimizer_from", "stage")
    if source == "stage":
        return stage.optimizer
    if source != "method":
        raise ValueError(f"stage.pretrain.optimizer_from={source!r}: choose stage (stage.pretrain.optimizer) or method (the "
                         "paper's optimizer in the method's yaml, optim.optimizer)")
    node = (method.get("optim") or {}).get("optimizer")
    if node is None:
        raise ValueError(f"stage.pretrain.optimizer_from=method: {method.name}'s yaml gives no optim.optimizer (its paper's "
                         "optimizer); use stage.pretrain.optimizer_from=stage")
    return node


def build_optimizer(factory, params, device: torch.device) -> torch.optim.Optimizer:
    """`factory(params)`, with `fused=True` on CUDA where the optimizer class takes it (SGD, Adam,
    AdamW: one kernel for all parameters)."""
    cls = factory.func if isinstance(factory, functools.partial) else factory
    keywords = factory.keywords if isinstance(factory, functools.partial) else {}
    takes_fused = inspect.isclass(cls) and "fused" in inspect.signature(cls).parameters
    if device.type == "cuda" and takes_fused and keywords.get("fused") is None:
        return factory(params, fused=True)
    return factory(params)
