#!/usr/bin/env bash
# VQAv2 evaluation (official accuracy, per answer type), split across GPUs by torchrun.
#
#   scripts/eval_vqa.sh MODEL_DIR QUESTIONS ANNOTATIONS IMAGE_ROOT [more `easygen eval vqa` flags]
#
# QUESTIONS / ANNOTATIONS: VQAv2 v2_OpenEnded_mscoco_val2014_questions.json and
# v2_mscoco_val2014_annotations.json (or any file in that format). IMAGE_ROOT: the folder holding
# the COCO images (or their val2014/ folder). Environment: OUT (results JSON, default
# results/vqa.json), NPROC (processes, default: one per visible GPU, else 1), BIDIFFUSER,
# TORCHRUN (launcher command, default torchrun). Rerunning resumes from the predictions file.
set -euo pipefail
if [ $# -lt 4 ]; then
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2
  exit 2
fi
MODEL=$1 QUESTIONS=$2 ANNOTATIONS=$3 IMAGE_ROOT=$4
shift 4
OUT=${OUT:-results/vqa.json}
NPROC=${NPROC:-$(python3 -c 'import torch; print(max(torch.cuda.device_count(), 1))' 2>/dev/null || echo 1)}
# shellcheck disable=SC2086  # TORCHRUN may be a command with arguments ("python -m torch.distributed.run")
exec ${TORCHRUN:-torchrun} --standalone --nproc_per_node "$NPROC" -m easygen.cli eval vqa \
  --model-path "$MODEL" --questions "$QUESTIONS" --annotations "$ANNOTATIONS" --image-root "$IMAGE_ROOT" \
  --out "$OUT" ${BIDIFFUSER:+--bidiffuser "$BIDIFFUSER"} "$@"
