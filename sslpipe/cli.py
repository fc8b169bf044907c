"""The Hydra entry point: compose the config, hand it to `sslpipe.run.run`.

Only hydra and omegaconf are imported here, so `--cfg job` and `--help` stay fast;
torch, mlflow and the rest load inside `run()`.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="pkg://sslpipe.conf", config_name="config")
def main(cfg: DictConfig) -> dict | None:
    from sslpipe.run import run

    return run(cfg)
