#!/usr/bin/env bash
# The test command of the README: installs what it needs into .venv, lints, runs the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh test,examples,docs
. .venv/bin/activate
ruff check lightning_hsu tests examples benchmarks scripts
python -m pytest -q "$@"
