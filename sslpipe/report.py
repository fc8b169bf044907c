"""`python -m sslpipe.report`: compare runs from the MLflow store in one table.

Runs are filtered by tags or params (`--filter stage=linear_probe --filter method=simclr,byol`),
grouped (`--group-by method,backbone,dataset`), and each group's chosen metrics are shown as
mean +- sample standard deviation over its runs (its seeds), with the run count and the seeds:

    python -m sslpipe.report --filter stage=linear_probe --filter init=pretrained
    python -m sslpipe.report --metrics test/top1,test/f1_macro --format csv --output results.csv

A search's trials (hydra/sweeper=search), best first:

    python -m sslpipe.report --filter study=simclr-digits --filter stage=linear_probe \
        --group-by trial,method.temperature --metrics val/top1 --best-first

Keys in --filter and --group-by: the short names stage, method, backbone, dataset,
pretrained, world_size, study, trial (the `sslpipe.*` tags); `init` (random / pretrained / none, derived
from `sslpipe.pretrained`, whose value is a path that differs per run); any other tag or
param by its full name (`seed`, `method.temperature`, `slurm.job_id`), or explicitly
`tags.<name>` / `params.<name>`.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

SHORT = ("stage", "method", "backbone", "dataset", "pretrained", "world_size", "study", "trial")
DEFAULT_GROUP = "stage,method,backbone,dataset,init"
DEFAULT_URI = "sqlite:///outputs/mlflow.db"


class ReportError(Exception):
    """A user error: printed as one line, exit status 2."""


# ------------------------------------------------------------------ reading runs
@dataclass
class RunRow:
    """What the report needs of one MLflow run."""
    run_id: str
    tags: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, float]
    status: str = "FINISHED"


def value(run: RunRow, key: str) -> str | None:
    """The value of a --filter / --group-by key for one run (None when the run lacks it)."""
    if key.startswith("tags."):
        return run.tags.get(key[5:])
    if key.startswith("params."):
        return run.params.get(key[7:])
    if key == "init":
        pretrained = run.tags.get("sslpipe.pretrained", "none")
        return pretrained if pretrained in ("random", "none") else "pretrained"
    if key in SHORT:
        return run.tags.get(f"sslpipe.{key}")
    return run.tags.get(key, run.params.get(key))


def parse_filter(text: str) -> tuple[str, bool, set[str]]:
    """`key=a,b` (any of) or `key!=a,b` (none of) -> (key, negate, values)."""
    negate = "!=" in text
    key, eq, values = text.partition("!=" if negate else "=")
    if not eq or not key.strip() or not values.strip():
        raise ReportError(f"--filter '{text}' is not KEY=VALUE[,VALUE...] or KEY!=VALUE[,VALUE...]")
    return key.strip(), negate, {v.strip() for v in values.split(",")}


def matches(run: RunRow, filters: list[tuple[str, bool, set[str]]]) -> bool:
    return all((value(run, key) in values) != negate for key, negate, values in filters)


def load_runs(uri: str, experiment: str | None) -> list[RunRow]:
    """Every run of `experiment` (all experiments when None) in the store at `uri`."""
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        raise ReportError(f"no MLflow store at {uri} (run something first, or pass --tracking-uri)")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiments = client.search_experiments()
    if experiment is not None:
        chosen = [e for e in experiments if e.name == experiment]
        if not chosen:
            names = ", ".join(sorted(e.name for e in experiments)) or "none"
            raise ReportError(f"no experiment '{experiment}' in {uri}; experiments there: {names}")
        experiments = chosen
    rows, token = [], None
    while True:
        page = client.search_runs([e.experiment_id for e in experiments], max_results=1000, page_token=token)
        rows += [RunRow(r.info.run_id, dict(r.data.tags), dict(r.data.params), dict(r.data.metrics), r.info.status)
                 for r in page]
        token = page.token
        if not token:
            return rows


# ------------------------------------------------------------------ aggregating
def is_protocol(name: str) -> bool:
    """A param that makes two numbers comparable or not: a probe's protocol (`protocol.*`, the
    label fraction among them), the share of data, the training budget (epochs, steps) and a
    fine-tune's augmentation (`stage.finetune.augment`, the ops its `view` sets)."""
    return (name.startswith("protocol.") or name in ("dataset.fraction", "dataset.data_ratio")
            or (name.startswith("stage.") and (name.endswith((".epochs", ".max_steps", "finetune.augment"))
                                               or "finetune.view." in name)))


def protocol_of(run: RunRow) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, v) for k, v in run.params.items() if is_protocol(k)))


@dataclass
class Group:
    key: tuple[str, ...]
    runs: list[RunRow] = field(default_factory=list)
    protocol: tuple[tuple[str, str], ...] = ()  # shared by every run of the group

    def seeds(self) -> list[str]:
        return sorted((r.params.get("seed", "?") for r in self.runs), key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s))

    def stats(self, metric: str) -> tuple[float, float, int] | None:
        """(mean, sample std (0 for one run), n) of `metric` over the runs that logged it."""
        values = [r.metrics[metric] for r in self.runs if metric in r.metrics]
        if not values:
            return None
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return statistics.fmean(values), std, len(values)


