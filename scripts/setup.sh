#!/usr/bin/env bash
# Create .venv (Python >= 3.11) and install segstudio with the given extras,
# pinned by requirements/constraints.txt. Re-runs are quick: nothing is
# reinstalled unless pyproject.toml, the constraints or the extras changed.
#   usage: bash scripts/setup.sh [EXTRAS]      (default: onnx,openvino,torch,gui,cluster)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-onnx,openvino,torch,gui,cluster}"

py="${PYTHON:-}"
if [ -z "$py" ]; then
  # 3.11 first: requirements/constraints.txt was frozen and tested on it
  for candidate in python3.11 python3 python3.12 python3.13; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      py="$candidate"; break
    fi
  done
fi
if [ -z "$py" ]; then
  echo "segstudio needs Python 3.11 or newer; none was found (set PYTHON=/path/to/python3.11)" >&2
  exit 1
fi

if [ ! -x .venv/bin/python ]; then
  echo "creating .venv with $($py --version)"
  "$py" -m venv .venv
fi
stamp=".venv/.segstudio-installed"
hash="$(cat pyproject.toml requirements/constraints.txt | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(head -n1 "$stamp")" = "$hash" ]; then
  have=",$(sed -n 2p "$stamp"),"
  missing=""
  for e in ${extras//,/ }; do
    case "$have" in *",$e,"*) ;; *) missing="$missing $e" ;; esac
  done
  [ -z "$missing" ] && exit 0
  extras="$(sed -n 2p "$stamp"),$extras"
fi
echo "installing segstudio[$extras] into .venv (first time: a few minutes)"
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -c requirements/constraints.txt -e ".[$extras]"
printf '%s\n%s\n' "$hash" "$extras" > "$stamp"
