"""Every command block in README.md and docs/*.md fenced as ```bash runnable (or
```sh runnable) runs and exits 0. A file's blocks run in order, in one fresh working
directory (so later blocks see what earlier ones wrote, e.g. outputs/mlflow.db), with
bash -euo pipefail. Expensive commands (installs, full trainings, servers, SLURM) are
fenced as plain ```bash and only shown."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from conftest import REPO

FENCE = re.compile(r"^```(?P<info>[^\n`]*)\n(?P<body>.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def runnable_blocks(path: Path) -> list[tuple[int, str]]:
    """(line number, script) of each runnable block of a markdown file."""
    text = path.read_text()
    blocks = []
    for m in FENCE.finditer(text):
        words = m.group("info").split()
        if words and words[0] in ("bash", "sh") and "runnable" in words[1:]:
            blocks.append((text.count("\n", 0, m.start()) + 1, m.group("body")))
    return blocks


FILES = [p for p in DOCS if runnable_blocks(p)]


def test_blocks_are_found(tmp_path):
    assert runnable_blocks(REPO / "docs" / "quickstart.md"), "the quick start has runnable blocks"
    sample = "x\n```bash runnable\necho a\n```\n```bash\nnot run\n```\n```sh runnable extra\necho b\n```\n"
    tmp = tmp_path / "sample.md"
    tmp.write_text(sample)
    assert runnable_blocks(tmp) == [(2, "echo a\n"), (8, "echo b\n")]


@pytest.mark.slow
@pytest.mark.parametrize("doc", FILES, ids=[str(p.relative_to(REPO)) for p in FILES])
def test_runnable_blocks_exit_zero(doc: Path, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "SSLPIPE_PROGRESS")}
    env.update(OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "2"), SSLPIPE_DOCS_TEST="1")
    (tmp_path / "scripts").symlink_to(REPO / "scripts")  # a user's checkout: the project's scripts beside them
    for line, script in runnable_blocks(doc):
        out = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=600)
        where = f"{doc.relative_to(REPO)}:{line}"
        assert out.returncode == 0, f"{where} exited {out.returncode}\n{script}\n--- stdout\n{out.stdout[-2000:]}" \
                                    f"\n--- stderr\n{out.stderr[-3000:]}"
        print(f"{where}: ok\n{out.stdout[-1500:]}")
