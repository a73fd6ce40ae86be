#!/usr/bin/env bash
# Run every benchmark on CUDA at full size (~3 minutes on one H200) and write the markdown
# output to ${1:-benchmarks/results_gpu.md}, the kernel plot to ${2:-benchmarks/perf_kernels_gpu.png}.
# Each benchmark has its own time limit, so a slow one cannot eat the others' time; the training
# step, the number a user feels, runs first. bench_sharded is left out: one GPU can run W = 1 only
# (its 2-rank runs are the CPU's, with gloo). Usage: bash benchmarks/run_all_gpu.sh [out.md] [plot.png]
set -u
cd "$(dirname "$0")"
OUT="${1:-results_gpu.md}"
PLOT="${2:-perf_kernels_gpu.png}"
case "$OUT" in /*) ;; *) OUT="$(pwd)/$OUT" ;; esac
case "$PLOT" in /*) ;; *) PLOT="$(pwd)/$PLOT" ;; esac
PY="${PYTHON:-python}"
{
  echo "# GPU benchmark run $(date -u +%Y-%m-%dT%H:%MZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
  echo
  echo "## bench_training_step"
  timeout 150 "$PY" bench_training_step.py --device cuda --steps 20 --no-compile --presets mhe,comhe,mhs 2>&1; echo
  echo "## bench_callback_overhead"
  timeout 120 "$PY" bench_callback_overhead.py --device cuda --steps 30 --presets mhe,comhe,mhs 2>&1; echo
  echo "## bench_kernels"; timeout 90 "$PY" bench_kernels.py --device cuda --max-n 4096 --plot "$PLOT" 2>&1; echo
  echo "## bench_huge"; timeout 90 "$PY" bench_huge.py --device cuda 2>&1; echo
} | tee "$OUT"
