#!/usr/bin/env bash
# Creates the project virtualenv (once) and installs vidgen with its dev extras.
# CPU machine: the CPU build of torch 2.13.0 (never the CUDA wheels).
# GPU machine (nvidia-smi works and the system python already has CUDA torch): reuse that torch.
set -euo pipefail
VENV=${1:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 \
     && "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "[setup] NVIDIA GPU found: reusing the installed CUDA torch ($("$PY" -c 'import torch; print(torch.__version__)'))"
    "$PY" -m venv --system-site-packages "$VENV"
  else
    echo "[setup] no usable NVIDIA GPU: installing the CPU build of torch 2.13.0"
    "$PY" -m venv "$VENV"
  fi
fi
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  "$VENV/bin/python" -m pip install -q torch==2.13.0
fi
"$VENV/bin/python" -m pip install -q -e ".[dev]"
"$VENV/bin/python" -c "import torch, vidgen; print(f'[setup] torch {torch.__version__}, cuda={torch.cuda.is_available()}')"
