"""stage=pretrain: train backbone + method heads with the method's SSL loss."""

from __future__ import annotations

import logging

import torch

from sslpipe import checkpoint as ckpt
from sslpipe import distributed
from sslpipe.config import build
from sslpipe.data import EpochLoader
from sslpipe.data.views import AugmentSpec, MultiView
from sslpipe.distributed import rank, world_size
from sslpipe.engine import Loop, LoopSettings, Preempted
from sslpipe.preempt import StopSignal
from sslpipe.progress import Progress
from sslpipe.stages import Context, StageResult, build_backbone, build_splits, print_table, stage_run

log = logging.getLogger(__name__)


def _loop_settings(st) -> LoopSettings:
    return LoopSettings(epochs=st.epochs, max_steps=st.max_steps, grad_accum=st.grad_accum,
                        warmup_epochs=st.warmup_epochs, min_lr_ratio=st.min_lr_ratio, amp=st.amp,
                        checkpoint_every=st.checkpoint_every, log_every=st.log_every)


def run(ctx: Context) -> StageResult:
    cfg, st = ctx.cfg, ctx.cfg.stage
    # ------------------------------------------------------------ processes (one, or DDP ranks from torchrun / SLURM)
    ctx.device = distributed.setup(ctx.device)
    ctx.run_dir = distributed.broadcast_object(ctx.run_dir)  # rank 0's folder: one checkpoint for all ranks
    # ------------------------------------------------------------ data
    splits = build_splits(ctx, labelled=False)
    loader = EpochLoader(splits.train, st.batch_size, shuffle=True, drop_last=True, seed=cfg.seed,
                         rank=rank(), world_size=world_size())
    # ------------------------------------------------------------ model
    method = build(cfg.method, backbone=build_backbone(ctx)).to(ctx.device)
    views = MultiView(cfg.dataset.image_size, AugmentSpec(**cfg.dataset.augment), list(cfg.dataset.norm.mean),
                      list(cfg.dataset.norm.std), global_views=method.global_views,
                      local_views=method.local_views).to(ctx.device)
    optimizer = build(st.optimizer)([p for p in method.parameters() if p.requires_grad])

    train_step = distributed.wrap(distributed.training_step_module(method), ctx.device)  # DDP when distributed

    def step(images: torch.Tensor, labels: torch.Tensor, progress: float) -> torch.Tensor:
        return train_step(views(images), labels, progress)

    # ------------------------------------------------------------ fit (resuming when our checkpoint exists)
    stop = StopSignal().install()  # SIGUSR2 / SIGTERM: checkpoint at the next step, then requeue
    progress = Progress(f"pretrain {cfg.method.name}", mode=None if distributed.is_main() else "off")
    loop = Loop(method, step, optimizer, loader, _loop_settings(st), ctx.device,
                ctx.run_dir / "checkpoints" / "last.pt", after_step=method.after_step, should_stop=stop.requested,
                progress=progress)
    loop.resume()
    try:
        return _fit(ctx, method, loop)
    except Preempted as stopped:
        log.warning("%s", stopped)
        stop.hand_over()  # requeue (submitit / sbatch) and exit
    finally:
        progress.close()
        stop.restore()


def _fit(ctx: Context, method, loop: Loop) -> StageResult:
    cfg = ctx.cfg
    with stage_run(ctx, run_id=loop.state.extra.get("run_id")) as run:
        loop.state.extra["run_id"] = run.id
        history: list[tuple[int, float, float]] = []

        def log_metrics(metrics: dict, step_no: int) -> None:
            history.append((step_no, metrics["train/loss"], metrics["train/lr"]))
            run.log_metrics(metrics, step_no)

        loop.log_metrics = log_metrics
        loop.run()
        # ------------------------------------------------------------ save and log
        final = ctx.run_dir / "checkpoints" / "final.pt"
        if distributed.is_main():
            ckpt.atomic_save({"encoder": method.backbone.state_dict(), "projector": method.projector.state_dict()}, final)
        run.set_tags({"sslpipe.checkpoint": str(final.resolve())})
        if cfg.tracking.log_checkpoints:
            run.log_artifact(final, "checkpoints")
        if history:
            from sslpipe.reports import curve_plot

            steps, losses, lrs = (list(v) for v in zip(*history))
            run.log_artifact(curve_plot(steps, losses, ctx.run_dir / "loss_curve.png", "train/loss"), "plots")
            run.log_artifact(curve_plot(steps, lrs, ctx.run_dir / "lr_curve.png", "train/lr"), "plots")
        metrics = {"train/final_loss": history[-1][1]} if history else {}
    print_table(f"pretrain {cfg.method.name} on {cfg.dataset.name}", f"final train/loss {metrics.get('train/final_loss', float('nan')):.4f}")
    return StageResult(metrics=metrics, outputs={"checkpoint": str(final)}, run_id=run.id)
