"""The fast path changes speed, not results: channels_last, torch.compile and the batched
augmentation ops agree with the default path / torchvision; the deferred NaN check (CUDA's
path, forced here on the CPU) still stops training and keeps the last good checkpoint."""

from __future__ import annotations

import pytest
import torch
import torchvision.transforms.functional as TF

from sslpipe.data.fastaug import ColorJitter, RandomResizedCrop
from sslpipe.engine import prepare_model


def _simclr_loss(channels_last: bool, compile: bool = False) -> float:
    from sslpipe.backbones import SmallCNN
    from sslpipe.methods.simclr import SimCLR

    torch.manual_seed(0)
    method = prepare_model(SimCLR(SmallCNN(in_chans=3)), channels_last=channels_last, compile=compile)
    g = torch.Generator().manual_seed(1)
    views = [torch.randn(16, 3, 16, 16, generator=g) for _ in range(2)]
    if channels_last:
        views = [v.contiguous(memory_format=torch.channels_last) for v in views]
    loss = method.training_step(views, torch.zeros(16, dtype=torch.long), 0.0)
    loss.backward()
    return loss.item()


def test_channels_last_gives_the_default_loss():
    assert _simclr_loss(channels_last=True) == pytest.approx(_simclr_loss(channels_last=False), rel=1e-5, abs=1e-5)


@pytest.mark.slow
def test_compiled_vit_trains_on_every_multi_crop_size():
    """stage.pretrain.compile=true on a multi-crop ViT: timm resizes the position embedding per
    view size (bicubic, antialiased), whose backward fails to compile under automatic dynamic
    shapes (pytorch/pytorch#197622). prepare_model compiles one static graph per size instead."""
    import torch.nn.functional as F
    from torch import nn

    class PosEmbedResize(nn.Module):  # the op timm's resample_abs_pos_embed runs for a new view size
        def __init__(self):
            super().__init__()
            self.pos = nn.Parameter(torch.randn(1, 4, 6, 6))

        def forward(self, x):
            pos = F.interpolate(self.pos, size=x.shape[-2:], mode="bicubic", align_corners=False, antialias=True)
            return (x + pos).mean((2, 3))

    class Method(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone, self.projector = PosEmbedResize(), nn.Linear(4, 2)

    method = prepare_model(Method(), channels_last=False, compile=True)
    for size in (12, 5, 9):  # global, local, and a third size
        method.backbone.pos.grad = None
        method.projector(method.backbone(torch.randn(2, 4, size, size))).sum().backward()
        assert method.backbone.pos.grad is not None and torch.isfinite(method.backbone.pos.grad).all()


def test_compiled_model_gives_the_default_loss():
    assert _simclr_loss(channels_last=False, compile=True) == pytest.approx(_simclr_loss(channels_last=False), rel=1e-4)


def test_each_switch_is_applied_when_asked_and_left_alone_otherwise():
    """channels_last converts a CNN's weights to NHWC only when asked; compile wraps backbone and
    projector only when asked and keeps the state-dict keys (checkpoints unchanged); the fused
    optimizer is asked for on CUDA only (CPU: the plain kernel)."""
    import functools

    from sslpipe.backbones import SmallCNN
    from sslpipe.methods.simclr import SimCLR
    from sslpipe.optim import build_optimizer

    def conv_weights_nhwc(method):
        convs = [m.weight for m in method.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.shape[-1] > 1]
        return all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)

    keys = set(SimCLR(SmallCNN(in_chans=3)).state_dict())
    plain = prepare_model(SimCLR(SmallCNN(in_chans=3)), channels_last=False, compile=False)
    assert not conv_weights_nhwc(plain) and plain.backbone._compiled_call_impl is None
    fast = prepare_model(SimCLR(SmallCNN(in_chans=3)), channels_last=True, compile=True)
    assert conv_weights_nhwc(fast)
    assert fast.backbone._compiled_call_impl is not None and fast.projector._compiled_call_impl is not None
    assert set(fast.state_dict()) == keys
    adamw = functools.partial(torch.optim.AdamW, lr=1e-3)
    assert not build_optimizer(adamw, plain.parameters(), torch.device("cpu")).defaults["fused"]
    assert build_optimizer(adamw, plain.parameters(), torch.device("cuda")).defaults["fused"]  # CPU fused kernel exists


def test_bf16_autocast_is_asked_for_on_cuda_only(tmp_path):
    from sslpipe.engine import Loop, LoopSettings

    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [(torch.zeros(1, 2), torch.zeros(1))]

    def amp(enabled: bool, device: str) -> bool:
        return Loop(model, lambda *a: None, opt, batches, LoopSettings(epochs=1, amp=enabled), torch.device(device),
                    tmp_path / "last.pt").amp

    assert amp(True, "cuda") and not amp(True, "cpu") and not amp(False, "cuda")


