#!/usr/bin/env bash
# COCO Karpathy captioning evaluation (BLEU, METEOR, ROUGE-L, CIDEr), split across GPUs by torchrun.
#
#   scripts/eval_caption.sh MODEL_DIR ANNOTATIONS IMAGE_ROOT [more `easygen eval caption` flags]
#
# ANNOTATIONS: Karpathy dataset_coco.json, or LAVIS coco_karpathy_test.json (add --gt
# coco_karpathy_test_gt.json). IMAGE_ROOT: the folder holding val2014/ (your COCO images).
# Environment: OUT (results JSON, default results/caption_karpathy.json), NPROC (processes,
# default: one per visible GPU, else 1), BIDIFFUSER (BiDiffuser dir, default MODEL_DIR/bidiffuser),
# TORCHRUN (launcher command, default torchrun). Rerunning resumes from the predictions file.
set -euo pipefail
if [ $# -lt 3 ]; then
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2
  exit 2
fi
MODEL=$1 ANNOTATIONS=$2 IMAGE_ROOT=$3
shift 3
OUT=${OUT:-results/caption_karpathy.json}
NPROC=${NPROC:-$(python3 -c 'import torch; print(max(torch.cuda.device_count(), 1))' 2>/dev/null || echo 1)}
# shellcheck disable=SC2086  # TORCHRUN may be a command with arguments ("python -m torch.distributed.run")
exec ${TORCHRUN:-torchrun} --standalone --nproc_per_node "$NPROC" -m easygen.cli eval caption \
  --model-path "$MODEL" --karpathy "$ANNOTATIONS" --image-root "$IMAGE_ROOT" --out "$OUT" \
  ${BIDIFFUSER:+--bidiffuser "$BIDIFFUSER"} "$@"
