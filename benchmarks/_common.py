"""Shared by the benchmark scripts: the device's name, the command line, and tables.

Every figure is measured against a baseline in the same process (or the same script run),
with the two sides interleaved round by round so that a busy machine slows both alike."""

from __future__ import annotations

import os
import platform
import shlex
import statistics
import sys
import time


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(0)} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    return (f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{torch.get_num_threads()} torch threads (torch {torch.__version__})")


def header(title: str, device: str) -> None:
    print(f"## {title}\n")
    print(f"command: `{' '.join(shlex.quote(a) for a in ['python', *sys.argv])}`  ")
    print(f"device: {device_name(device)}  ")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M')}\n")


def table(columns: list[str], rows: list[list]) -> None:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
        return str(v)
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        print("| " + " | ".join(fmt(v) for v in row) + " |")
    print(flush=True)


def median(xs) -> float:
    return statistics.median(xs)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def make_npy(root, n: int, size: int, seed: int = 0) -> None:
    """Synthetic CIFAR-like splits for `dataset=npy`: smooth random colour fields, uint8
    (N, H, W, 3), 10 classes (train_*, test_*). Throughput does not depend on the pixels."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from pathlib import Path

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for split, count in (("train", n), ("test", max(20, n // 10))):
        chunks = []
        for i in range(0, count, 512):
            m = min(512, count - i)
            low = torch.rand(m, 3, 6, 6, generator=g)
            img = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
            img = img + 0.15 * torch.rand(m, 3, size, size, generator=g)
            chunks.append((img.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
        np.save(root / f"{split}_images.npy", np.concatenate(chunks))
        np.save(root / f"{split}_labels.npy", (np.arange(count) % 10).astype(np.int64))


class Training:
    """What stage=pretrain builds, built the same way (sslpipe.stages.pretrain), for one run."""

    def __init__(self, overrides: list[str], device: str, run_dir):
        import torch

        from sslpipe.config import build, compose
        from sslpipe.data.views import MultiView
        from sslpipe.engine import TrainingStep
        from sslpipe.data.loaders import device_pool
        from sslpipe.engine import prepare_model
        from sslpipe.optim import build_optimizer
        from sslpipe.stages.build import build_backbone, build_method, build_splits
        from sslpipe.stages.context import Context

        self.cfg = cfg = compose(["stage=pretrain", *overrides])
        st = cfg.stage.pretrain
        self.device = dev = torch.device(device)
        ctx = Context(cfg=cfg, run_dir=run_dir, device=dev, tracker=None)
        self.pool = device_pool(build_splits(ctx, labelled=False).train, dev)
        torch.manual_seed(cfg.seed)
        self.method, plan = build_method(cfg, build_backbone(ctx))
        self.method = self.method.to(dev)
        prepare_model(self.method, channels_last=st.channels_last, compile=st.compile)
        self.views = MultiView(cfg.dataset.image_size, plan, list(cfg.dataset.norm.mean),
                               list(cfg.dataset.norm.std)).to(dev)
        self.optimizer = build_optimizer(build(st.optimizer), [p for p in self.method.parameters() if p.requires_grad], dev)
        train_step = TrainingStep(self.method)
        self.step = lambda images, labels, progress: train_step(self.views(images), labels, progress)
        self.batch_size = st.batch_size

    def loader(self):
        from sslpipe.data.epochs import EpochLoader

        return EpochLoader(self.pool, self.batch_size, shuffle=True, drop_last=True, seed=self.cfg.seed)

    def bare_loop(self, steps: int) -> None:
        """The hand-written loop: batch, augment, forward, backward, optimizer step. Nothing else."""
        import torch

        loader, done, epoch = self.loader(), 0, 0
        amp = self.device.type == "cuda" and self.cfg.stage.pretrain.loop.amp
        while done < steps:
            loader.set_epoch(epoch)
            for images, labels in loader:
                images = images.to(self.device, non_blocking=True)
                labels = labels.to(self.device, non_blocking=True)
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=amp):
                    loss = self.step(images, labels, done / steps)
                loss.backward()
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.method.after_step(done / steps)
                done += 1
                if done == steps:
                    break
            epoch += 1
        sync(str(self.device))