def aggregate(runs: list[RunRow], group_by: list[str], metrics: list[str]) -> list[Group]:
    """Groups of runs sharing the `group_by` values and their protocol (`is_protocol`): runs
    with another label fraction, probe protocol or budget are never averaged as if they were
    seeds, they make rows of their own. Runs that logged none of `metrics` are left out."""
    groups: dict[tuple, Group] = {}
    for run in runs:
        if not any(m in run.metrics for m in metrics):
            continue
        key, protocol = tuple(value(run, k) or "" for k in group_by), protocol_of(run)
        groups.setdefault((key, protocol), Group(key, protocol=protocol)).runs.append(run)
    return [groups[k] for k in sorted(groups)]


def protocol_column(groups: list[Group]) -> list[str] | None:
    """Per group, the protocol settings that differ between rows of the same `group_by` key
    (`protocol.label_fraction=0.1`); None when no key has two protocols."""
    varying: set[str] = set()
    by_key: dict[tuple, list[Group]] = {}
    for g in groups:
        by_key.setdefault(g.key, []).append(g)
    for same in by_key.values():
        if len(same) > 1:
            names = {k for g in same for k, _ in g.protocol}
            varying |= {k for k in names if len({dict(g.protocol).get(k) for g in same}) > 1}
    if not varying:
        return None
    return [" ".join(f"{k}={dict(g.protocol).get(k, '-')}" for k in sorted(varying)) for g in groups]


# ------------------------------------------------------------------ rendering
def _cell(stats: tuple[float, float, int] | None, digits: int) -> str:
    if stats is None:
        return ""
    mean, std, n = stats
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"


def markdown(groups: list[Group], group_by: list[str], metrics: list[str], digits: int) -> str:
    protocols = protocol_column(groups)
    head = [*group_by, *(["protocol"] if protocols else []), "runs", "seeds", *metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for i, g in enumerate(groups):
        cells = [*g.key, *([protocols[i]] if protocols else []), str(len(g.runs)), ",".join(g.seeds()),
                 *(_cell(g.stats(m), digits) for m in metrics)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_csv(groups: list[Group], group_by: list[str], metrics: list[str]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    protocols = protocol_column(groups)
    writer.writerow([*group_by, *(["protocol"] if protocols else []), "runs", "seeds",
                     *(f"{m}_{s}" for m in metrics for s in ("mean", "std", "n"))])
    for i, g in enumerate(groups):
        numbers = []
        for m in metrics:
            stats = g.stats(m)
            numbers += ["", "", 0] if stats is None else [repr(stats[0]), repr(stats[1]), stats[2]]
        writer.writerow([*g.key, *([protocols[i]] if protocols else []), len(g.runs), " ".join(g.seeds()), *numbers])
    return out.getvalue()


# ------------------------------------------------------------------ command line
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sslpipe.report", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI,
                   help=f"MLflow store (default: $MLFLOW_TRACKING_URI, else {DEFAULT_URI})")
    p.add_argument("--experiment", default="sslpipe", help="experiment name (default: sslpipe; '*' for all)")
    p.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE[,VALUE]",
                   help="keep runs whose KEY is one of the values (KEY!=... to drop them); repeatable, all must hold")
    p.add_argument("--group-by", default=DEFAULT_GROUP, help=f"comma-separated keys (default: {DEFAULT_GROUP})")
    p.add_argument("--metrics", default="test/top1", help="comma-separated metric names (default: test/top1)")
    p.add_argument("--format", choices=("markdown", "csv"), default="markdown")
    p.add_argument("--output", type=Path, help="write the table to this file instead of stdout")
    p.add_argument("--digits", type=int, default=4, help="decimals in the markdown table (default: 4)")
    p.add_argument("--all-statuses", action="store_true", help="include FAILED / RUNNING / KILLED runs too")
    p.add_argument("--best-first", action="store_true",
                   help="order rows by the first metric's mean, highest first (e.g. a search's best trial on top)")
    return p


def report(args: argparse.Namespace) -> str:
    filters = [parse_filter(f) for f in args.filter]
    group_by = [k.strip() for k in args.group_by.split(",") if k.strip()]
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    if not metrics:
        raise ReportError("--metrics is empty")
    runs = load_runs(args.tracking_uri, None if args.experiment == "*" else args.experiment)
    runs = [r for r in runs if (args.all_statuses or r.status == "FINISHED") and matches(r, filters)]
    groups = aggregate(runs, group_by, metrics)
    if args.best_first:
        groups.sort(key=lambda g: -(g.stats(metrics[0]) or (float("-inf"),))[0])
    if not groups:
        raise ReportError(f"no {'' if args.all_statuses else 'finished '}runs match the filters "
                          f"{args.filter or '(none)'} and logged any of {metrics} in {args.tracking_uri}")
    return markdown(groups, group_by, metrics, args.digits) if args.format == "markdown" else to_csv(groups, group_by, metrics)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        text = report(args)
    except ReportError as err:
        print(f"sslpipe.report: error: {err}", file=sys.stderr)
        return 2
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
