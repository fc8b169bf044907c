"""The end-of-run table: a markdown table of a run's numbers, printed and saved as results.md in
its run folder (and logged to MLflow by the stage that has the run open)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO


def results_table(rows: list[dict], columns: list[str]) -> str:
    """A markdown table; numbers with 4 decimals."""
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else ("" if v is None else str(v))  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(run_dir: Path, title: str, table: str, stream: TextIO | None = None) -> Path:
    """Print `table` under `title` and save both as `run_dir`/results.md."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "results.md"
    path.write_text(f"# {title}\n\n{table}\n")
    print(f"\n{title}\n{table}\n(saved to {path})\n", file=stream or sys.stdout, flush=True)
    return path


def print_table(title: str, text: str) -> None:
    """A stage's one-line summary under its title, on stdout (rank 0's only, as the table)."""
    from sslpipe.distributed import is_main

    if is_main():
        print(f"\n{title}\n{text}\n", flush=True)
