#!/usr/bin/env bash
# The README's first command, verbatim (with --quick), as a newcomer runs it: at the root of a fresh clone
# of this repository's committed HEAD, in a fresh virtual environment.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
cmd=$(sed -n '/^# set up and run the main job/{n;p;q}' README.md)
[ -n "$cmd" ] || { echo "README.md: no command under '# set up and run the main job'" >&2; exit 1; }
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
git clone -q "$PWD" "$scratch/tltorch"
$PY -m venv "$scratch/venv"
echo "== in a fresh clone and venv: $cmd --quick =="
(cd "$scratch/tltorch" && source "$scratch/venv/bin/activate" && unset PYTHONPATH TLTORCH_CUDA &&
   HF_HUB_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1 bash -c "$cmd --quick")
