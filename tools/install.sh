#!/usr/bin/env bash
# Install megagpt and every dependency, at the versions of requirements/cpu.lock, into the project's virtual
# environment: the active one if a virtual environment is active, else .venv (made here if absent). Never into the
# system interpreter. Later commands use it through `source tools/venv.sh`.
#
# The lock is installed with --no-deps: pip installs exactly the locked set and resolves nothing, so two machines
# a month apart get the same versions. torch comes from the CPU wheel these machines carry (pip's find-links); on
# another machine point PIP_FIND_LINKS or PIP_EXTRA_INDEX_URL at the PyTorch CPU wheels. Regenerate the lock with
# `bash tools/lock.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/venv.sh --create
stamp="$VIRTUAL_ENV/.megagpt-lock.sha256"
lock_sum="$(sha256sum requirements/cpu.lock setup.py pyproject.toml csrc/*.cpp | sha256sum | cut -d' ' -f1)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$lock_sum@$PWD" ]] && python -c "import megagpt.data._helpers" 2>/dev/null; then
  exit 0   # this checkout is already installed from this lock into this environment
fi
megagpt_pip install --no-deps -r requirements/cpu.lock
# No build isolation: the build uses the locked setuptools and pybind11 rather than whatever is newest today.
megagpt_pip install --no-deps --no-build-isolation -e .
python -m pip check
echo "$lock_sum@$PWD" > "$stamp"
