"""stage=pretrain: train backbone + method heads with the method's SSL loss."""

from __future__ import annotations

import functools
import logging

import torch
from hydra.utils import get_class

from sslpipe import checkpoint as ckpt
from sslpipe import distributed
from sslpipe.batchnorm import convert_split_bn
from sslpipe.config import build
from sslpipe.data.loaders import device_pool, is_streamed, ops_in_workers, training_loader, with_sample_ids
from sslpipe.data.samplers import ClassBalancedLoader
from sslpipe.data.views import MultiView
from sslpipe.distributed import rank, world_size
from sslpipe.engine import Loop, LoopSettings, LrScale, TrainingStep, prepare_model
from sslpipe.methods import capability
from sslpipe.methods.ema import saved_encoder
from sslpipe.monitor import Monitor, subset
from sslpipe.optim import build_optimizer, optimizer_config, weight_decay_groups
from sslpipe.progress import Progress
from sslpipe.results import print_table
from sslpipe.stages.build import build_backbone, build_method, build_splits, normalizer
from sslpipe.stages.context import Context, StageResult, stage_run

log = logging.getLogger(__name__)


def check_pairing(method_name: str, method_cls, backbone: torch.nn.Module, backbone_name: str) -> None:
    """A method that needs a ViT (iBOT, MAE: masked patch tokens) fails here, before any data is
    read, naming what fits."""
    from sslpipe.methods.vit import require_vit

    if capability(method_cls, "needs_vit"):
        require_vit(backbone, method_name, backbone_name)


