#!/usr/bin/env bash
# Wheels that benchmarks/gpu.py needs on a GPU machine without network access whose Python (3.12)
# already has torch, torchvision, timm, numpy, PIL, psutil and pyyaml: hydra, MLflow's client
# (mlflow-skinny: the sqlite store, no UI), lightly, kornia, webdataset and what they import
# there (found with `python -X importtime` on a real `stage=pretrain` run). About 29 MB.
#   benchmarks/gpu_wheels.sh .whl            # here, with the package registry
#   python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .whl/*.whl . \
#       && PYTHONPATH=/tmp/site python3 benchmarks/gpu.py --profile    # there
set -euo pipefail
out=${1:-.whl}
mkdir -p "$out"
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
wheels=(Mako==1.4.3 SQLAlchemy==2.1.9 alembic==1.20.1 annotated-types==0.7.0 braceexpand==0.1.7 cachetools==7.3.3
        cffi==2.0.0 cryptography==48.0.0 databricks-sdk==0.167.0 dill==0.4.1 fastapi==0.165.0 google-auth==2.63.0
        httpcore2==2.16.2 httpx2==2.16.2 hydra-core==1.3.8 importlib_metadata==9.1.0 kornia==0.9.0 kornia_rs==0.2.0
        lightly==1.6.0 mlflow-skinny==3.17.2 mlflow-tracing==3.17.2 omegaconf==2.3.1 opentelemetry-api==1.45.2
        opentelemetry-proto==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-semantic-conventions==0.66b2
        orjson==3.11.7 outcome==1.3.0.post0 pydantic==2.13.4 pydantic_core==2.46.4 sniffio==1.3.1 sqlparse==0.6.1
        starlette==1.10.0 trio==0.22.2 truststore==0.10.5 typing-inspection==0.4.2 webdataset==1.0.2)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$out" "${wheels[@]}"
python3 -m pip wheel -q --no-deps -w "$out" antlr4-python3-runtime==4.9.3  # hydra's parser: an sdist only
du -sh "$out"
