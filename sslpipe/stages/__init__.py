"""Stages: one file each, `run(ctx) -> StageResult`, named by `_target_` in conf/step/<name>.yaml.
A stage reads like a recipe: build data, build model, fit or evaluate, log, return metrics.
An index of what they share:

- `context.py`: `Context` (what a stage is given), `StageResult`, `stage_run` (its MLflow run)
- `build.py`: the splits, backbone, method and normaliser a stage builds from the config
- `features.py`: `extract_features`, cached across the probes of a pipeline
- `probe.py`: the skeleton the knn / linear / mlp probes share
"""

from sslpipe.stages.build import build_backbone, build_method, build_splits, normalizer, resolve_num_classes
from sslpipe.stages.context import Context, StageResult, log_classification, protocol_params, stage_run
from sslpipe.stages.features import extract_features

__all__ = ["Context", "StageResult", "build_backbone", "build_method", "build_splits", "extract_features",
           "log_classification", "normalizer", "protocol_params", "resolve_num_classes", "stage_run"]
