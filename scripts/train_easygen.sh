#!/usr/bin/env bash
# Shared launcher behind scripts/pretrain.sh, instruct_fsdp.sh, instruct_lora.sh, instruct_zero3.sh.
#
#   scripts/train_easygen.sh STAGE MODEL DATA_CONFIG OUTPUT_DIR [KEY=VALUE overrides ...]
#
# Real-size defaults (Vicuna-7B, EasyGen paper): cosine schedule, warmup 0.04, max length 2048,
# global batch = NPROC x MICRO_BATCH x GRAD_ACCUM (8 x 4 x 4 = 128 by default).
# Environment: NPROC (default: one per visible GPU, else 1), MICRO_BATCH (4), GRAD_ACCUM (4),
# LR (2e-5; the stage-1 wrapper sets 2e-3 for the projector), STRATEGY (ddp), FEATURES (feature
# store dir from `easygen features`), BIDIFFUSER (default MODEL/bidiffuser), TORCHRUN (torchrun).
# Anything after OUTPUT_DIR is passed on as a setting override, e.g. lora=true max_steps=1000.
set -euo pipefail
if [ $# -lt 4 ]; then
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2
  exit 2
fi
STAGE=$1 MODEL=$2 DATA=$3 OUT=$4
shift 4
NPROC=${NPROC:-$(python3 -c 'import torch; print(max(torch.cuda.device_count(), 1))' 2>/dev/null || echo 1)}
# shellcheck disable=SC2086  # TORCHRUN may be a command with arguments
exec ${TORCHRUN:-torchrun} --standalone --nproc_per_node "$NPROC" -m easygen.cli train --stage "$STAGE" \
  model="$MODEL" data="$DATA" output_dir="$OUT" strategy="${STRATEGY:-ddp}" \
  micro_batch_size="${MICRO_BATCH:-4}" grad_accum="${GRAD_ACCUM:-4}" lr="${LR:-2e-5}" \
  warmup_ratio=0.04 max_length=2048 save_every=500 keep_last=2 \
  ${FEATURES:+features="$FEATURES"} ${BIDIFFUSER:+bidiffuser="$BIDIFFUSER"} "$@"
