"""The one training loop, shared by pretrain and finetune.

It knows nothing of methods or data: a stage hands it a `step` function that turns one
batch into a loss, the parameters' optimizer, a loader, and plain settings. It owns the
schedule (linear warm-up + cosine), gradient accumulation, AMP on CUDA, periodic atomic
checkpoints and resume, throughput and data-wait measurement."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from sslpipe import checkpoint as ckpt
from sslpipe import distributed, optim, seeding

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    pass


class Preempted(Exception):
    """A stop was requested (SIGUSR2/SIGTERM, see sslpipe.preempt); the checkpoint is saved."""


@dataclass
class LoopSettings:
    epochs: int
    max_steps: int | None = None
    grad_accum: int = 1
    warmup_epochs: float = 0.0
    min_lr_ratio: float = 0.0
    amp: bool = True
    checkpoint_every: int = 500
    log_every: int = 10
    clip_grad: float | None = None         # per-parameter gradient norm cap (sslpipe.optim.clip_per_parameter)
    weight_decay_end: float | None = None  # cosine weight-decay schedule to this (sslpipe.optim.schedule_weight_decay)

    @classmethod
    def of_stage(cls, st, recipe=None) -> "LoopSettings":
        """`stage.<name>.loop` (pretrain, finetune, segment), one key per field. `clip_grad` and
        `weight_decay_end` left null there come from `recipe` (a method's `optim` block: what its
        paper uses); clip_grad 0 turns clipping off."""
        loop, recipe = dict(st.loop), recipe or {}
        for key in ("clip_grad", "weight_decay_end"):
            if loop.get(key) is None:
                loop[key] = recipe.get(key)
        loop["clip_grad"] = loop["clip_grad"] or None
        return cls(**loop)


@dataclass
class LoopState:
    step: int = 0          # optimizer steps done
    epoch: int = 0         # current epoch
    batch: int = 0         # next batch index within the epoch
    extra: dict = field(default_factory=dict)  # stage-owned values (e.g. the MLflow run id)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ValueError(f"device='{name}' is not one of: auto, cpu, cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device='{name}' but CUDA is not available here; use device=auto or device=cpu")
    return torch.device(name)


def to_device(batch, device: torch.device):
    """A batch's images on `device`: one tensor, or a tuple of tensors (one per crop size)."""
    if isinstance(batch, (tuple, list)):
        return tuple(t.to(device, non_blocking=True) for t in batch)
    return batch.to(device, non_blocking=True)


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float) -> Callable[[int], float]:
    """Multiplier of the base lr at optimizer step i: linear warm-up, then cosine to min_ratio."""
    def factor(i: int) -> float:
        if i < warmup_steps:
            return (i + 1) / warmup_steps
        t = (i - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    return factor


def constant_lr(i: int) -> float:
    """Multiplier of the base lr for a group that is not scheduled: always 1."""
    return 1.0


LR_SCALING = ("linear", "sqrt", "none")


@dataclass(frozen=True)
class LrScale:
    """How a base learning rate, given per 256 images, becomes the rate of one optimizer step
    over `global_batch` images (every rank's batch x grad_accum): `linear` multiplies by
    global_batch / 256 (Goyal et al. 2017, "Accurate, Large Minibatch SGD", and the rule of
    every method here: SimCLR's LARS 0.3 x B/256, MoCo 0.03 x B/256, BYOL 0.2 x B/256, SimSiam
    0.05 x B/256, DINO/iBOT 5e-4 x B/256, MoCo v3 and MAE blr x B/256, fine-tuning and linear
    probing included); `sqrt` by its square root (Krizhevsky 2014; SimCLR appendix B.1 for
    small batches: 0.075 x sqrt(B) = 1.2 x sqrt(B/256)); `none` uses the base rate as given."""

    rule: str
    global_batch: int

    def __post_init__(self):
        if self.rule not in LR_SCALING:
            raise ValueError(f"lr_scaling='{self.rule}' is not one of: {', '.join(LR_SCALING)}")

    @classmethod
    def of_run(cls, rule: str, per_rank_batch: int, grad_accum: int = 1) -> "LrScale":
        """The scale for this process group: world size x per-rank batch x grad_accum images."""
        return cls(rule, distributed.world_size() * per_rank_batch * grad_accum)

    @property
    def factor(self) -> float:
        ratio = self.global_batch / 256
        return {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[self.rule]

    def __call__(self, base_lr: float) -> float:
        return base_lr * self.factor

    def params(self, **base_rates: float) -> dict[str, str]:
        """MLflow params: the global batch, the rule, and each effective rate (`train.<name>`)."""
        return {"train.global_batch": str(self.global_batch), "train.lr_scaling": self.rule,
                **{f"train.{name}": f"{self(base):.6g}" for name, base in base_rates.items()}}


def total_steps(settings: LoopSettings, batches_per_epoch: int) -> int:
    steps = settings.epochs * (batches_per_epoch // settings.grad_accum)
    return min(steps, settings.max_steps) if settings.max_steps else steps


def has_convolutions(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in module.modules())


def prepare_model(method: nn.Module, channels_last: bool, compile: bool) -> nn.Module:
    """The model's fast path on a GPU: channels_last (NHWC) for CNN backbones (cuDNN's tensor-core
    convolutions want it; NCHW costs a transpose per layer) and, with `compile`, `torch.compile` of
    backbone and projector in place, so state-dict keys (and checkpoints) stay the same. bf16
    autocast and the never-blocking loss read-back are in Loop."""
    if channels_last and has_convolutions(method.backbone):
        method.to(memory_format=torch.channels_last)
    if compile:
        for name in ("backbone", "projector"):
            # nn.Module.compile: keys stay unprefixed. Static shapes, one graph per view size (DINO:
            # 2): with automatic dynamic shapes the second size recompiles symbolically, and a ViT's
            # position-embedding resize (bicubic, antialiased) then fails in its backward's meta
            # kernel (pytorch/pytorch#197622; measured: ViT-S/16 DINO on an H200, torch 2.11,
            # docs/benchmarks.md; reproduced on CPU with torch 2.14.1).
            getattr(method, name).compile(dynamic=False)
    return method


class TrainingStep(nn.Module):
    """A method's training step as a module: `forward(views, labels, progress)` returns
    `method.training_step(views, labels, progress)`, the method's loss. stage=pretrain wraps this
    module in DDP (not the method itself), so DDP's forward, which arms the gradient all-reduce,
    runs around the method's own step; checkpoints keep `method`'s keys, whatever the world size."""

    def __init__(self, method: nn.Module):
        super().__init__()
        self.method = method

    def forward(self, views: list[torch.Tensor], labels: torch.Tensor, progress: float) -> torch.Tensor:
        return self.method.training_step(views, labels, progress)


class Loop:
    """`Loop(...).run(log_metrics)` trains to the end, resuming from `checkpoint_path` when it
    exists (`resume()` first). Each optimizer step is: `step(images, labels, progress)` -> loss,
    backward, clipping, `model.before_optimizer_step(progress)` (e.g. DINO's frozen last layer),
    optimizer step, `model.after_step(progress)` (e.g. an EMA teacher's update). The two hooks are
    the model's own methods where it has them (the optional and required members of
    sslpipe.methods.Method); a model without them (a fine-tune classifier) skips them."""

    def __init__(self, model: nn.Module, step: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor],
                 optimizer: torch.optim.Optimizer, loader, settings: LoopSettings, device: torch.device,
                 checkpoint_path: Path,
                 should_stop: Callable[[], bool] = lambda: False, progress=None, seed: int = 0):
        if settings.grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {settings.grad_accum}")
        self.model, self.step_fn, self.optimizer, self.loader = model, step, optimizer, loader
        self.settings, self.device, self.path = settings, device, Path(checkpoint_path)
        self.should_stop = should_stop
        self.progress = progress  # e.g. sslpipe.progress.Progress: update(step, total, epoch, loss, images) per step
        self.total = total_steps(settings, len(loader))
        if self.total < 1:
            raise ValueError(f"nothing to train: {settings.epochs} epochs of {len(loader)} batches "
                             f"(grad_accum {settings.grad_accum}, max_steps {settings.max_steps})")
        warmup = int(settings.warmup_epochs * len(loader) / settings.grad_accum)
        # groups marked fixed_lr (sslpipe.optim.weight_decay_groups: SimSiam's predictor) keep the base lr
        schedule = warmup_cosine(self.total, min(warmup, self.total // 2), settings.min_lr_ratio)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, [constant_lr if group.get("fixed_lr") else schedule for group in optimizer.param_groups])
        self.state = LoopState()
        self.seed, self.resumed = seed, False
        self.rank_digests: list[str] = []  # each rank's weights_digest at the end of run()
        self.amp = settings.amp and device.type == "cuda"
        # On CUDA the loss is read back only when it is logged or a checkpoint is written, so
        # the host never waits for the device mid-step; the losses since the last check are
        # summed on the device (a non-finite one makes the sum non-finite).
        self.sync_every_step = device.type != "cuda"
        self._unchecked, self._unchecked_from = None, 0

    # ---------------------------------------------------------------- checkpoints
    def check_finite(self) -> None:
        """Raise NonFiniteLossError if a loss since the last check was NaN/inf (CUDA path)."""
        if self._unchecked is not None and not torch.isfinite(self._unchecked):
            raise self._non_finite(self._unchecked.item(), f"between steps {self._unchecked_from} and {self.state.step}")
        self._unchecked, self._unchecked_from = None, self.state.step

    def _non_finite(self, loss: float, when: str) -> NonFiniteLossError:
        """The one NaN / inf message: when it happened, what checkpoint is kept, what to change."""
        kept = (f"the last good checkpoint is kept at {self.path}" if self.path.exists()
                else "no checkpoint had been written yet")
        return NonFiniteLossError(f"loss became {loss} {when} (epoch {self.state.epoch}); {kept}. "
                                  f"Lower the learning rate or check the data.")

    def save(self) -> None:
        self.check_finite()  # never overwrite a good checkpoint with weights a NaN step has touched
        streams = seeding.gather_rng_states()  # every rank's random stream (a collective: all ranks call it)
        if not distributed.is_main():  # one writer; every rank resumes from the same file
            return
        ckpt.atomic_save({
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "rng": {"ranks": streams},
            "loop": {"step": self.state.step, "epoch": self.state.epoch, "batch": self.state.batch},
            "extra": self.state.extra,
        }, self.path)

    def resume(self) -> bool:
        """Restore model, optimizer, schedule, RNG and position from our own last checkpoint."""
        if not self.path.exists():
            return False
        saved = ckpt.load(self.path)
        self.model.load_state_dict(saved["model"], strict=True)
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.state = LoopState(**saved["loop"], extra=saved.get("extra", {}))
        seeding.restore_rank_stream(saved["rng"], self.seed, distributed.rank(), distributed.world_size(),
                                    self.state.step)
        self.resumed = True
        log.info("resumed from %s at step %d (epoch %d, batch %d)", self.path, self.state.step, self.state.epoch, self.state.batch)
        return True

    # ---------------------------------------------------------------- training
    def run(self, log_metrics: Callable[[dict, int], None] = lambda metrics, step: None) -> LoopState:
        """Train to the end; every `settings.log_every` steps `log_metrics(metrics, step)` gets the
        train/ loss, lr, images per second, data-wait share and epoch."""
        s, state = self.settings, self.state
        if not self.resumed:  # each rank's own augmentation / dropout stream (sslpipe.seeding)
            seeding.seed_rank_stream(self.seed, distributed.rank())
        self.model.train()
        loss_sum, loss_n, images, wait, t_last = 0.0, 0, 0, 0.0, time.perf_counter()
        accum = 0
        while state.step < self.total and state.epoch < s.epochs:
            self.loader.set_epoch(state.epoch, start=state.batch)
            t_data = time.perf_counter()
            for images_u8, labels in self.loader:
                wait += time.perf_counter() - t_data
                images_u8 = to_device(images_u8, self.device)  # a tensor, or the stream loader's tuple of crops
                labels = labels.to(self.device, non_blocking=True)
                progress = state.step / self.total
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                    loss = self.step_fn(images_u8, labels, progress)
                if self.sync_every_step and not torch.isfinite(loss):
                    raise self._non_finite(loss.item(), f"at step {state.step}")
                (loss / s.grad_accum).backward()
                accum += 1
                state.batch += 1
                loss_sum += loss.detach().float()  # a device scalar: read back only when logged
                if not self.sync_every_step:
                    self._unchecked = loss.detach().float() + (0.0 if self._unchecked is None else self._unchecked)
                loss_n += 1
                images += len(labels)
                if accum == s.grad_accum:
                    self._optimizer_step(state.step / self.total)
                    self.optimizer.zero_grad(set_to_none=True)
                    self.scheduler.step()
                    accum = 0
                    state.step += 1
                    if hasattr(self.model, "after_step"):  # an EMA / momentum teacher's update
                        self.model.after_step(state.step / self.total)
                    if self.progress is not None:  # the loss stays a device scalar unless it is drawn
                        self.progress.update(state.step, self.total, state.epoch + state.batch / len(self.loader),
                                             loss.detach(), len(labels) * s.grad_accum)
                    if state.step % s.log_every == 0 or state.step == self.total:
                        self.check_finite()
                        elapsed = time.perf_counter() - t_last
                        log_metrics({
                            "train/loss": distributed.mean_over_ranks(float(loss_sum) / loss_n),
                            "train/lr": self.optimizer.param_groups[0]["lr"],
                            "train/images_per_s": images / max(elapsed, 1e-9),
                            "train/data_wait": wait / max(elapsed, 1e-9),
                            "train/epoch": state.epoch + state.batch / len(self.loader),
                        }, state.step)
                        loss_sum, loss_n, images, wait, t_last = 0.0, 0, 0, 0.0, time.perf_counter()
                    if state.step % s.checkpoint_every == 0 or state.step == self.total:
                        self.save()
                    if state.step >= self.total:
                        break
                    if self.should_stop():  # preemption / time-out: checkpoint here, the stage hands over
                        self.save()
                        raise Preempted(f"stopped at step {state.step} by a signal; checkpoint {self.path}")
                t_data = time.perf_counter()
            else:
                if accum:  # a partial accumulation at the epoch's end is dropped, so resume is exact
                    self.optimizer.zero_grad(set_to_none=True)
                    accum = 0
                state.epoch, state.batch = state.epoch + 1, 0
                log.info("epoch %d/%d done, step %d/%d", state.epoch, s.epochs, state.step, self.total)
                continue
            break
        # DDP keeps the ranks' weights equal by construction; this checks it (one tiny gather)
        self.rank_digests = distributed.gather_objects(distributed.weights_digest(self.model.named_parameters()))
        if len(set(self.rank_digests)) > 1:
            log.warning("the ranks ended with different weights: %s", self.rank_digests)
        return state

    def _optimizer_step(self, progress: float) -> None:
        """Clip (per parameter), let the method drop gradients (a frozen layer: grad None, so
        the optimizer leaves it bitwise unchanged, weight decay included), set this step's
        weight decay, step. The order is DINO's train_one_epoch: clip, cancel, step."""
        s = self.settings
        if s.clip_grad:
            optim.clip_per_parameter(self.model.parameters(), s.clip_grad)
        if hasattr(self.model, "before_optimizer_step"):  # e.g. DINO's frozen last layer: grads set to None
            self.model.before_optimizer_step(progress)
        if s.weight_decay_end is not None:
            optim.schedule_weight_decay(self.optimizer, progress, s.weight_decay_end)
        self.optimizer.step()

    def agreement_tags(self) -> dict[str, str]:
        """MLflow tags: the world size the loop trained with and whether every rank ended with
        the same weights (`equal <sha1>`, or `DIFFER` and each rank's digest)."""
        digests = self.rank_digests
        verdict = f"equal {digests[0]}" if len(set(digests)) == 1 else "DIFFER " + " ".join(digests)
        return {"sslpipe.rank_weights": verdict, "sslpipe.train_world_size": str(len(digests))}
