#!/usr/bin/env bash
# Create .venv (if missing) and install lightning-hsu with the extras given as arguments.
# CPU PyTorch is installed first: a bare `pip install lightning` on a machine without torch
# would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! python -c "import torch" >/dev/null 2>&1; then
  python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
extras=${1:-test}
python -m pip install -q -e ".[${extras}]"
