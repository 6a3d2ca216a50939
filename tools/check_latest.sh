#!/usr/bin/env bash
# Upstream canary: install the NEWEST versions that setup.py allows (not the lock) into a throwaway virtual
# environment and run the fast tests. This is how we learn of an upstream break (a new transformers, a new
# deepspeed) before users do. torch stays at the locked version: a torch upgrade is a deliberate, multi-GB step.
# Usage: bash tools/check_latest.sh [extra pytest args]; the environment is removed at the end
# (KEEP_CANARY_VENV=1 keeps it). Prints the versions it got and, for the key packages, the locked ones beside them.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="$(mktemp -d "${TMPDIR:-/tmp}/megagpt-canary.XXXXXX")"
[[ "${KEEP_CANARY_VENV:-0}" == 1 ]] || trap 'rm -rf "$venv"' EXIT
py="$(command -v python3.11 || command -v python3)"
"$py" -m venv "$venv"
# shellcheck disable=SC1091
VIRTUAL_ENV="$venv" source tools/venv.sh
torch_pin="$(grep -E '^torch==' requirements/cpu.lock)"
echo "$torch_pin" > "$venv/torch-pin.txt"
megagpt_pip install "$torch_pin"
# No lock: the resolver picks the newest release of everything setup.py allows; torch alone is held at the lock's
# version (deepspeed and bitsandbytes depend on torch, and an eager upgrade would otherwise move it too).
megagpt_pip install -c "$venv/torch-pin.txt" --upgrade --upgrade-strategy eager \
  "setuptools" "pybind11" ".[train,hf,eval,dev]"
echo "== versions (canary vs lock)"
for pkg in torch deepspeed bitsandbytes triton transformers kernels numpy huggingface-hub tokenizers lm-eval; do
  got="$(python -m pip show "$pkg" 2>/dev/null | awk '/^Version:/{print $2}')"
  locked="$(grep -iE "^${pkg}==" requirements/cpu.lock | cut -d= -f3)"
  printf '%-16s %-14s lock %s\n' "$pkg" "${got:-absent}" "${locked:-absent}"
done
echo "== fast tests in the canary environment"
python -m pytest -q -p no:cacheprovider -m "not slow" tests "$@"