@pytest.mark.parametrize("op,reference,factor", [
    (0, TF.adjust_brightness, 1.3), (1, TF.adjust_contrast, 0.7), (2, TF.adjust_saturation, 1.4),
    (3, TF.adjust_hue, 0.08), (3, TF.adjust_hue, -0.1),
])
def test_colour_ops_match_torchvision(op, reference, factor):
    x = torch.rand(4, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    ours = ColorJitter()._op(op, x, torch.full((4,), factor))
    theirs = torch.stack([reference(img, factor) for img in x])
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_colour_jitter_with_p_zero_is_the_identity_and_p_one_changes_every_image():
    x = torch.rand(32, 3, 8, 8)
    assert torch.equal(ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.0)(x), x)
    changed = (ColorJitter(0.4, 0.4, 0.4, 0.1, p=1.0)(x) - x).abs().amax((1, 2, 3)) > 0
    assert changed.all()


def test_resized_crop_boxes_keep_torchvision_ranges_and_the_whole_image_crop_is_exact():
    crop = RandomResizedCrop((32, 32), scale=(0.2, 1.0), ratio=(0.75, 4 / 3))
    boxes = crop.boxes(4000, 32, 32, "cpu")
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 32).all() and (boxes[:, 3] <= 32).all()
    area = w * h / 1024
    assert area.min() >= 0.2 - 0.05 and area.max() <= 1.0
    assert 0.5 < area.mean() < 0.65  # uniform area in [0.2, 1] -> mean 0.6 (rounding, rejections)
    x = torch.rand(2, 3, 32, 32)
    identity = RandomResizedCrop((32, 32), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert torch.allclose(identity(x), x, atol=1e-6)


def test_deferred_nan_check_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    from sslpipe.data.epochs import EpochLoader
    from sslpipe.data.split import Split
    from sslpipe.engine import Loop, LoopSettings, NonFiniteLossError

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    split = Split(torch.randint(0, 255, (64, 1, 2, 2), dtype=torch.uint8), torch.zeros(64, dtype=torch.long))
    calls = {"n": 0}

    def step(images, labels, progress):
        calls["n"] += 1
        loss = model(images.float().flatten(1) / 255).pow(2).mean()
        return loss * float("nan") if calls["n"] == 7 else loss

    loop = Loop(model, step, torch.optim.SGD(model.parameters(), lr=0.1), EpochLoader(split, 8, shuffle=True, drop_last=True),
                LoopSettings(epochs=5, checkpoint_every=5, log_every=4), torch.device("cpu"), tmp_path / "last.pt")
    loop.sync_every_step = False  # CUDA's path: the loss is read back only when logged or saved
    with pytest.raises(NonFiniteLossError, match="between steps 5 and 8"):
        loop.run()
    saved = torch.load(tmp_path / "last.pt", weights_only=True)
    assert saved["loop"]["step"] == 5
    assert all(torch.isfinite(v).all() for v in saved["model"].values())


# ------------------------------------------------------------------ no host-device sync in the step (GPU only)
_NTXENT_SYNC = ("lightly's NTXentLoss drops the diagonal with a boolean mask (logits[~diag_mask]), a "
                "data-dependent shape: one sync a step (measured on an H200, docs/benchmarks.md)")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="set_sync_debug_mode checks CUDA synchronisations")
@pytest.mark.parametrize("name", ["dino", pytest.param("simclr", marks=pytest.mark.xfail(strict=True, reason=_NTXENT_SYNC))])
def test_training_step_never_waits_for_the_gpu(name):
    """Forward, backward, the method's hooks and the fused optimizer step, bf16 autocast, all
    queued without the host waiting for the device: `set_sync_debug_mode("error")` raises on any
    synchronising call (e.g. `.item()`, a boolean-mask index)."""
    import functools

    from sslpipe.backbones import SmallCNN
    from sslpipe.methods.dino import DINO
    from sslpipe.methods.simclr import SimCLR
    from sslpipe.optim import build_optimizer

    dev = torch.device("cuda")
    method = (DINO(SmallCNN(in_chans=3), local_views=2, output_dim=1024) if name == "dino"
              else SimCLR(SmallCNN(in_chans=3))).to(dev)
    optimizer = build_optimizer(functools.partial(torch.optim.AdamW, lr=1e-3), method.parameters(), dev)
    sizes = [32, 32, 16, 16] if name == "dino" else [32, 32]
    views = [torch.randn(64, 3, s, s, device=dev) for s in sizes]
    labels = torch.zeros(64, dtype=torch.long, device=dev)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = method.training_step(views, labels, 0.5)
        loss.backward()
        if hasattr(method, "before_optimizer_step"):
            method.before_optimizer_step(0.5)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        method.after_step(0.5)

    step()  # first-call allocations and lazy initialisation outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
