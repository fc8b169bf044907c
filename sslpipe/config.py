"""Small helpers between composed configs and built objects."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

# Keys that describe a config node rather than feed its constructor.
# Keys of a `_target_` node that are not constructor arguments: `name`, and a method's
# `optim` block (its paper's optimizer settings, read by stage=pretrain).
_DESCRIPTIVE = ("name", "optim", "views")


def build(node: DictConfig, **kwargs: Any) -> Any:
    """Instantiate a `_target_` node, leaving out its descriptive keys (`name`)."""
    from hydra.utils import instantiate

    from hydra.errors import InstantiationException

    plain = OmegaConf.to_container(node, resolve=True)
    for key in _DESCRIPTIVE:
        plain.pop(key, None)
    try:
        return instantiate(plain, **kwargs)
    except InstantiationException as err:
        if err.__cause__ is not None:  # the constructor's own error says more than Hydra's wrapper
            raise err.__cause__ from None
        raise


def flatten(cfg: DictConfig | dict, prefix: str = "") -> dict[str, str]:
    """`{"method": {"temperature": 0.2}}` -> `{"method.temperature": "0.2"}`."""
    tree = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, prefix=f"{name}."))
        else:
            from sslpipe.tracking import redact

            flat[name] = redact(str(value))  # no credentials from URIs in params
    return flat


def compose(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The config `python -m sslpipe <overrides>` would run with, composed in-process (for tests
    and notebooks). Hydra's own node is set as current, so `${hydra:runtime.cwd}` resolves
    to this process's working directory, as at a real launch."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.hydra_config import HydraConfig

    with initialize_config_module("sslpipe.conf", version_base="1.3"):
        cfg = hydra_compose("config", overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg
