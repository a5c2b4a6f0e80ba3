#!/usr/bin/env bash
# Creates .venv in the repo and installs the pinned stack: requirements.txt, which is the runtime packages plus what
# the test suite needs (pytest, matplotlib for compare.py --plot and its test, peft for LoRA and its tests;
# pyproject.toml names the same pins as its dev, plot and peft extras). torch is installed first, pinned, so that no
# other package can pull in a multi-GB CUDA build on a CPU machine. GPU users: see environment.yml instead.
# Where the default torch wheel is a CUDA build, point TORCH_INDEX_URL at PyTorch's CPU wheel index.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
.venv/bin/python -m pip install -q torch==2.13.0 -r requirements.txt
echo "installed into .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)')):" \
     "run .venv/bin/python, or 'source .venv/bin/activate' first to run plain python"
