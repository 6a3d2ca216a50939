#!/usr/bin/env bash
# Regenerate requirements/cpu.lock: every package of a CPU install (Python 3.11, Linux x86_64), transitively pinned,
# from setup.py's requirements (extras train, hf, eval, dev) and the pins in requirements/cpu.in.
# Needs a source of the CPU torch wheel: pip's find-links on these machines (/opt/wheels), or set
# PIP_FIND_LINKS (e.g. to the PyTorch CPU wheel index) before running it elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
links="${PIP_FIND_LINKS:-$(python3 -m pip config get global.find-links 2>/dev/null || true)}"
if [[ -z "$links" ]]; then
  echo "tools/lock.sh: no source of the CPU torch wheel: set PIP_FIND_LINKS to a folder or page that has it" >&2
  exit 2
fi
uv_bin="$(command -v uv || true)"
if [[ -z "$uv_bin" ]]; then
  python3 -m pip install -q "uv==0.13.9"
  uv_bin="$(command -v uv)"
fi
"$uv_bin" pip compile setup.py --extra train --extra hf --extra eval --extra dev -c requirements/cpu.in \
  --python-version 3.11 --python-platform x86_64-manylinux_2_28 --find-links "$links" \
  --custom-compile-command "bash tools/lock.sh" -o requirements/cpu.lock.partial
grep -q '^torch==.*+cpu$' requirements/cpu.lock.partial || {
  echo "tools/lock.sh: the lock did not resolve a CPU torch wheel (see $links); refusing to write it" >&2
  rm -f requirements/cpu.lock.partial; exit 1; }
mv requirements/cpu.lock.partial requirements/cpu.lock
echo "wrote requirements/cpu.lock ($(grep -c '^[a-z]' requirements/cpu.lock) packages)"
