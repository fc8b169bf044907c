"""docs/architecture.md's trace of `python -m sslpipe stage=pretrain method=dino` against the code:
every named function exists in its file, every call it names is in that function's source, the
trace spans at most four files, and the config resolves the stage and the method the trace says."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from sslpipe.config import compose

REPO = Path(__file__).resolve().parents[1]
ROW = re.compile(r"^\| (\d+) \| (\S+) \| (\S+) \| `([^`]+)`")


def trace() -> list[tuple[str, str, str]]:
    text = (REPO / "docs" / "architecture.md").read_text()
    section = text.split("## The trace", 1)[1].split("\n## ", 1)[0]
    rows = [ROW.match(line) for line in section.splitlines()]
    return [(m.group(2), m.group(3), m.group(4)) for m in rows if m]


def function_source(path: Path, dotted: str) -> str:
    """The source of `name` or `Class.name` in `path`, nested functions included."""
    source = path.read_text()
    tree = ast.parse(source)
    *owner, name = dotted.split(".")
    scope = tree
    if owner:
        scope = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == owner[0])
    for node in ast.walk(scope):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            return ast.get_source_segment(source, node)
    raise AssertionError(f"{dotted} is not defined in {path}")


def test_the_trace_names_real_calls_in_at_most_four_files():
    hops = trace()
    assert len(hops) >= 8, hops  # command ... loss, not an empty table
    for file, function, call in hops:
        body = function_source(REPO / file, function)
        assert call in body, f"{file}:{function} does not call `{call}`"
    files = {file for file, _, _ in hops}
    assert len(files) <= 4, files
    assert hops[0][0] == "sslpipe/__main__.py" and hops[-1][0] == "sslpipe/methods/dino.py"


def test_the_config_resolves_the_stage_and_method_the_trace_names():
    cfg = compose(["stage=pretrain", "method=dino"])
    assert cfg.stage._target_ == "sslpipe.stages.pretrain.run"
    assert cfg.method._target_ == "sslpipe.methods.dino.DINO"


def test_every_stage_names_its_function():
    """Stages are resolved through `_target_` (no hand-kept list): each conf/stage yaml names
    `sslpipe.stages.<name>.run`, and that function exists."""
    from hydra.utils import get_method

    for yaml in sorted((REPO / "conf" / "stage").glob("*.yaml")):
        cfg = compose([f"stage={yaml.stem}"])
        assert cfg.stage._target_ == f"sslpipe.stages.{yaml.stem}.run", yaml
        assert callable(get_method(cfg.stage._target_))


def test_readme_layout_and_architecture_map_name_every_module_and_only_real_ones():
    """The README's Layout section and docs/architecture.md's map list each top-level module of
    sslpipe/ (a file added or renamed without updating them fails here), and name no file that
    is gone."""
    modules = {p.name for p in (REPO / "sslpipe").glob("*.py") if p.name != "__init__.py"}
    readme = (REPO / "README.md").read_text()
    layout = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    arch = (REPO / "docs" / "architecture.md").read_text().split("## Where things live", 1)[1]
    for where, text in (("README.md Layout", layout), ("docs/architecture.md", arch)):
        named = set(re.findall(r"\b(\w+\.py)\b", text))
        assert modules <= named, f"{where} misses {sorted(modules - named)}"
        gone = {n for n in named if not any(REPO.joinpath("sslpipe").rglob(n))}
        assert not gone, f"{where} names files that do not exist: {sorted(gone)}"
