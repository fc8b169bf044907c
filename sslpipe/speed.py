"""The fast path of a training stage: what a GPU step should not waste.

- The image pool moves to the GPU once when it fits (CIFAR-10's 50k uint8 images are
  150 MB), so a batch is an index lookup on the device and no host-to-device copy waits;
  a pool too large for that stays on the host and each batch is copied as before.
- CNN weights and activations in channels_last (NHWC): cuDNN's tensor-core convolutions
  want it, and NCHW costs a transpose per layer.
- Fused optimizers (one kernel for all parameters) where torch has them: SGD, Adam, AdamW.
- `torch.compile` of the backbone and projector as an option (`stage.compile`), in place,
  so state-dict keys (and checkpoints) stay the same.
bf16 autocast and the never-blocking loss read-back live in `sslpipe.engine`."""

from __future__ import annotations

import functools
import inspect
import logging

import torch
from torch import nn

from sslpipe.data import Split

log = logging.getLogger(__name__)

# Share of the GPU's free memory that the uint8 image pool may take.
POOL_SHARE = 0.25


def device_pool(split: Split, device: torch.device) -> Split:
    """`split` on `device` when it fits in POOL_SHARE of the free GPU memory; else `split` itself."""
    if device.type != "cuda":
        return split
    need = split.images.nbytes
    free, _ = torch.cuda.mem_get_info(device)
    if need <= POOL_SHARE * free:
        return Split(split.images.to(device), split.labels)  # labels stay on the host: samplers read them
    log.info("image pool (%.1f GB) kept on the host: more than %.0f%% of the GPU's free %.1f GB",
             need / 1e9, 100 * POOL_SHARE, free / 1e9)
    return split


def has_convolutions(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in module.modules())


def prepare_model(method: nn.Module, channels_last: bool, compile: bool) -> nn.Module:
    """channels_last for CNN backbones; `torch.compile` of backbone and projector (in place)."""
    if channels_last and has_convolutions(method.backbone):
        method.to(memory_format=torch.channels_last)
    if compile:
        for name in ("backbone", "projector"):
            getattr(method, name).compile()  # nn.Module.compile: keys stay unprefixed
    return method


def build_optimizer(factory, params, device: torch.device) -> torch.optim.Optimizer:
    """`factory(params)`, with `fused=True` on CUDA where the optimizer class takes it."""
    cls = factory.func if isinstance(factory, functools.partial) else factory
    keywords = factory.keywords if isinstance(factory, functools.partial) else {}
    takes_fused = inspect.isclass(cls) and "fused" in inspect.signature(cls).parameters
    if device.type == "cuda" and takes_fused and keywords.get("fused") is None:
        return factory(params, fused=True)
    return factory(params)
