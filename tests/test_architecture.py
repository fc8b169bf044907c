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


def test_one_spelling_per_setting_and_the_loop_node_is_loop_settings():
    """A stage's settings sit at stage.<name> whether it runs alone or as a pipeline step (so
    `stage.pretrain.loop.epochs=7` means the same in both); a pipeline step's Context holds what
    `stage=<name>` alone would; the `loop:` node of each training stage has exactly the fields of
    engine.LoopSettings (no key that nothing reads)."""
    import dataclasses
    from pathlib import Path

    import torch
    from omegaconf import DictConfig

    from sslpipe.engine import LoopSettings
    from sslpipe.stages.context import Context

    pipeline = compose(["stage=pipeline", "stage.pretrain.loop.epochs=7", "stage.knn.k=3"])
    steps = sorted(p.stem for p in (REPO / "conf" / "step").glob("*.yaml"))
    assert steps == sorted(k for k, v in pipeline.stage.items() if isinstance(v, DictConfig) and "_target_" in v)
    fields = {f.name for f in dataclasses.fields(LoopSettings)}
    for name in steps:
        same = {"pretrain": ["stage.pretrain.loop.epochs=7"], "knn": ["stage.knn.k=3"]}.get(name, [])
        alone = compose([f"stage={name}", *same])  # the same override, spelled the same
        assert alone.stage[name] == pipeline.stage[name], name
        assert alone.stage._target_ == pipeline.stage[name]._target_ == f"sslpipe.stages.{name}.run"
        step = Context(pipeline, Path("."), torch.device("cpu"), None).for_stage(name, "random", name)
        assert step.cfg.stage.name == name and step.settings == alone.stage[name]
        if "loop" in alone.stage[name]:
            assert set(alone.stage[name].loop) == fields, name
            LoopSettings.of_stage(alone.stage[name])  # every key is a field it takes
    assert pipeline.stage.pretrain.loop.epochs == 7 and pipeline.stage.knn.k == 3
    assert {n for n in steps if "loop" in pipeline.stage[n]} == {"pretrain", "finetune", "segment"}


def test_no_step_setting_that_nothing_reads():
    """Every key of conf/step/*.yaml is read by name somewhere in sslpipe/ (as `.key`, `"key"` or
    `key=`), or belongs to a node passed on whole (an optimizer node, export's `recommended`):
    a key added without code that reads it fails here."""
    import yaml

    source = "\n".join(p.read_text() for p in (REPO / "sslpipe").rglob("*.py"))
    whole = {"recommended"}  # export writes this node into manifest.json as it is
    unread = []
    for path in sorted((REPO / "conf" / "step").glob("*.yaml")):
        def walk(node: dict, prefix: str) -> None:
            for key, value in node.items():
                if key.startswith("_"):
                    continue
                read = re.search(rf"\.{key}\b|[\"']{key}[\"']|\b{key}=", source)
                if isinstance(value, dict) and "_target_" not in value and read and key not in whole:
                    walk(value, f"{prefix}{key}.")  # a node read by name: are its keys read too?
                elif not read:
                    unread.append(f"{path.stem}: {prefix}{key}")
        walk(yaml.safe_load(path.read_text()), "")
    assert not unread, unread
