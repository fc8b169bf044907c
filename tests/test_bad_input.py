"""Bad input, table-driven: each case exits non-zero, names the bad value in one short
message with no traceback, and leaves what was already written (a checkpoint, the MLflow
store) byte for byte as it was."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from conftest import FAST_PRETRAIN, run_cli


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A store and a checkpoint from one good run, plus files that are not what they claim."""
    cwd = tmp_path_factory.mktemp("bad-input")
    out = run_cli(["stage=pretrain", *FAST_PRETRAIN, "hydra.run.dir=outputs/good"], cwd)
    assert out.returncode == 0, out.stderr[-2000:]
    (cwd / "not_a_checkpoint.pt").write_text("hello, I am text")
    import timm

    torch.save(timm.create_model("resnet18", num_classes=0).state_dict(), cwd / "resnet18.pt")
    (cwd / "empty_root").mkdir()
    corrupt = cwd / "corrupt_root" / "cifar-10-batches-py"
    corrupt.mkdir(parents=True)
    for name in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch", "batches.meta"]:
        (corrupt / name).write_bytes(b"\x80\x04truncated")
    return cwd


CKPT = "outputs/good/checkpoints/final.pt"
# (overrides, substrings the message must contain)
CASES = [
    (["method=nosuch"], ["nosuch", "simclr", "byol"]),
    (["backbone=nosuch"], ["nosuch", "smallcnn"]),
    (["dataset=nosuch"], ["nosuch", "digits"]),
    (["stage=nosuch"], ["nosuch", "pretrain", "linear_probe"]),
    (["stage=pretrain", "stage.pretrain.epoch=3"], ["stage.pretrain.epoch", "stage.pretrain.loop.epochs"]),
    # the spelling before the loop's keys moved under stage.<name>.loop: pointed to the new one
    (["stage=pretrain", "stage.epochs=3"], ["stage.epochs", "did you mean 'stage.pretrain.loop.epochs'"]),
    (["stage=pretrain", "method.temprature=0.1"], ["method.temprature", "temperature"]),
    (["dataset.fraction=1.5"], ["dataset.fraction=1.5", "(0, 1]"]),
    (["dataset.fraction=0"], ["dataset.fraction=0", "(0, 1]"]),
    (["stage=pretrain", "stage.pretrain.optimizer.lr=-0.1"], ["stage.pretrain.optimizer.lr=-0.1", "> 0"]),
    (["stage=pretrain", "stage.pretrain.batch_size=0"], ["stage.pretrain.batch_size=0", ">= 1"]),
    (["stage=pretrain", "stage.pretrain.loop.epochs=0"], ["stage.pretrain.loop.epochs=0"]),
    (["stage=pretrain", "stage.pretrain.loop.max_steps=-5"], ["stage.pretrain.loop.max_steps=-5"]),
    (["stage=pretrain", "stage.pretrain.loop.grad_accum=0"], ["stage.pretrain.loop.grad_accum=0"]),
    (["stage=knn", "pretrained=random", "stage.knn.k=0"], ["stage.knn.k=0"]),
    (["stage=knn", "pretrained=random", "stage.knn.temperature=-1"], ["stage.knn.temperature=-1"]),
    (["device=gpu"], ["device='gpu'", "auto, cpu, cuda"]),
    (["seed=abc"], ["seed='abc'", "integer"]),
    (["stage=linear_probe"], ["pretrained=", "pretrained=random"]),
    (["stage=linear_probe", "pretrained=does/not/exist.pt"], ["does/not/exist.pt", "pretrained=random"]),
    (["stage=linear_probe", "pretrained=not_a_checkpoint.pt"], ["not_a_checkpoint.pt", "not a loadable checkpoint"]),
    (["stage=linear_probe", "pretrained=runs:/0123456789abcdef"], ["0123456789abcdef"]),
    (["stage=linear_probe", "pretrained=resnet18.pt"], ["resnet18.pt", "missing", "features.0.0.weight"]),
    (["stage=pretrain", "method._target_=os.system"], ["os.system", "allow_targets"]),
    (["stage=export", f"pretrained={CKPT}", "stage.export.format=xml"], ["stage.export.format='xml'", "safetensors", "json"]),
    (["stage=knn", "pretrained=random", "dataset=cifar10", "dataset.root=empty_root"], ["empty_root", "dataset.download=true"]),
    (["stage=knn", "pretrained=random", "dataset=cifar10", "dataset.root=corrupt_root"], ["corrupt_root"]),
    (["stage=knn", "pretrained=random", "dataset.num_classes=5"], ["label 5", "dataset.num_classes=5"]),
    (["stage=knn", "pretrained=random", "dataset.channels=3"], ["1-channel", "dataset.channels=3"]),
    (["stage=pretrain", "dataset.augment.crop_scale=[0.9,0.1]"], ["crop_scale=[0.9, 0.1]"]),
    (["stage.stages=[knn,nosuch]"], ["nosuch", "linear_probe"]),
    (["stage=linear_probe", "pretrained=random", "stage.linear_probe.protocol=dino"], ["stage.linear_probe.protocol='dino'", "augmented"]),
    (["stage=pretrain", "method=byol", "+method.views.common.sharpen=0.5"], ["method.views.common.sharpen", "blur_prob"]),
    (["stage=pretrain", "stage.pretrain.batch_size=5000"], ["batch_size=5000"]),
    (["dataset.image_size=0"], ["dataset.image_size=0", "1..2048"]),
]


@pytest.mark.parametrize("overrides,expected", CASES, ids=[" ".join(o) for o, _ in CASES])
def test_bad_input_is_rejected_clearly_and_damages_nothing(workspace, overrides, expected):
    before = _digest(workspace / "outputs" / "good") | {"mlflow.db": _digest(workspace / "outputs")["mlflow.db"]}
    out = run_cli(overrides, workspace, timeout=300)
    assert out.returncode != 0
    message = out.stderr
    for text in expected:
        assert text in message, f"{text!r} not in:\n{message}"
    assert "Traceback" not in message, message
    assert len(message.strip().splitlines()) <= 12, message  # short
    after = _digest(workspace / "outputs" / "good") | {"mlflow.db": _digest(workspace / "outputs")["mlflow.db"]}
    assert after == before


def test_at_least_25_distinct_cases():
    assert len({tuple(o) for o, _ in CASES}) >= 25
