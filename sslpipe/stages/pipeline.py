"""stage=pipeline: pretrain, then each step of `stage.stages` on the pretrained encoder, and
the `stage.baseline` steps on pretrained=random; one parent MLflow run, a nested child run
per step, and a results table of every step's headline numbers (top-1 / macro F1 for the
classifiers, IoU / F1 for segment), printed and logged as results.md / results.json.

Preemption: `pipeline.json` in the run folder records the parent run's id and each finished
step's result. A requeued (or rerun) job reopens the same parent run, skips the steps already
done, and the interrupted step resumes from its own checkpoint into its own child run, so a
job preempted in fine-tune ends as one parent run with each child once. A stop signal that
arrives during a step without a training loop (kNN, cached probes, export) ends the job after
that step."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from hydra.utils import get_method
from omegaconf import DictConfig

from sslpipe import distributed
from sslpipe.engine import Preempted
from sslpipe.atomic import atomic_write

from sslpipe.results import results_table, write_results
from sslpipe.stages.build import resolve_num_classes
from sslpipe.stages.context import Context, StageResult, stage_run

PROBES = ("knn", "linear_probe", "mlp_probe", "finetune")   # classification: test/top1 heads their row
DENSE = ("segment",)                                          # segmentation: test/iou heads its row
COLUMNS = ["step", "pretrained", "test/top1", "val/top1", "test/f1_macro", "test/iou", "test/f1"]


def _headline(row: dict) -> dict[str, float]:
    """`<step>[-random]/test_top1` (or `/test_iou`): the parent run's metric for one table row."""
    name = row["step"] + ("-random" if row["pretrained"] == "random" else "")
    key = "test/iou" if row["step"] in DENSE else "test/top1"
    return {f"{name}/{key.replace('/', '_')}": row[key]} if key in row else {}


def _check(st, key: str) -> None:
    """Every name in stage.<key> is a step: a node of stage=pipeline's config with a stage `_target_`
    (conf/stage/pipeline.yaml's defaults: conf/step/<name>.yaml), pretrain aside."""
    steps = [k for k, v in st.items() if isinstance(v, DictConfig) and "_target_" in v and k != "pretrain"]
    bad = [n for n in st[key] if n not in steps]
    if bad:
        raise ValueError(f"stage.{key} has unknown step(s) {bad}; valid: {', '.join(steps)}")


class Journal:
    """`pipeline.json`: the parent run's id and each finished step's result, rewritten
    atomically (rank 0) after every step; what a requeued job reads to carry on."""

    def __init__(self, path: Path):
        self.path = path
        data = json.loads(path.read_text()) if path.exists() else {}
        self.parent_run_id: str | None = data.get("parent_run_id")
        self.steps: dict[str, dict] = data.get("steps", {})

    def save(self) -> None:
        if not distributed.is_main():
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"parent_run_id": self.parent_run_id, "steps": self.steps}, indent=2, default=str)
        atomic_write(self.path, lambda tmp: Path(tmp).write_text(text))


def run(ctx: Context) -> StageResult:
    cfg, st = ctx.cfg, ctx.cfg.stage
    _check(st, "stages")
    _check(st, "baseline")
    rows, results = [], {}
    resolve_num_classes(ctx)  # every step, export's manifest too, sees the inferred count
    journal = Journal(ctx.run_dir / "pipeline.json")
    with stage_run(ctx, run_id=journal.parent_run_id) as parent:
        ctx.parent_id = journal.parent_run_id = parent.id
        journal.save()

        def step(key: str, sub: Context) -> dict:
            """One step's result: from the journal when a previous attempt finished it, else run now."""
            if key not in journal.steps:
                if ctx.should_stop():  # a signal during a step without a training loop: stop between steps
                    raise Preempted(f"stopped before pipeline step {key} by a signal; {journal.path} has the rest")
                out = get_method(sub.cfg.stage._target_)(sub)  # conf/step/<step>.yaml names it
                journal.steps[key] = dataclasses.asdict(out)
                journal.save()
            return StageResult(**journal.steps[key])

        pre = step("pretrain", ctx.for_stage("pretrain", None, "pretrain"))
        results["pretrain"] = pre.metrics
        checkpoint = pre.checkpoint
        probe_metrics: dict[str, float] = {}
        for name in st.stages:
            linear = results.get("linear_probe")
            handed = {"linear_head": linear.head if linear else None, "metrics": dict(probe_metrics)} \
                if name == "export" else None
            sub = ctx.for_stage(name, checkpoint, "." if name == "export" else name, inputs=handed)
            results[name] = out = step(name, sub)
            if name in PROBES:
                probe_metrics.update({f"{name}/{k}": v for k, v in out.metrics.items()})
            if name in PROBES or name in DENSE:
                rows.append({"step": name, "pretrained": cfg.method.name, **out.metrics})
        for name in st.baseline:
            results[f"{name}-random"] = out = step(f"{name}-random",
                                                   ctx.for_stage(name, "random", f"random/{name}", suffix="-random"))
            if name in PROBES or name in DENSE:
                rows.append({"step": name, "pretrained": "random", **out.metrics})
        columns = [c for c in COLUMNS if c in ("step", "pretrained") or any(c in r for r in rows)]
        table = results_table(rows, columns)
        headline = {k: v for r in rows for k, v in _headline(r).items()}
        results["summary"] = {"columns": columns, "rows": rows, "headline": headline}
        parent.log_text(table + "\n", "results.md")
        parent.log_text(json.dumps(results, indent=2, default=dataclasses.asdict), "results.json")
        parent.log_metrics(headline, step=0)
    write_results(ctx.run_dir, f"results: {cfg.method.name} / {cfg.backbone.name} / {cfg.dataset.name}", table)
    steps = {name: step["metrics"] for name, step in journal.steps.items()}  # every step's metrics, as journaled
    return StageResult(metrics=headline, checkpoint=checkpoint, run_id=parent.id, steps=steps)
