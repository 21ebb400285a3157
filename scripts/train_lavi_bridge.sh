#!/usr/bin/env bash
# Train LaVi-Bridge (its TextAdapter and LoRAs) on its own bases with the recipe of its train/*.py,
# across GPUs by torchrun, and write its released layout (adapter/, lora_vis.pt, lora_text.pt) plus
# the same weights as named safetensors. See docs/lavi-bridge-training.md.
#
#   scripts/train_lavi_bridge.sh COMBO CAPTIONS_TSV OUT_DIR DIFFUSION_DIR TEXT_MODEL_DIR [more flags]
#
# COMBO: llama2_unet, t5_unet or t5_transformer. CAPTIONS_TSV: image_path<TAB>caption per line.
# DIFFUSION_DIR: stable-diffusion-v1-4 (U-Net combos) or PixArt-XL-2-512x512, diffusers layout.
# TEXT_MODEL_DIR: Llama-2-7b-hf or t5-large, transformers layout. Rerunning the same command resumes
# from the last complete checkpoint in OUT_DIR/checkpoints (a larger STEPS continues the run).
# Environment: NPROC (processes, default: one per visible GPU, else 1), IMAGE_ROOT, BATCH_SIZE (per
# process, 1 as the scripts), RESOLUTION (512), STEPS or EPOCHS, SAVE_EVERY (500),
# TORCHRUN (launcher command, default torchrun).
set -euo pipefail
if [ $# -lt 5 ]; then
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2
  exit 2
fi
COMBO=$1 DATA=$2 OUT=$3 DIFFUSION=$4 TEXT_MODEL=$5
shift 5
NPROC=${NPROC:-$(python3 -c 'import torch; print(max(torch.cuda.device_count(), 1))' 2>/dev/null || echo 1)}
# shellcheck disable=SC2086  # TORCHRUN may be a command with arguments ("python -m torch.distributed.run")
exec ${TORCHRUN:-torchrun} --standalone --nproc_per_node "$NPROC" -m easygen.cli train-lavi-bridge \
  --combo "$COMBO" --data "$DATA" --out "$OUT" --diffusion "$DIFFUSION" --text-model "$TEXT_MODEL" \
  ${IMAGE_ROOT:+--image-root "$IMAGE_ROOT"} --batch-size "${BATCH_SIZE:-1}" --resolution "${RESOLUTION:-512}" \
  --save-every "${SAVE_EVERY:-500}" ${EPOCHS:+--epochs "$EPOCHS"} ${STEPS:+--steps "$STEPS"} "$@"
