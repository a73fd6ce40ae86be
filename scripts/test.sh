#!/usr/bin/env bash
# The test command of the README: installs what it needs into .venv, lints, checks types, runs the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh test,examples,docs
# A headless browser checks that the docs render their formulas offline; as root on Debian it is
# installed here, elsewhere that one test is skipped, saying why.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
    || echo "chromium could not be installed; the docs' browser check will be skipped" >&2
fi
. .venv/bin/activate
ruff check lightning_hsu tests examples benchmarks scripts
mypy lightning_hsu
python -m pytest -q "$@"
