#!/usr/bin/env bash
# Install megagpt and its dependencies on a CPU machine (this project's dev machines and CI).
# torch is pinned first and on its own: an unpinned torch requirement would make pip pull the newest
# CUDA build (gigabytes). requirements-cpu.txt keeps every later resolution on the same versions.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --disable-pip-version-check torch==2.13.0
python -m pip install -q --disable-pip-version-check -c requirements-cpu.txt -e ".[train,hf,eval,dev]"