def _loader(cfg, st, method_cls, train, views: MultiView, device: torch.device):
    """Shuffled batches (from memory, or streamed with every view cut in the workers);
    class-balanced ones (stage.pretrain.batch_size // method.samples_per_class classes x
    samples_per_class images) for a method that declares `class_balanced` (SIMO2)."""
    from sslpipe.validate import ConfigError

    if capability(method_cls, "needs_sample_ids"):  # MoCo v1/v2: each image's index as its "label"
        train = with_sample_ids(train)
    if not capability(method_cls, "class_balanced"):
        return training_loader(train, st.batch_size, views.crops(), seed=cfg.seed, rank=rank(),
                               world_size=world_size(), device=device)
    if is_streamed(train):
        raise ConfigError(f"{cfg.method.name} draws class-balanced batches, which the streaming loader does not "
                          f"make yet; use dataset.loader=memory (a data set that fits in memory)")
    per_class = cfg.method.samples_per_class
    classes = min(st.batch_size // per_class, int((train.labels.unique() >= 0).sum()))
    if classes < 2:
        raise ConfigError(f"{cfg.method.name} draws class-balanced batches of stage.pretrain.batch_size // "
                          f"method.samples_per_class classes; {st.batch_size} // {per_class} = "
                          f"{st.batch_size // per_class} < 2. Raise stage.pretrain.batch_size to >= {2 * per_class} "
                          f"or lower method.samples_per_class")
    if classes * per_class != st.batch_size:
        log.info("%s: class-balanced batches of %d classes x %d images = %d (stage.pretrain.batch_size=%d)",
                 cfg.method.name, classes, per_class, classes * per_class, st.batch_size)
    return ClassBalancedLoader(train, per_class, classes, seed=cfg.seed, rank=rank(), world_size=world_size())


def run(ctx: Context) -> StageResult:
    cfg, st = ctx.cfg, ctx.settings
    # ------------------------------------------------------------ what the method needs (fail before any work)
    method_cls = get_class(cfg.method._target_)
    backbone = build_backbone(ctx)
    check_pairing(cfg.method.name, method_cls, backbone, cfg.backbone.name)
    # ------------------------------------------------------------ data
    splits = build_splits(ctx, labelled=method_cls.needs_labels)  # supervised: labelled train only
    train = splits.train if is_streamed(splits.train) else device_pool(splits.train, ctx.device)
    # ------------------------------------------------------------ model and views
    method, plan = build_method(cfg, backbone)  # and its views: the paper's, adapted to the data
    method = convert_split_bn(method, st.split_bn)
    saved_encoder(method, st.encoder)  # a teacher asked of a method without one fails before training
    # streamed: the loader's workers cut the crops from the original images; the other view ops
    # run batched on the GPU, or, training on the CPU, per image in the workers too
    views = MultiView(cfg.dataset.image_size, plan, list(cfg.dataset.norm.mean), list(cfg.dataset.norm.std),
                      crop=not is_streamed(train), in_workers=ops_in_workers(train, ctx.device)).to(ctx.device)
    loader = _loader(cfg, st, method_cls, train, views, ctx.device)
    if capability(method, "fit_data"):  # e.g. MoCo's queue: no larger than the data allows
        method.fit_data(len(splits.train), loader.batch_size)
    method = method.to(ctx.device)
    method = prepare_model(method, channels_last=st.channels_last, compile=st.compile)  # channels_last, torch.compile
    # the stage's optimizer or the method paper's (stage.pretrain.optimizer_from); its lr is per 256 images and
    # the step's rate follows the global batch (engine.LrScale)
    opt = optimizer_config(st, cfg.method)
    lr_scale = LrScale.of_run(st.lr_scaling, loader.batch_size, st.loop.grad_accum)
    factory = functools.partial(build(opt), lr=lr_scale(opt.lr))
    # no weight decay (nor LARS adaptation) on biases, norms, position embeddings, tokens (sslpipe.optim)
    # and the parts trained at a constant lr (SimSiam's predictor) in groups of their own
    groups = weight_decay_groups(method, opt.get("weight_decay", 0.0), st.weight_decay_exclude,
                                 capability(method, "fixed_lr_modules"))
    optimizer = build_optimizer(factory, groups, ctx.device)

    train_step = distributed.wrap(TrainingStep(method), ctx.device,  # DDP when distributed
                                  sync_bn=capability(method_cls, "sync_bn"))

    def step(images: torch.Tensor, labels: torch.Tensor, progress: float) -> torch.Tensor:
        return train_step(views(images), labels, progress)

    # ------------------------------------------------------------ fit (resuming when our checkpoint exists)
    progress = Progress(f"pretrain {cfg.method.name}", mode=None if distributed.is_main() else "off")
    settings = LoopSettings.of_stage(st, recipe=cfg.method.get("optim"))  # clipping etc.: the method's paper
    loop = Loop(method, step, optimizer, loader, settings, ctx.device, ctx.run_dir / "checkpoints" / "last.pt",
                should_stop=ctx.should_stop,  # SIGUSR2 / SIGTERM: checkpoint at the next step (sslpipe/__main__.py)
                progress=progress, seed=cfg.seed)
    loop.resume()
    monitor = _monitor(ctx, splits, method, loop.total, loop.state.step)
    try:
        return _fit(ctx, method, loop, lr_scale, monitor, progress)
    finally:
        progress.close()


MONITOR_BUDGET = 0.05  # `stage.pretrain.monitor.every: auto` keeps the online checks under 5 % of training time


def _monitor(ctx: Context, splits, method, total: int, start_step: int) -> Monitor | None:
    """The online kNN and collapse signals on the encoder the run saves (DINO: the teacher),
    every `stage.pretrain.monitor.every` steps (auto: about 10 checks, on logged steps); None when off
    or when the data has no labelled held-out split."""
    st = ctx.settings
    every, budget = st.monitor.every, None
    if every == "auto":  # about 10 checks, widened while they would cost over 5 % of training
        every, budget = max(1, round(total / 10 / st.loop.log_every)) * st.loop.log_every, MONITOR_BUDGET
    queries = splits.val if splits.val is not None else splits.test
    if not every or queries is None or not bool((splits.train.labels >= 0).any()):
        return None
    if every % st.loop.log_every:
        every = -(-every // st.loop.log_every) * st.loop.log_every
        log.info("stage.pretrain.monitor.every rounded up to %d, a multiple of loop.log_every", every)
    _, encoder, _ = saved_encoder(method, st.encoder)
    return Monitor(encoder, subset(splits.train, st.monitor.bank, ctx.cfg.seed),
                   subset(queries, st.monitor.queries, ctx.cfg.seed), normalizer(ctx).to(ctx.device), ctx.device,
                   ctx.cfg.dataset.num_classes, every, budget=budget, multiple=st.loop.log_every, start_step=start_step)


def _fit(ctx: Context, method, loop: Loop, lr_scale: LrScale, monitor: Monitor | None, progress: Progress) -> StageResult:
    cfg = ctx.cfg
    with stage_run(ctx, run_id=loop.state.extra.get("run_id")) as run:
        loop.state.extra["run_id"] = run.id
        opt = optimizer_config(ctx.settings, cfg.method)
        run.log_params({**lr_scale.params(lr=opt.lr), "train.optimizer": opt._target_.rsplit(".", 1)[-1]})
        history: list[tuple[int, float, float]] = []

        def log_metrics(metrics: dict, step_no: int) -> None:
            history.append((step_no, metrics["train/loss"], metrics["train/lr"]))
            online = monitor(step_no, loop.total) if monitor else {}
            if online:
                progress.note = monitor.note(online)
                if monitor.collapsed_at == step_no:
                    run.set_tags({"sslpipe.collapse": f"step {step_no}: feature std {online['online/feature_std']:.3f}, "
                                                      f"rank {online['online/rank']:.2f}"})
            run.log_metrics({**metrics, **online}, step_no)

        loop.run(log_metrics)
        run.set_tags(loop.agreement_tags())
        # ------------------------------------------------------------ save and log
        final = ctx.run_dir / "checkpoints" / "final.pt"
        which, encoder, head = saved_encoder(method, ctx.settings.encoder)  # DINO / iBOT: the teacher
        if distributed.is_main():
            ckpt.atomic_save({"encoder": encoder.state_dict(), "projector": head.state_dict(), "encoder_from": which},
                             final)
        run.set_tags({"sslpipe.checkpoint": str(final.resolve()), "sslpipe.encoder": which})
        if cfg.tracking.log_checkpoints:
            run.log_artifact(final, "checkpoints")
        if history:
            from sslpipe.plots import curve_plot

            steps, losses, lrs = (list(v) for v in zip(*history))
            run.log_artifact(curve_plot(steps, losses, ctx.run_dir / "loss_curve.png", "train/loss"), "plots")
            run.log_artifact(curve_plot(steps, lrs, ctx.run_dir / "lr_curve.png", "train/lr"), "plots")
        metrics = {"train/final_loss": history[-1][1]} if history else {}
    print_table(f"pretrain {cfg.method.name} on {cfg.dataset.name}", f"final train/loss {metrics.get('train/final_loss', float('nan')):.4f}")
    return StageResult(metrics=metrics, checkpoint=str(final), run_id=run.id)
