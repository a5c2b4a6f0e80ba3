#!/usr/bin/env bash
# Installs HALOs into .venv and runs the embedded default: SFT of the tiny Llama on the bundled HH sample, on CPU.
# The run directory is .cache/tiny_sft (config.yaml, LATEST/policy.pt, tokenizer); wandb logs offline there too.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/python train.py loss=sft model=tiny datasets=[hh] exp_name=tiny_sft mode=train \
    lr=1e-3 warmup_steps=10 eval_every=1000 n_eval_examples=200 "$@"
