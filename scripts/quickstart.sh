#!/usr/bin/env bash
# The README's main job: set up .venv (CPU PyTorch first, then lightning-hsu with the examples
# extra) and run the quickstart, which trains a small CNN on scikit-learn's digits with and
# without HypersphericalUniformity(preset="mhe") and prints accuracy, penalty and neuron angles.
# Extra arguments go to the quickstart, e.g. `bash scripts/quickstart.sh --smoke`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh examples
. .venv/bin/activate
python examples/quickstart.py "$@"
