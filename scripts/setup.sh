#!/usr/bin/env bash
# Creates .venv and installs sbertray with its dev tools. torch goes in first, pinned to
# torch==2.13.0 so that pip does not resolve a bare `torch` to whatever build it likes (on this
# project's machines that pin is the CPU wheel). To choose the build yourself, set
# SBERTRAY_TORCH to the requirement and SBERTRAY_TORCH_INDEX to the wheel index that serves it
# (PyTorch publishes one index per CPU/CUDA variant). The last line says which build you got.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH=${SBERTRAY_TORCH:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "$TORCH" ${SBERTRAY_TORCH_INDEX:+--index-url "$SBERTRAY_TORCH_INDEX"}
.venv/bin/python -m pip install --quiet -e ".[dev]"
.venv/bin/python -c "import sbertray, torch, ray, sentence_transformers; print('sbertray ready: torch', torch.__version__, '(CUDA available)' if torch.cuda.is_available() else '(CPU only)', '| ray', ray.__version__, '| sentence-transformers', sentence_transformers.__version__)"
