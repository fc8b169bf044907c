#!/usr/bin/env bash
# Every benchmark table, as docs/benchmarks.md shows them. On a GPU machine the CPU tables run
# at the same time on two cores of their own (taskset, OMP_NUM_THREADS=2, no GPU visible),
# the GPU tables on the other cores.  Usage: benchmarks/run_all.sh OUT_DIR [cpu|gpu|both|data]
set -u
out=${1:-bench-out}; what=${2:-both}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 SSLPIPE_PROGRESS=off
ncpu=$(nproc)
command -v taskset >/dev/null || taskset() { shift 2; "$@"; }  # no taskset: unpinned
cpu_tables() {
  local run="taskset -c $((ncpu - 2)),$((ncpu - 1)) env OMP_NUM_THREADS=2 CUDA_VISIBLE_DEVICES= python3"
  $run benchmarks/overhead.py --device cpu --steps 30 --rounds 3
  $run benchmarks/tracking.py --device cpu
  $run benchmarks/augment.py --device cpu --n 2048
  $run benchmarks/peer.py --method simclr --device cpu --steps 30 --skip 10 --workers 2 --rounds 3
  $run benchmarks/peer.py --method dino --device cpu --size 32 --local-size 13 --steps 30 --skip 10 --workers 2 --rounds 3
  $run benchmarks/startup.py --rounds 5 --step-rounds 2
}
gpu_tables() {
  local run="taskset -c 0-$((ncpu - 3)) python3"
  $run benchmarks/overhead.py --device cuda --steps 100 --rounds 3 --synthetic 8192 backbone=resnet18 dataset=npy
  $run benchmarks/tracking.py --device cuda --synthetic 8192 backbone=resnet18 dataset=npy
  $run benchmarks/augment.py --device cuda --n 8192
  $run benchmarks/peer.py --method simclr --device cuda --steps 40 --skip 3
  $run benchmarks/peer.py --method dino --device cuda --steps 25 --skip 3
  $run benchmarks/flops.py --device cuda --compile
  $run benchmarks/gpu.py --profile                 # end to end from JPEGs: bare / sslpipe stream + gpu / lightly
  $run benchmarks/gpu.py --workloads simclr_r50 --rows gpu stream gpu_serial --images 40000  # decode ahead vs in series
}
data_tables() {  # ImageNet-shaped folders of up to 1.28M hard-linked JPEGs under /tmp (about 15 minutes)
  python3 benchmarks/data_scale.py --workdir /tmp/sslpipe-scale --sizes 1000 10000 128000 1281000 --memory-baseline 10000 --listing
  python3 benchmarks/loader.py --workdir /tmp/sslpipe-scale --workers 2 --rounds 3
  python3 benchmarks/stream_vs_memory.py --workdir /tmp/sslpipe-svm --seeds 0 1 2
  python3 benchmarks/epoch_boundary.py --workdir /tmp/sslpipe-boundary
}
if [ "$what" = data ]; then data_tables >"$out/data.md" 2>"$out/data.err"; exit; fi
[ "$what" != gpu ] && { cpu_tables >"$out/cpu.md" 2>"$out/cpu.err" & }
[ "$what" != cpu ] && { gpu_tables >"$out/gpu.md" 2>"$out/gpu.err" & }
wait
