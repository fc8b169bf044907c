#!/bin/bash
# Pretrain, then probe the result once pretraining has succeeded (a SLURM dependency):
#   slurm/chain.sh method=byol dataset=cifar10
# The probe finds the checkpoint in the pretrain job's run folder, which is known at
# submission time because it is named after the job id (outputs/slurm/<job id>).
# Arguments go to both jobs (method, backbone, dataset, seed); stage settings for one of
# them go in PRETRAIN_ARGS / PROBE_ARGS (space-separated overrides). Extra sbatch options:
# SBATCH_PARTITION, SBATCH_TIMELIMIT, ... (sbatch reads them from the environment).
set -euo pipefail
cd "$(dirname "$0")/.."
PROBE=${SSLPIPE_PROBE:-linear_probe}
pre=$(sbatch --parsable slurm/stage.sbatch stage=pretrain ${PRETRAIN_ARGS:-} "$@")
probe=$(sbatch --parsable --dependency=afterok:"$pre" --kill-on-invalid-dep=yes slurm/stage.sbatch \
        stage="$PROBE" pretrained="outputs/slurm/$pre/checkpoints/final.pt" ${PROBE_ARGS:-} "$@")
echo "pretrain job $pre -> $PROBE job $probe (runs after $pre succeeds)"
