"""`python -m sslpipe <overrides>`: compose the config (Hydra), set the process up once, call the
stage function the config names (`cfg.stage._target_`, e.g. conf/step/pretrain.yaml ->
`sslpipe.stages.pretrain.run`). docs/architecture.md traces the path on to the loss.

Only hydra and omegaconf load at import, so `--cfg job` and `--help` stay fast; torch, mlflow
and the rest load inside `run()`.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from sslpipe.hints import check_choices, is_user_error, unknown_key_hint

log = logging.getLogger("sslpipe.run")


def main() -> None:
    bad = check_choices(sys.argv[1:])
    if bad:
        print(bad, file=sys.stderr)
        sys.exit(2)
    try:
        _app()
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            hint = unknown_key_hint(sys.argv[1:])
            if hint:
                print(hint, file=sys.stderr)
        raise
    # Every job of this process done: ranks that trained together leave the group once, here
    # (a sweep's jobs share it: joining a second time under torchrun hung in 2 of 3 tries of a
    # two-job sweep, torch 2.14). Not after an error, where a rank that died would leave the
    # others waiting at teardown's barrier; distributed.setup's exit hook frees the group then.
    if "torch.distributed" in sys.modules:
        from sslpipe import distributed

        distributed.teardown()


@hydra.main(version_base="1.3", config_path="pkg://sslpipe.conf", config_name="config")
def _app(cfg: DictConfig) -> dict | float | None:
    try:
        return run(cfg)
    except Exception as err:  # noqa: BLE001 - one clear line, the traceback only on request
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        if not is_user_error(err):  # a TypeError, KeyError, ...: sslpipe's bug, not the input
            import traceback

            traceback.print_exc()
            print(f"sslpipe: internal error (a bug, not your input; please report it): {type(err).__name__}: {err}",
                  file=sys.stderr)
            sys.exit(1)
        print(f"sslpipe: error: {err}", file=sys.stderr)
        print("(set HYDRA_FULL_ERROR=1 for the traceback)", file=sys.stderr)
        sys.exit(1)


def run(cfg: DictConfig, folder: Path | None = None) -> dict | float:
    """Run `cfg` (its stage) in `folder`, by default Hydra's output folder for the job. Returns
    the stage's metrics, or under a sweep with `objective=` the value the sweeper optimises."""
    from hydra.utils import get_method

    from sslpipe.validate import validate

    validate(cfg)  # before anything is built or written
    check_objective(cfg.get("objective"))

    from sslpipe import distributed
    from sslpipe.engine import Preempted, resolve_device
    from sslpipe.preempt import StopSignal
    from sslpipe.seeding import seed_process
    from sslpipe.stages.context import Context
    from sslpipe.tracking import open_tracker

    # Processes: one, or the DDP ranks torchrun / SLURM started, joined here once for every
    # stage; all ranks use rank 0's run folder (one checkpoint, one set of artefacts).
    device = distributed.setup(resolve_device(cfg.device))
    folder = distributed.broadcast_object(folder or run_dir())
    seed_process(cfg.seed)  # alike on every rank: models are built equal (sslpipe.seeding)
    tracker = open_tracker(cfg.tracking, folder)
    # SIGUSR2 / SIGTERM: every training loop checkpoints at its next step and raises Preempted;
    # here the job is then handed to whoever requeues it (sslpipe.preempt). One handler for the
    # whole process, so a pipeline's fine-tune or segment step stops as its pretrain does.
    stop = StopSignal().install()
    ctx = Context(cfg=cfg, run_dir=folder, device=device, tracker=tracker, stop=stop)
    stage = get_method(cfg.stage._target_)  # conf/step/<name>.yaml: sslpipe.stages.<name>.run
    started = time.monotonic()
    try:
        result = stage(ctx)
    except Preempted as stopped:
        log.warning("%s", stopped)
        stop.hand_over()  # requeue (submitit / sbatch) and exit; never returns
    finally:
        stop.restore()
    if cfg.stage.name != "pipeline":  # the pipeline writes its chain's table itself
        _results_table(ctx, result.metrics, time.monotonic() - started)
    if cfg.get("objective"):
        return objective_value(cfg.objective, result)
    return result.metrics


def run_dir() -> Path:
    """Hydra's output folder for this job (deterministic per sweep job under SLURM)."""
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def check_objective(key: str | None) -> None:
    if key and "test" in str(key).split("/"):
        raise ValueError(f"objective={key}: a sweep must select on a validation metric, not a test one "
                         f"(use {str(key).replace('test', 'val', 1)})")


def objective_value(key: str, result) -> float:
    """The value of `objective` a sweeper optimises: a key of the stage's metrics, or in a
    pipeline `<step>/<key>`. Test metrics are refused (selection on the test split)."""
    check_objective(key)
    found = dict(result.metrics)
    for step, metrics in result.steps.items():
        found.update({f"{step}/{k}": v for k, v in metrics.items()})
    if key not in found:
        raise ValueError(f"objective={key} is not a metric of this run; it has: {', '.join(sorted(found))}")
    return float(found[key])


def _results_table(ctx, metrics: dict, wall_s: float) -> None:
    """A single stage's metrics as a compact table, printed and saved as results.md in its run folder."""
    from sslpipe.distributed import is_main
    from sslpipe.results import results_table, write_results

    if not is_main() or not metrics:
        return
    cfg = ctx.cfg
    title = f"results: {cfg.stage.name} {cfg.method.name} / {cfg.backbone.name} / {cfg.dataset.name}"
    if cfg.pretrained is not None:
        title += f" (pretrained={cfg.pretrained})"
    rows = [{"metric": k, "value": v} for k, v in metrics.items()] + [{"metric": "wall time (s)", "value": f"{wall_s:.1f}"}]
    write_results(ctx.run_dir, title, results_table(rows, ["metric", "value"]))


if __name__ == "__main__":
    main()
