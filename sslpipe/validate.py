"""Checks on the composed config that run before anything is built or written.

Hydra already rejects unknown groups, options and keys at compose time. What it cannot
see are values: a label fraction of 1.5, a negative learning rate, k = 0. Each rule names
a dotted key pattern, what fits, and a predicate; a failure names the key, the bad value
and what would fit."""

from __future__ import annotations

import fnmatch
import re
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

# Modules whose classes and functions a config's `_target_` may name. Anything else needs
# `allow_targets: [module.prefix, ...]` in the config: a yaml should not run arbitrary code.
TRUSTED_TARGETS = ("sslpipe.", "torch.", "torchvision.", "timm.", "lightly.", "kornia.")


class ConfigError(ValueError):
    """A config value that cannot work; the message names it and what would fit."""


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


Rule = tuple[str, str, Callable[[Any], bool]]
RULES: list[Rule] = [
    ("dataset.fraction", "a label fraction in (0, 1]", lambda v: _num(v) and 0 < v <= 1),
    ("dataset.data_ratio", "a data ratio in (0, 1]", lambda v: _num(v) and 0 < v <= 1),
    ("dataset.image_size", "an integer in 1..2048", lambda v: _int(v) and 1 <= v <= 2048),
    ("dataset.channels", "1 or 3", lambda v: v in (1, 3)),
    ("dataset.num_classes", "null (inferred from the data where it can be) or an integer >= 2",
     lambda v: v is None or (_int(v) and v >= 2)),
    ("seed", "an integer", _int),
    ("device", "one of auto, cpu, cuda, cuda:<n>", lambda v: isinstance(v, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", v)),
    ("stage*.epochs", "an integer >= 1", lambda v: _int(v) and v >= 1),
    ("stage*.batch_size", "an integer >= 1", lambda v: _int(v) and v >= 1),
    ("stage*.max_steps", "null or an integer >= 1", lambda v: v is None or (_int(v) and v >= 1)),
    ("stage*.grad_accum", "an integer >= 1", lambda v: _int(v) and v >= 1),
    ("stage*.split_bn", "an integer >= 1", lambda v: _int(v) and v >= 1),
    ("stage*.checkpoint_every", "an integer >= 1", lambda v: _int(v) and v >= 1),
    ("stage*.log_every", "an integer >= 1", lambda v: _int(v) and v >= 1),
    ("stage*.lr", "a learning rate > 0", lambda v: _num(v) and v > 0),
    ("stage*.clip_grad", "null or a number >= 0 (0: no clipping)", lambda v: v is None or (_num(v) and v >= 0)),
    ("stage*.weight_decay_end", "null or a number >= 0", lambda v: v is None or (_num(v) and v >= 0)),
    ("stage*.weight_decay_exclude", "true or false", lambda v: isinstance(v, bool)),
    ("stage*.monitor.every", "auto, 0 (off) or an integer >= 1", lambda v: v == "auto" or (_int(v) and v >= 0)),
    ("stage*.monitor.bank", "an integer >= 1", lambda v: _int(v) and v >= 1),
    ("stage*.monitor.queries", "an integer >= 1", lambda v: _int(v) and v >= 1),
    ("stage*.lr_scaling", "one of linear, sqrt, none", lambda v: v in ("linear", "sqrt", "none")),
    ("stage*.encoder", "null (the method's), student or teacher", lambda v: v in (None, "student", "teacher")),
    ("stage*.backbone_lr", "a learning rate >= 0 (0 freezes nothing; use linear_probe to freeze)", lambda v: _num(v) and v >= 0),
    ("stage*.head_lr", "a learning rate > 0", lambda v: _num(v) and v > 0),
    ("stage*.weight_decay", "a number >= 0", lambda v: _num(v) and v >= 0),
    ("stage*.warmup_epochs", "a number >= 0", lambda v: _num(v) and v >= 0),
    ("stage*.min_lr_ratio", "a number in [0, 1]", lambda v: _num(v) and 0 <= v <= 1),
    ("stage*.crop_min", "a number in (0, 1]", lambda v: _num(v) and 0 < v <= 1),
    ("stage*.k", "an integer >= 1", lambda v: _int(v) and v >= 1),
    ("stage*.temperature", "a number > 0", lambda v: _num(v) and v > 0),
    ("method.temperature", "a number > 0", lambda v: _num(v) and v > 0),
    ("method.*_dim", "an integer >= 1", lambda v: _int(v) and v >= 1),
    ("method.momentum_*", "a number in [0, 1]", lambda v: _num(v) and 0 <= v <= 1),
    *((f"{where}.crop_scale", "[min, max] with 0 < min <= max <= 1",
       lambda v: isinstance(v, list) and len(v) == 2 and all(_num(x) for x in v) and 0 < v[0] <= v[1] <= 1)
      for where in ("dataset.augment", "stage*.view")),  # a data set's view; a fine-tune's own ops
    *((f"{where}.{op}", "a probability in [0, 1]", lambda v: _num(v) and 0 <= v <= 1)
      for where in ("dataset.augment", "stage*.view") for op in ("*_prob", "hflip")),
]


def _walk(node: Any, prefix: str = ""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{prefix}{k}.")
    yield prefix.rstrip("."), node


def _targets(node: Any, prefix: str = ""):
    if isinstance(node, dict):
        if "_target_" in node:
            yield prefix or "<root>", node["_target_"]
        for k, v in node.items():
            yield from _targets(v, f"{prefix}{'.' if prefix else ''}{k}")


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError for the first value no stage could use."""
    try:
        tree = OmegaConf.to_container(cfg, resolve=True)
    except Exception as err:  # noqa: BLE001 - an interpolation that cannot resolve
        raise ConfigError(f"the config does not resolve: {err}") from None
    for key, value in _walk(tree):
        if fnmatch.fnmatchcase(key, "stage*.view") and isinstance(value, dict) and value:
            from sslpipe.data.views import SPEC_KEYS  # imports torch: only for a view that sets ops

            unknown = sorted(set(value) - set(SPEC_KEYS))
            if unknown:
                raise ConfigError(f"{key}.{unknown[0]} is not a view op; the ops are {', '.join(SPEC_KEYS)}")
        for pattern, fits, ok in RULES:
            if fnmatch.fnmatchcase(key, pattern) and not isinstance(value, dict) and not ok(value):
                raise ConfigError(f"{key}={value!r} does not fit: expected {fits}")
    allowed = TRUSTED_TARGETS + tuple(f"{p.rstrip('.')}." for p in tree.get("allow_targets") or [])
    for where, target in _targets(tree):
        if not isinstance(target, str) or not target.startswith(allowed):
            raise ConfigError(
                f"{where}._target_={target!r} is outside the trusted modules ({', '.join(p.rstrip('.') for p in allowed)}); "
                f"add its module to allow_targets=[...] if you mean it")
