#!/usr/bin/env bash
# Install, then run the whole test suite (slow multi-process tests included; skip them locally with
# `python -m pytest -m "not slow" tests`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh
source tools/venv.sh
python -m pytest -q --durations=30 tests "$@"
