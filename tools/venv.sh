# Sourced by the tools/*.sh scripts: puts the project's virtual environment first on PATH.
# An active virtual environment ($VIRTUAL_ENV) is used as it is; otherwise .venv in the repository root.
# `source tools/venv.sh --create` makes .venv if it is absent (tools/install.sh); without it a missing
# environment is an error that says to run tools/install.sh.
_megagpt_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${VIRTUAL_ENV:-}" ]]; then
  if [[ ! -x "$_megagpt_root/.venv/bin/python" ]]; then
    if [[ "${1:-}" != "--create" ]]; then
      echo "no virtual environment: run 'bash tools/install.sh' first (it makes $_megagpt_root/.venv)" >&2
      return 1 2>/dev/null || exit 1
    fi
    _megagpt_py="$(command -v python3.11 || command -v python3 || true)"
    if [[ -z "$_megagpt_py" ]] || ! "$_megagpt_py" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      echo "megagpt's lock (requirements/cpu.lock) is for Python 3.11; no python3.11 found (got: ${_megagpt_py:-none})" >&2
      return 1 2>/dev/null || exit 1
    fi
    "$_megagpt_py" -m venv "$_megagpt_root/.venv"
  fi
  export VIRTUAL_ENV="$_megagpt_root/.venv"
fi
export PATH="$VIRTUAL_ENV/bin:$PATH"
hash -r
unset _megagpt_root _megagpt_py

# `megagpt_pip install ...`: pip in this environment, quietly. These machines' pip configuration names local index
# folders that lack most packages and pip warns once per package about them: those lines only are dropped.
megagpt_pip() {
  local log rc=0
  log="$(mktemp)"
  python -m pip "$1" -q --disable-pip-version-check "${@:2}" >"$log" 2>&1 || rc=$?
  grep -v "is ignored: it is neither a file nor a directory" "$log" || true
  rm -f "$log"
  return "$rc"
}
