"""Watching a run (sslpipe.monitor): the collapse signals on known matrices, the online
metrics of a DINO run at several steps, and the warning a collapsing run raises."""

from __future__ import annotations

import torch
from mlflow.tracking import MlflowClient

from sslpipe.monitor import effective_rank, feature_std

FAST = ["stage=pretrain", "device=cpu", "tracking.log_checkpoints=false", "stage.pretrain.loop.log_every=2",
        "stage.pretrain.monitor.every=2"]


def test_signals_on_known_embeddings():
    torch.manual_seed(0)
    spread = torch.randn(2000, 64)
    assert abs(feature_std(spread) - 1.0) < 0.05  # isotropic: about 1/sqrt(d) per dimension, times sqrt(d)
    assert feature_std(torch.ones(100, 64) * 3.0) == 0.0  # every image on one point
    line = torch.randn(500, 1) @ torch.randn(1, 64)
    assert effective_rank(line) < 1.01  # one direction
    assert abs(effective_rank(torch.eye(32)) - 32.0) < 1e-2  # 32 equal directions


def _history(cli):
    client = MlflowClient(tracking_uri=cli.store)
    [run] = client.search_runs([client.get_experiment_by_name("sslpipe").experiment_id])
    return run, {k: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, k))
                 for k in ("online/knn_top1", "online/feature_std", "online/rank")}


def test_dino_logs_online_knn_and_collapse_signals_at_several_steps(cli):
    out = cli(*FAST, "method=dino", "stage.pretrain.loop.epochs=2", "stage.pretrain.loop.max_steps=6", "stage.pretrain.batch_size=64")
    assert out.returncode == 0, out.stderr[-3000:]
    run, history = _history(cli)
    for name, values in history.items():
        assert [step for step, _ in values] == [2, 4, 6], name
    assert all(0.3 < v <= 1.0 for _, v in history["online/knn_top1"])  # 10 classes: chance is 0.1
    assert all(v > 2.0 for _, v in history["online/rank"])
    assert "kNN 0." in out.stdout and "rank" in out.stdout  # on the progress line
    assert "sslpipe.collapse" not in run.data.tags


def test_a_collapsing_run_is_flagged(cli):
    # SimSiam at 100x its digits learning rate: the embeddings fall onto one point within
    # 10 steps (std 0.019, measured in sslpipe/monitor.py's comment)
    out = cli(*FAST, "method=simsiam", "stage.pretrain.optimizer.lr=0.5", "stage.pretrain.loop.epochs=3", "stage.pretrain.loop.max_steps=10",
              "stage.pretrain.monitor.every=10", "stage.pretrain.loop.log_every=10")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "the embeddings look collapsed at step 10/10" in out.stdout + out.stderr
    run, history = _history(cli)
    assert run.data.tags["sslpipe.collapse"].startswith("step 10:")
    assert history["online/feature_std"][-1][1] < 0.05 or history["online/rank"][-1][1] < 2.0


def test_auto_interval_widens_to_keep_checks_within_budget():
    import time

    from sslpipe.data.split import Split
    from sslpipe.data.digits import load_digits
    from sslpipe.data.views import Normalize
    from sslpipe.monitor import Monitor
    from tests.test_methods import build_method

    method, cfg = build_method("simclr")
    splits = load_digits(image_size=16)
    bank, queries = Split(splits.train.images[:300], splits.train.labels[:300]), splits.val
    monitor = Monitor(method.backbone, bank, queries, Normalize([0.5], [0.5]), torch.device("cpu"), 10, every=2,
                      budget=0.05, multiple=5)
    time.sleep(0.02)  # two "steps" of 10 ms: a check of ~600 images costs far more than 5 % of that
    assert monitor(2, 1000)  # due: runs, then widens
    assert monitor.every > 2 and monitor.every % 5 == 0
    assert monitor(4, 1000) == {}  # no longer due
    fixed = Monitor(method.backbone, bank, queries, Normalize([0.5], [0.5]), torch.device("cpu"), 10, every=2)
    time.sleep(0.02)
    fixed(2, 1000)
    assert fixed.every == 2  # an explicit interval is kept


def test_budget_is_kept_over_the_whole_run_final_check_included():
    """With a budget, a check on the interval (or at the last step) is skipped while the checks
    so far plus one more would exceed the budget of the training time so far; it runs again once
    training has earned it."""
    import time

    from sslpipe.data.split import Split
    from sslpipe.data.digits import load_digits
    from sslpipe.data.views import Normalize
    from sslpipe.monitor import Monitor
    from tests.test_methods import build_method

    method, _ = build_method("simclr")
    splits = load_digits(image_size=16)
    bank = Split(splits.train.images[:300], splits.train.labels[:300])
    monitor = Monitor(method.backbone, bank, splits.val, Normalize([0.5], [0.5]), torch.device("cpu"), 10, every=2,
                      budget=0.05)
    assert monitor(2, 1000)  # the first check runs: nothing known of its cost yet
    cost = monitor._last_cost
    monitor.every = 2  # undo the widening: the whole-run account alone must hold the checks back
    assert monitor(4, 1000) == {} and monitor(1000, 1000) == {}  # not even the final one
    time.sleep(2 * cost / 0.05 + 0.05)  # training time that pays for both checks at 5 %
    assert monitor(6, 1000)
    trained = time.perf_counter() - monitor._created - monitor._spent
    assert monitor._spent <= 0.05 * trained + monitor._last_cost
