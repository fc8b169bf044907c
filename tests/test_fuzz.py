"""Fuzzing config overrides (hypothesis): every combination either composes and validates,
or fails with a clear error that names the key; never a traceback."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException, OverrideParseException
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sslpipe.config import compose
from sslpipe.validate import ConfigError, validate

KEYS = ["dataset.fraction", "dataset.image_size", "seed", "device", "stage.pretrain.epochs",
        "stage.pretrain.batch_size", "stage.pretrain.optimizer.lr", "stage.pretrain.max_steps", "stage.knn.k",
        "stage.knn.temperature", "stage.linear_probe.lr", "stage.finetune.head_lr", "method.temperature",
        "dataset.augment.hflip", "dataset.augment.crop_scale", "stage.pretrain.grad_accum", "stage.export.format",
        "stage.nosuch", "dataset.fractoin"]
VALUES = st.one_of(
    st.integers(-10, 10_000).map(str), st.floats(-1e3, 1e3, allow_nan=False).map(lambda f: f"{f:.4g}"),
    st.sampled_from(["null", "abc", "cpu", "auto", "cuda:0", "[0.2,1.0]", "[1,0]", "''", "json", "true"]),
)
OVERRIDES = st.lists(st.tuples(st.sampled_from(KEYS), VALUES), min_size=1, max_size=4, unique_by=lambda kv: kv[0])


def outcome(pairs) -> str:
    overrides = [f"{k}={v}" for k, v in pairs]
    try:
        cfg = compose(overrides)
    except (ConfigCompositionException, OverrideParseException) as err:
        message = str(err)
        assert any(k in message for k, _ in pairs), message  # names the offending key
        return "compose-error"
    try:
        validate(cfg)
    except ConfigError as err:
        message = str(err)
        assert any(k.split(".")[-1] in message for k, _ in pairs), message
        assert "=" in message and "expected" in message, message
        return "invalid"
    return "valid"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OVERRIDES)
def test_overrides_fail_clearly_or_validate(pairs):
    outcome(pairs)


@pytest.mark.slow
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(OVERRIDES)
def test_cli_never_prints_a_traceback(tmp_path_factory, pairs):
    from conftest import run_cli

    cwd = tmp_path_factory.mktemp("fuzz")
    budget = ["stage=pretrain", "stage.max_steps=1", "stage.epochs=1"]
    # keys of the pipeline's steps move to the single stage's node
    skip = ("stage.knn", "stage.linear_probe", "stage.finetune", "stage.export", "dataset.image_size")  # image_size: memory
    args = budget + [f"{k.replace('stage.pretrain.', 'stage.')}={v}" for k, v in pairs if not k.startswith(skip)]
    out = run_cli(args, cwd, timeout=300)
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    if out.returncode != 0:
        assert out.stderr.strip(), "a failure must say why"
