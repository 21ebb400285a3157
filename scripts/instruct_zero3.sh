#!/usr/bin/env bash
# Stage 2 (instruction tuning), full fine-tuning with DeepSpeed ZeRO-3 (scripts/zero3.json).
#
#   scripts/instruct_zero3.sh STAGE1_MODEL DATA_CONFIG OUTPUT_DIR [KEY=VALUE ...]
#
# Needs the deepspeed package (in requirements.txt). See scripts/train_easygen.sh for the
# environment variables; deepspeed_config=scripts/zero2.json selects ZeRO-2 instead.
set -euo pipefail
STRATEGY=deepspeed exec "$(dirname "$0")/train_easygen.sh" instruct "$@" \
  deepspeed_config="${DEEPSPEED_CONFIG:-$(dirname "$0")/zero3.json}"
