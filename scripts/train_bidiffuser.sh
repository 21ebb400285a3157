#!/usr/bin/env bash
# Fine-tune BiDiffuser's U-ViT with EasyGen's objective (image clean, text noised) on a captions
# TSV, across GPUs by torchrun, and write a new BiDiffuser directory.
#
#   scripts/train_bidiffuser.sh MODEL_DIR CAPTIONS_TSV OUT_DIR [more `bidiffuser train` flags]
#
# MODEL_DIR: a BiDiffuser directory (e.g. from `bidiffuser assemble` over the UniDiffuser-v1 files).
# CAPTIONS_TSV: image_path<TAB>caption per line; relative paths start at IMAGE_ROOT (default: the
# TSV's folder). OUT_DIR gets the new model; its checkpoints/ folder holds the run, and rerunning
# the same command resumes from the last complete checkpoint. Defaults are for the real 952M U-ViT
# on GPUs (FSDP2, bfloat16 autocast, activation checkpointing); later flags override them.
# Environment: NPROC (processes, default: one per visible GPU, else 1), IMAGE_ROOT, STRATEGY (fsdp),
# DTYPE (bfloat16), BATCH_SIZE (per process, 16), GRAD_ACCUM (1), LR (1e-5), EPOCHS or STEPS,
# ACTIVATION_CHECKPOINTING (1), TORCHRUN (launcher command, default torchrun).
set -euo pipefail
if [ $# -lt 3 ]; then
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2
  exit 2
fi
MODEL=$1 DATA=$2 OUT=$3
shift 3
NPROC=${NPROC:-$(python3 -c 'import torch; print(max(torch.cuda.device_count(), 1))' 2>/dev/null || echo 1)}
CKPT=()
if [ "${ACTIVATION_CHECKPOINTING:-1}" = 1 ]; then CKPT=(--activation-checkpointing); fi
# shellcheck disable=SC2086  # TORCHRUN may be a command with arguments ("python -m torch.distributed.run")
exec ${TORCHRUN:-torchrun} --standalone --nproc_per_node "$NPROC" -m bidiffuser.cli train \
  --model "$MODEL" --data "$DATA" --out "$OUT" ${IMAGE_ROOT:+--image-root "$IMAGE_ROOT"} \
  --strategy "${STRATEGY:-fsdp}" --dtype "${DTYPE:-bfloat16}" --batch-size "${BATCH_SIZE:-16}" \
  --grad-accum "${GRAD_ACCUM:-1}" --lr "${LR:-1e-5}" ${EPOCHS:+--epochs "$EPOCHS"} ${STEPS:+--steps "$STEPS"} \
  "${CKPT[@]}" "$@"
