"""What the command says about bad input, before and after Hydra: a group option that does not
exist (`method=nosuch`), a key the config does not have (`stage.pretrain.loop.epoch=3`), and whether an error
escaping a stage is the input's fault or sslpipe's bug. Only hydra and omegaconf are imported."""

from __future__ import annotations

import difflib

from omegaconf import DictConfig, OmegaConf


def is_user_error(err: Exception) -> bool:
    """What bad input, missing files or a failing run raise: ValueError, OSError, RuntimeError
    (sslpipe's own errors subclass these, as do torch's and timm's for a bad value) and MLflow's
    store errors (matched by name: importing mlflow here would slow `--help`). Anything else
    escaping a stage (TypeError, KeyError, AttributeError, ...) is a bug and is reported as one."""
    return isinstance(err, (ValueError, OSError, RuntimeError)) or \
        any(c.__name__ == "MlflowException" for c in type(err).__mro__)



def unknown_key_hint(args: list[str]) -> str | None:
    """For an override of a key the config does not have (`stage.pretrain.loop.epoch=3`), name the keys it
    does have at that level and the closest match. Runs only after Hydra has failed."""
    from hydra import compose, initialize_config_module
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        overrides = OverridesParser.create().parse_overrides([a for a in args if "=" in a and not a.startswith("-")])
    except Exception:  # noqa: BLE001 - Hydra already reported the parse error
        return None
    groups = {"method", "backbone", "dataset", "stage", "experiment"}
    choices = [o.input_line for o in overrides if o.key_or_group in groups or o.key_or_group.startswith("+experiment")]
    try:
        with initialize_config_module("sslpipe.conf", version_base="1.3"):
            cfg = compose("config", overrides=choices)
    except Exception:  # noqa: BLE001 - the bad value is a group choice; Hydra named the options
        return None
    hints = []
    for o in overrides:
        key = o.key_or_group
        if o.is_add() or o.is_delete() or key in groups or key.startswith("hydra") or "/" in key or "@" in key:
            continue
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if not isinstance(node, DictConfig) or leaf in node:
            continue
        prefix = f"{parent}." if parent else ""
        valid = sorted(str(k) for k in node.keys())
        close = [prefix + c for c in difflib.get_close_matches(leaf, valid, n=1)]
        if not close:  # the key may sit deeper: stage.epochs -> stage.pretrain.loop.epochs
            deeper = list(_paths(node, prefix))
            match = difflib.get_close_matches(leaf, {p.rpartition(".")[2] for p in deeper}, n=1)
            close = [p for p in deeper if match and p.rpartition(".")[2] == match[0]]
            if close:  # name the keys where the first candidate sits
                parent = close[0].rpartition(".")[0]
                valid = sorted(str(k) for k in OmegaConf.select(cfg, parent).keys())
        did = f" (did you mean '{close[0]}'?)" if len(close) == 1 else \
            f" (did you mean one of: {', '.join(close)}?)" if close else ""
        hints.append(f"Unknown key '{key}'{did}; valid keys under '{parent or '<root>'}': {', '.join(valid)}")
    return "\n".join(hints) or None


def _paths(node: DictConfig, prefix: str):
    """Every dotted key path under `node`, in the config's order."""
    for k, v in node.items():
        yield f"{prefix}{k}"
        if isinstance(v, DictConfig):
            yield from _paths(v, f"{prefix}{k}.")


GROUPS = ("method", "backbone", "dataset", "stage", "experiment")


def check_choices(args: list[str]) -> str | None:
    """`method=nosuch` -> one short line naming the bad option and the valid ones (Hydra's own
    message for this also lists its search path). Sweeps (`method=a,b`) check each value."""
    from importlib.resources import files

    conf = files("sslpipe.conf")
    for arg in args:
        key, eq, value = arg.lstrip("+").partition("=")
        if not eq or key not in GROUPS or any(c in value for c in "()[]{}$"):
            continue
        valid = sorted(p.name.removesuffix(".yaml") for p in conf.joinpath(key).iterdir() if p.name.endswith(".yaml"))
        for option in value.split(","):
            if option not in valid:
                return f"sslpipe: error: {key}={option} is not an option of '{key}'; valid: {', '.join(valid)}"
    return None
