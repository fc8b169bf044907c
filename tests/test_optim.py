"""The optimizer as the papers set it up (sslpipe.optim, applied by engine.Loop): no weight
decay on biases, norms, position embeddings and tokens; a cosine weight-decay schedule;
per-parameter gradient clipping; each acts in a real loop and in a real pretrain run."""

from __future__ import annotations

import math

import pytest
import torch

from sslpipe.optim import clip_per_parameter, schedule_weight_decay, weight_decay_groups
from tests.test_methods import build_method


def _names(model, params) -> set[str]:
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_vit_method_groups_leave_biases_norms_embeddings_and_tokens_undecayed():
    method, _ = build_method("ibot", "method.pos_embed=learn")  # a ViT with cls token, learnt position embedding, mask token
    no_decay, decay = weight_decay_groups(method, 0.04)
    assert (no_decay["weight_decay"], decay["weight_decay"]) == (0.0, 0.04)
    undecayed, decayed = _names(method, no_decay["params"]), _names(method, decay["params"])
    for name in ("backbone.pos_embed", "backbone.cls_token", "student.mask_token", "backbone.blocks.0.norm1.weight",
                 "backbone.blocks.0.attn.qkv.bias", "projector.layers.1.bias"):
        assert name in undecayed, name
    assert "backbone.blocks.0.attn.qkv.weight" in decayed and "backbone.patch_embed.proj.weight" in decayed
    assert not any(n.endswith((".bias", "norm1.weight", "pos_embed", "_token")) for n in decayed)
    trainable = {n for n, p in method.named_parameters() if p.requires_grad}
    assert undecayed | decayed == trainable and not undecayed & decayed


def test_cnn_groups_and_the_switch_to_decay_everything():
    method, _ = build_method("simclr")
    no_decay, decay = weight_decay_groups(method, 1e-4)
    assert all(p.ndim <= 1 for p in no_decay["params"]) and all(p.ndim > 1 for p in decay["params"])
    [everything] = weight_decay_groups(method, 1e-4, exclude=False)
    assert len(everything["params"]) == len(no_decay["params"]) + len(decay["params"])


def test_weight_decay_follows_a_cosine_from_its_start_to_end():
    a, b = torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([{"params": [a], "weight_decay": 0.04}, {"params": [b], "weight_decay": 0.0}])
    for progress, expected in ((0.0, 0.04), (0.5, 0.22), (1.0, 0.4)):
        schedule_weight_decay(opt, progress, 0.4)
        assert opt.param_groups[0]["weight_decay"] == pytest.approx(expected)
        assert opt.param_groups[1]["weight_decay"] == 0.0


def test_clipping_caps_each_parameter_on_its_own():
    big, small = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3))
    big.grad, small.grad = torch.tensor([30.0, 40.0, 0.0]), torch.tensor([0.3, 0.4, 0.0])
    clip_per_parameter([big, small], 3.0)
    assert big.grad.norm().item() == pytest.approx(3.0, rel=1e-5)  # 50 -> 3, direction kept
    assert torch.allclose(big.grad, torch.tensor([1.8, 2.4, 0.0]), atol=1e-5)
    assert torch.equal(small.grad, torch.tensor([0.3, 0.4, 0.0]))  # under the cap: untouched, not rescaled globally


