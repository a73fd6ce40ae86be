#!/usr/bin/env bash
# Everything the project checks on a GPU, as prepared runs for a lent machine:
#   bench   the CUDA tests (pytest -m gpu: CUDA graphs, no host sync, callback vs hand-written),
#           then every benchmark (benchmarks/run_all_gpu.sh), the training step first: about
#           3 minutes on an H200 (runs 3-6 of docs/performance.md);
#   checks  the strategy checks (tests/lightning/gpu_checks.py: AMP, DDP/NCCL, FSDP, DeepSpeed ZeRO-2/3,
#           two processes per check): 4.5 minutes there;
#   all     both (the default): about 8 minutes by those times, but each part has its own time
#           limit (bench up to 10 minutes, checks 5.5): a slow machine may need two calls.
#   fused   issue 19, the fused Triton kernel of the pair sums, on its own (at most 9 minutes by its
#           time limits; about 6-8 estimated, never run yet): its CUDA tests (compiled kernel vs the
#           eager path and float64, CUDA-graph replay, no host sync), the per-layer table
#           (benchmarks/bench_fused.py --part layers: fused / eager path / products / official, eager
#           and replayed, 64-4096 neurons), the Lightning ResNet-18 step at batch 64 and 256 with the
#           settings rotating within one fit (--part step), the errors and times of TF32/bfloat16
#           products (bench_precision.py), then the official formulations under torch.compile
#           (--part compile, row by row: a timeout keeps the rows done).
# Results go to ${OUT:-gpu_out}/ (the lent machine's $OUT comes back): session.log, results_gpu.md,
# gpu_checks.md, perf_kernels_gpu.png, results_fused.md. DeepSpeed wheels in .whl/ are installed
# first if present (the lent machines cannot reach a package index; see docs/gpu_checks.md).
# Usage: bash scripts/gpu_session.sh [bench|checks|all|fused]
set -u
cd "$(dirname "$0")/.."
PART="${1:-all}"
case "$PART" in bench | checks | all | fused) ;; *) echo "usage: $0 [bench|checks|all|fused]" >&2; exit 2 ;; esac
DEST="${OUT:-gpu_out}"
mkdir -p "$DEST"
case "$DEST" in /*) ;; *) DEST="$PWD/$DEST" ;; esac
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD"
PY="${PYTHON:-python3}"
{
  date -u
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl &&
      export PYTHONPATH="/tmp/site:$PWD"
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)"
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1 | tail -1
  if [ "$PART" = fused ]; then
    echo "## CUDA tests of the fused kernel"
    timeout 110 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/functional/test_triton_pairs.py \
      tests/lightning/test_cuda_graphs.py 2>&1 | tail -30
    FUSED="$DEST/results_fused.md"
    : >"$FUSED"
    # time limits: 110 + 140 + 110 + 50 + 120 s, under 9 minutes with the start; compile last (slowest)
    for part in layers step precision compile; do
      case "$part" in
        layers) limit=140; run=(bench_fused.py --device cuda --part layers) ;;
        step) limit=110; run=(bench_fused.py --device cuda --part step) ;;
        precision) limit=50; run=(bench_precision.py --device cuda --time) ;;
        compile) limit=120; run=(bench_fused.py --device cuda --part compile) ;;
      esac
      echo "## ${run[*]} (limit ${limit} s)" | tee -a "$FUSED"
      (cd benchmarks && timeout "$limit" "$PY" "${run[@]}" 2>&1) |
        grep -v "Warning\|warn\|^  \|^W1\|^GPU avail\|^TPU avail\|Tip:\|LOCAL_RANK\|set(s) of neurons\|max_epochs" |
        tee -a "$FUSED"
    done
    date -u
    exit 0
  fi
  if [ "$PART" != checks ]; then
    echo "## CUDA tests"
    timeout 150 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/lightning/test_cuda_graphs.py 2>&1 | tail -40
    echo "## benchmarks"
    PYTHON="$PY" bash benchmarks/run_all_gpu.sh "$DEST/results_gpu.md" "$DEST/perf_kernels_gpu.png" >/dev/null 2>&1
    grep -v "Warning\|warn\|^  \|^W1\|check(" "$DEST/results_gpu.md"
  fi
  if [ "$PART" != bench ]; then
    echo "## strategy checks"
    timeout 330 "$PY" tests/lightning/gpu_checks.py --out "$DEST/gpu_checks.md" 2>&1 | tail -30
  fi
  date -u
} 2>&1 | tee "$DEST/session.log"
