#!/usr/bin/env bash
# Creates .venv and installs sbertray with its dev tools. torch is installed first and pinned
# to the CPU build (a bare `torch` requirement would pull a multi-GB CUDA build); on a GPU
# machine set SBERTRAY_TORCH to the torch requirement you want, e.g. "torch==2.13.0".
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH=${SBERTRAY_TORCH:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "$TORCH"
.venv/bin/python -m pip install --quiet -e ".[dev]"
.venv/bin/python -c "import sbertray, torch, ray, sentence_transformers; print('sbertray ready: torch', torch.__version__, '| ray', ray.__version__, '| sentence-transformers', sentence_transformers.__version__)"