def test_loop_clips_and_schedules_before_each_step(tmp_path):
    from sslpipe.data.epochs import EpochLoader
    from sslpipe.data.split import Split
    from sslpipe.engine import Loop, LoopSettings

    torch.manual_seed(0)
    seen = []

    class Model(torch.nn.Linear):
        def before_optimizer_step(self, progress):  # what the loop calls between clipping and the step
            seen.append([q.grad.norm().item() for q in self.parameters()])

    model = Model(4, 1)
    split = Split(torch.randint(0, 255, (32, 1, 2, 2), dtype=torch.uint8), torch.zeros(32, dtype=torch.long))

    def step(images, labels, progress):
        return 1e4 * model(images.float().flatten(1) / 255).pow(2).mean()  # gradients far above the cap

    optimizer = torch.optim.SGD([{"params": [model.weight], "weight_decay": 0.1}, {"params": [model.bias],
                                                                                  "weight_decay": 0.0}], lr=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    settings = LoopSettings(epochs=1, max_steps=4, clip_grad=0.01, weight_decay_end=0.5, checkpoint_every=100)
    loop = Loop(model, step, optimizer, EpochLoader(split, 8, shuffle=True, drop_last=True), settings,
                torch.device("cpu"), tmp_path / "last.pt")
    loop.run()
    assert len(seen) == 4 and all(norm <= 0.01 + 1e-6 for norms in seen for norm in norms)
    assert (model.bias - before[1]).abs().max().item() <= 4 * 0.01 + 1e-5  # lr 1 x clipped grad x 4 steps
    assert optimizer.param_groups[0]["weight_decay"] == pytest.approx(0.5 + (0.1 - 0.5) * 0.5 * (1 + math.cos(math.pi * 3 / 4)))
    assert optimizer.param_groups[1]["weight_decay"] == 0.0


def test_pretrain_uses_the_groups_the_schedule_and_the_methods_clip(cli):
    out = cli("stage=pretrain", "method=dino", "device=cpu", "stage.pretrain.loop.epochs=1", "stage.pretrain.loop.max_steps=3",
              "stage.pretrain.batch_size=32", "method.output_dim=256", "stage.pretrain.optimizer.weight_decay=0.04",
              "stage.pretrain.loop.weight_decay_end=0.4", "tracking.log_checkpoints=false")
    assert out.returncode == 0, out.stderr[-3000:]
    saved = torch.load(next((cli.cwd / "outputs").rglob("last.pt")), map_location="cpu", weights_only=False)
    groups = saved["optimizer"]["param_groups"]
    assert [g["weight_decay"] == 0.0 for g in groups] == [True, False]
    assert groups[1]["weight_decay"] == pytest.approx(0.4 + (0.04 - 0.4) * 0.5 * (1 + math.cos(math.pi * 2 / 3)))
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=cli.store)
    [run] = client.search_runs([client.get_experiment_by_name("sslpipe").experiment_id])
    assert run.data.params["method.optim.clip_grad"] == "3.0"  # dino.yaml's paper value reaches the run


def test_simsiam_predictor_groups_are_split_off_and_marked_fixed():
    method, _ = build_method("simsiam", "method.fix_pred_lr=true")
    groups = weight_decay_groups(method, 1e-4, fixed_lr_modules=method.fixed_lr_modules)
    fixed = [g for g in groups if g.get("fixed_lr")]
    predictor = {n for n, _ in method.named_parameters() if n.startswith("predictor.")}
    assert set().union(*(_names(method, g["params"]) for g in fixed)) == predictor
    assert not any(g.get("fixed_lr") for g in groups[:len(groups) - len(fixed)])  # scheduled groups first
    assert sorted(g["weight_decay"] for g in fixed) == [0.0, 1e-4]  # the predictor's biases stay undecayed
    everything = [n for g in groups for n in _names(method, g["params"])]
    assert sorted(everything) == sorted(n for n, p in method.named_parameters() if p.requires_grad)
    off, _ = build_method("simsiam")  # the default: every group scheduled
    assert off.fixed_lr_modules == () and not any(g.get("fixed_lr") for g in weight_decay_groups(off, 1e-4))


def test_simsiam_pretrain_keeps_its_predictors_lr_while_the_rest_decays(cli):
    # SimSiam (Chen & He 2021, sec. 4.2, Table 1c): the predictor at a constant lr, the rest warmed up and decayed
    out = cli("stage=pretrain", "method=simsiam", "method.fix_pred_lr=true", "device=cpu", "stage.pretrain.loop.epochs=1", "stage.pretrain.loop.max_steps=4",
              "stage.pretrain.loop.warmup_epochs=0", "stage.pretrain.batch_size=32", "tracking.log_checkpoints=false")
    assert out.returncode == 0, out.stderr[-3000:]
    saved = torch.load(next((cli.cwd / "outputs").rglob("last.pt")), map_location="cpu", weights_only=False)
    groups = saved["optimizer"]["param_groups"]
    fixed = [g for g in groups if g.get("fixed_lr")]
    scheduled = [g for g in groups if not g.get("fixed_lr")]
    assert len(fixed) == 2 and len(scheduled) == 2
    base = fixed[0]["initial_lr"]
    assert all(g["lr"] == base for g in fixed)  # not decayed
    assert all(g["lr"] < 0.9 * base for g in scheduled)  # cosine after 4 of 4 steps: near its floor


