#!/usr/bin/env bash
# The GPU check in one call on a bare GPU machine (torch, transformers, accelerate and peft installed, no network):
# installs what bench/gpu_check_requirements.txt lists from the wheels in bench/wheels/ (pip skips what is there
# already), then runs bench/gpu_check.py with this script's arguments. It writes $OUT/gpu_check.md (./ without OUT).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --no-index --find-links bench/wheels -r bench/gpu_check_requirements.txt
exec python bench/gpu_check.py "$@"
