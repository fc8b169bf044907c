"""Loading an encoder from anything `pretrained=` names: a checkpoint of this project, another
tool's checkpoint (DDP, Lightning, MoCo, timm key layouts), an export folder, or `runs:/<id>`."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sslpipe.checkpoint import load

log = logging.getLogger(__name__)


# Prefixes that other tools put in front of backbone keys (DDP, Lightning, MoCo).
WRAPPER_PREFIXES = ("module.", "backbone.", "encoder_q.", "encoder.", "model.")


def strip_prefixes(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Drop wrapper prefixes (`module.`, `backbone.`, ...) while that makes more keys match."""
    def matches(sd):
        return len(expected & set(sd))

    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            inner = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            if inner and matches(inner) > matches(state):
                state, changed = inner, True
    return state


def adapt_timm_state(backbone: nn.Module, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Make a plain timm or torchvision state dict fit a headless timm backbone, as timm does
    when it loads pretrained weights: drop the classifier (`fc.*` for ResNets; torchvision's
    ResNet keys equal timm's), and sum or repeat the first conv's RGB filters for another
    input channel count (`timm.models.adapt_input_conv`). Only those two named places are
    touched; anything else that does not fit still fails. Returns the state and what changed."""
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    expected = backbone.state_dict()
    state, changes = dict(state), []
    heads = cfg.get("classifier") or ()
    for head in (heads,) if isinstance(heads, str) else heads:
        prefix = f"{head}."
        if not any(k.startswith(prefix) for k in expected):  # a headless backbone (num_classes=0)
            dropped = sorted(k for k in state if k.startswith(prefix))
            for k in dropped:
                del state[k]
            if dropped:
                changes.append(f"dropped the classifier {', '.join(dropped)}")
    first = f"{cfg['first_conv']}.weight" if isinstance(cfg.get("first_conv"), str) else None
    if first in state and first in expected:
        have, want = state[first].shape, expected[first].shape
        if have != want and have[:1] + have[2:] == want[:1] + want[2:]:
            from timm.models import adapt_input_conv

            state[first] = adapt_input_conv(want[1], state[first])
            changes.append(f"adapted {first} from {have[1]} to {want[1]} input channels")
    return state, changes


def load_encoder_state(backbone: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict load that names missing, unexpected and mis-shaped keys instead of hiding them.
    Wrapper prefixes (`module.`, `backbone.`, `encoder_q.`) are stripped first, and a plain
    timm/torchvision state dict is fitted to the headless backbone (`adapt_timm_state`)."""
    expected = backbone.state_dict()
    state = strip_prefixes(state, set(expected))
    state, changes = adapt_timm_state(backbone, state)
    for change in changes:
        log.warning("pretrained weights from %s: %s", source, change)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(state) & set(expected) if state[k].shape != expected[k].shape
    )
    if missing or unexpected or shapes:
        def show(keys):
            return ", ".join(keys[:8]) + (f" (+{len(keys) - 8} more)" if len(keys) > 8 else "")
        parts = [f"{len(missing)} missing: {show(missing)}" if missing else "",
                 f"{len(unexpected)} unexpected: {show(unexpected)}" if unexpected else "",
                 f"{len(shapes)} of another shape: {show(shapes)}" if shapes else ""]
        raise ValueError(f"encoder weights in {source} do not fit the backbone: " + "; ".join(p for p in parts if p))
    backbone.load_state_dict(state, strict=True)


@dataclass
class Pretrained:
    """The weights that `pretrained=` names, split into parts."""

    encoder: dict[str, torch.Tensor]
    projector: dict[str, torch.Tensor] | None
    source: str


def _from_file(path: Path, spec: str) -> Pretrained:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return Pretrained(load_file(path), None, str(path))
    try:
        obj = load(path)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means "not a checkpoint"
        raise ValueError(f"pretrained='{spec}' is not a loadable checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"pretrained='{spec}' holds a {type(obj).__name__}, not a state dict or checkpoint")
    if "encoder" in obj:  # sslpipe's final checkpoint
        return Pretrained(obj["encoder"], obj.get("projector"), str(path))
    for key in ("state_dict", "model"):  # Lightning / sslpipe's resumable checkpoint / others
        if isinstance(obj.get(key), dict):
            inner = obj[key]
            projector = {k.removeprefix("projector."): v for k, v in inner.items() if k.startswith("projector.")}
            return Pretrained(inner, projector or None, str(path))
    if all(isinstance(v, torch.Tensor) for v in obj.values()):  # a plain state dict (timm, torchvision)
        return Pretrained(obj, None, str(path))
    raise ValueError(f"pretrained='{spec}' holds no encoder weights (top-level keys: {sorted(obj)[:10]})")


def _from_folder(path: Path, spec: str) -> Pretrained:
    from sslpipe.tensorfiles import read_tensors

    for suffix in (".safetensors", ".json"):
        if (path / f"encoder{suffix}").exists():
            projector = path / f"projector{suffix}"
            return Pretrained(read_tensors(path / f"encoder{suffix}"),
                              read_tensors(projector) if projector.exists() else None, str(path))
    raise FileNotFoundError(f"pretrained='{spec}' is a folder without encoder.safetensors or encoder.json")


def pretrained_parts(spec: str, tracking_uri: str | None = None) -> Pretrained:
    """Resolve `pretrained=<spec>`: an export folder, a checkpoint file (.pt/.ckpt/.pth with an
    `encoder`, `model` or `state_dict` entry, or a plain state dict), a .safetensors file, or
    runs:/<mlflow run id>."""
    if spec.startswith("runs:/"):
        from sslpipe.tracking import resolve_run_checkpoint

        return pretrained_parts(resolve_run_checkpoint(spec, tracking_uri))
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(
            f"pretrained='{spec}' does not exist; give a checkpoint file, an export folder, "
            f"runs:/<mlflow run id>, or pretrained=random"
        )
    return _from_folder(path, spec) if path.is_dir() else _from_file(path, spec)


def load_pretrained(backbone: nn.Module, spec: str | None, stage: str, tracking_uri: str | None = None) -> str:
    """Fill `backbone` from `pretrained=`; returns where the weights came from."""
    if spec is None:
        raise ValueError(
            f"stage={stage} needs pretrained=<checkpoint | export folder | runs:/<run id>>, "
            f"or pretrained=random for the random-init baseline"
        )
    if spec == "random":
        return "random"
    parts = pretrained_parts(str(spec), tracking_uri)
    load_encoder_state(backbone, parts.encoder, parts.source)
    return parts.source
