#!/usr/bin/env bash
# Stage 2 (instruction tuning), full fine-tuning of LLM + projector, sharded with FSDP2.
#
#   scripts/instruct_fsdp.sh STAGE1_MODEL DATA_CONFIG OUTPUT_DIR [KEY=VALUE ...]
#
# STAGE1_MODEL: stage 1's OUTPUT_DIR/final (an EasyGen directory). Add activation_checkpointing=true
# to fit Vicuna-7B in less memory. See scripts/train_easygen.sh for the environment variables.
set -euo pipefail
STRATEGY=fsdp exec "$(dirname "$0")/train_easygen.sh" instruct "$@"
