#!/usr/bin/env bash
# Stage 1 (alignment): train the projector only, LLM frozen, on caption data.
#
#   scripts/pretrain.sh VICUNA_DIR DATA_CONFIG OUTPUT_DIR [KEY=VALUE ...]
#
# VICUNA_DIR: a plain LLaMA/Vicuna HF directory (a new projector is created; give BIDIFFUSER=dir
# for its input width) or an EasyGen directory. lr 2e-3 (projector only, as in LLaVA's stage 1).
# See scripts/train_easygen.sh for the environment variables. Writes OUTPUT_DIR/final.
set -euo pipefail
LR=${LR:-2e-3} exec "$(dirname "$0")/train_easygen.sh" pretrain "$@"
