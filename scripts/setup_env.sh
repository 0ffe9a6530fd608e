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
# DeepSpeed runs on CPU (gloo) too; the tests train ZeRO-2/3 with it. Its sdist imports torch to build, so it is
# built against the torch above (no build isolation, which would fetch another torch). If it cannot build here, its
# tests skip with a reason and the rest of vidgen is unaffected.
if ! "$VENV/bin/python" -c "import deepspeed" >/dev/null 2>&1; then
  "$VENV/bin/python" -m pip install -q "setuptools>=68" wheel \
    && "$VENV/bin/python" -m pip install -q --no-build-isolation "deepspeed==0.19.8" \
    || echo "[setup] deepspeed did not install: its tests (tests/test_safe_sharded.py) will skip"
fi
"$VENV/bin/python" -c "import torch, vidgen; print(f'[setup] torch {torch.__version__}, cuda={torch.cuda.is_available()}')"