# Each paper's optimizer (class, lr per 256 images, weight decay), as cited in the method yamls.
PAPER_OPTIMIZERS = {
    "simclr": ("LARS", 0.3, 1e-6), "byol": ("LARS", 0.2, 1.5e-6), "barlowtwins": ("LARS", 0.2, 1.5e-6),
    "vicreg": ("LARS", 0.2, 1e-6), "swav": ("LARS", 0.3, 1e-6), "mocov3": ("LARS", 0.6, 1e-6),
    "mocov1": ("SGD", 0.03, 1e-4), "mocov2": ("SGD", 0.03, 1e-4), "simsiam": ("SGD", 0.05, 1e-4),
    "supcon": ("SGD", 0.05, 1e-4), "dino": ("AdamW", 5e-4, 0.04), "ibot": ("AdamW", 5e-4, 0.04),
    "mae": ("AdamW", 1.5e-4, 0.05),
}


@pytest.mark.parametrize("name", sorted(PAPER_OPTIMIZERS))
def test_optimizer_from_method_builds_the_papers(name):
    from sslpipe.config import build, compose
    from sslpipe.optim import optimizer_config

    cfg = compose(["stage=pretrain", f"method={name}", "stage.pretrain.optimizer_from=method"])
    node = optimizer_config(cfg.stage.pretrain, cfg.method)
    optimizer = build(node)([torch.nn.Parameter(torch.zeros(2))], lr=node.lr)
    kind, lr, weight_decay = PAPER_OPTIMIZERS[name]
    assert type(optimizer).__name__ == kind
    assert optimizer.param_groups[0]["lr"] == pytest.approx(lr)
    assert optimizer.param_groups[0]["weight_decay"] == pytest.approx(weight_decay)
    # the default stays the stage's own (the digits runs of the README were measured with it)
    default = compose(["stage=pretrain", f"method={name}"])
    assert optimizer_config(default.stage.pretrain, default.method)._target_ == "torch.optim.AdamW"


def test_pretrain_trains_with_the_papers_optimizer_at_its_scaled_rate(cli):
    out = cli("stage=pretrain", "method=byol", "stage.pretrain.optimizer_from=method", "device=cpu", "stage.pretrain.loop.epochs=1",
              "stage.pretrain.loop.max_steps=2", "stage.pretrain.batch_size=64", "tracking.log_checkpoints=false")
    assert out.returncode == 0, out.stderr[-3000:]
    saved = torch.load(next((cli.cwd / "outputs").rglob("last.pt")), map_location="cpu", weights_only=False)
    groups = saved["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.0, 1.5e-6] and "trust_coefficient" in groups[0]  # LARS
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=cli.store)
    [run] = client.search_runs([client.get_experiment_by_name("sslpipe").experiment_id])
    assert run.data.params["train.optimizer"] == "LARS"
    assert float(run.data.params["train.lr"]) == pytest.approx(0.2 * 64 / 256)  # BYOL: 0.2 per 256 images


@pytest.mark.parametrize("overrides,named", [
    (["method=autoencoder", "stage.pretrain.optimizer_from=method"], "autoencoder's yaml gives no optim.optimizer"),
    (["stage.pretrain.optimizer_from=paper"], "stage.pretrain.optimizer_from='paper'"),
])
def test_optimizer_from_refuses_what_it_cannot_build(cli, overrides, named):
    out = cli("stage=pretrain", "device=cpu", "stage.pretrain.loop.max_steps=1", *overrides)
    assert out.returncode != 0 and named in out.stderr, out.stderr[-2000:]
