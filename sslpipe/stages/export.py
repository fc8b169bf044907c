"""stage=export: a folder that other tools load (spiral-selfsup's st-model-hub layout, DESIGN.md section 4):
manifest.json + encoder / projector / linear_head tensors as safetensors or JSON snapshots.
The encoder's keys are the plain backbone's; the manifest's `backbone.constructor` names the call
that builds its architecture (`timm.create_model(<name>, **kwargs)` where a stock timm model is
that network, e.g. the ViTs with `patch_size=4, img_size=32`; sslpipe's builder where none is,
e.g. the CIFAR-stem ResNets), and `sslpipe.load_encoder(folder)` does it in one call."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from hydra.utils import get_class
from omegaconf import OmegaConf

from sslpipe.pretrained import load_encoder_state, pretrained_parts
from sslpipe.tensorfiles import FORMATS, constructor, read_tensors, write_tensors
from sslpipe.results import print_table
from sslpipe.stages.build import build_backbone
from sslpipe.stages.context import Context, StageResult, stage_run
from sslpipe.tracking import git_commit

FORMAT_VERSION = 1
COMPATIBLE = ["st-vision/classification", "st-nn/linear-probe", "st-nn/fine-tune"]


def _manifest(ctx: Context, files: dict, run_id: str | None, source: str, num_features: int) -> dict:
    cfg, st = ctx.cfg, ctx.settings
    backbone_cfg = OmegaConf.to_container(cfg.backbone, resolve=True)
    made = constructor(backbone_cfg)
    return {
        "format_version": FORMAT_VERSION,
        "variant": st.variant or f"{cfg.backbone.name}-{cfg.method.name}",
        "objective": get_class(cfg.method._target_).objective,
        "method": cfg.method.name,
        "backbone": {
            "name": cfg.backbone.name,
            "constructor": made,
            # only where timm.create_model(timm_name, **constructor kwargs) is the network
            "timm_name": made["args"][0] if made["call"] == "timm.create_model" else None,
            "num_features": num_features,
            "input_size": [cfg.dataset.channels, cfg.dataset.image_size, cfg.dataset.image_size],
            "normalization": OmegaConf.to_container(cfg.dataset.norm, resolve=True),
            "build": backbone_cfg,  # hydra.utils.instantiate(...) of this (less `name`) rebuilds it
        },
        "dataset": {"name": cfg.dataset.name, "num_classes": cfg.dataset.num_classes},
        "files": files,
        "downstream": {"compatible": COMPATIBLE, "num_classes": cfg.dataset.num_classes},
        "recommended": OmegaConf.to_container(st.recommended, resolve=True),
        "metrics": ctx.inputs.get("metrics", {}),  # a pipeline's probe results
        "provenance": {"mlflow_run_id": run_id, "pretrained": source, "git_commit": git_commit()},
    }


def run(ctx: Context) -> StageResult:
    cfg, st = ctx.cfg, ctx.settings
    if st.format not in FORMATS:
        raise ValueError(f"stage.export.format='{st.format}' is not an export format; valid: {', '.join(FORMATS)}")
    if cfg.pretrained in (None, "random"):
        raise ValueError("stage=export needs pretrained=<checkpoint | export folder | runs:/<run id>>")
    parts = pretrained_parts(str(cfg.pretrained), cfg.tracking.uri)
    backbone = build_backbone(ctx)
    load_encoder_state(backbone, parts.encoder, parts.source)  # proves the weights fit before writing anything
    out = Path(st.dir) if st.dir else ctx.run_dir / "export"
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    suffix = ".safetensors" if st.format == "safetensors" else ".json"
    tensors = {"encoder": backbone.state_dict(), "projector": parts.projector}
    linear_head = st.linear_head or ctx.inputs.get("linear_head")  # yours, or a pipeline's linear probe's
    if linear_head:
        tensors["linear_head"] = read_tensors(Path(linear_head))
    with stage_run(ctx) as run:
        files = {name: {"path": f"{name}{suffix}", "tensors": write_tensors(t, staging / f"{name}{suffix}")}
                 for name, t in tensors.items() if t}
        manifest = _manifest(ctx, files, run.id, parts.source, backbone.num_features)
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2))
        if out.exists():  # replace a previous export only once the new one is complete
            shutil.rmtree(out)
        os.replace(staging, out)
        run.log_artifact(out, "export")
    print_table("export", f"{out} ({', '.join(sorted(files))}, {st.format})")
    return StageResult(export_dir=str(out), run_id=run.id)
