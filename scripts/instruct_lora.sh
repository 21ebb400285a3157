#!/usr/bin/env bash
# Stage 2 (instruction tuning) with a LoRA adapter (rank 8, alpha 16 on q/k/v/o; the projector is
# tuned too), sharded with FSDP2. lr 2e-4, the usual LoRA rate.
#
#   scripts/instruct_lora.sh STAGE1_MODEL DATA_CONFIG OUTPUT_DIR [KEY=VALUE ...]
#
# OUTPUT_DIR/final is the merged model; `easygen export OUTPUT_DIR --out DIR --lora-adapter`
# writes the adapter instead. See scripts/train_easygen.sh for the environment variables.
set -euo pipefail
STRATEGY=${STRATEGY:-fsdp} LR=${LR:-2e-4} exec "$(dirname "$0")/train_easygen.sh" instruct "$@" lora=true
