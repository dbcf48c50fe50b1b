#!/bin/bash
# A THINGS-MEG participant as a chain of Slurm jobs: import -> extract (GPU) -> encode (CPU;
# 271 sensors x 281 times = 76k targets) -> stats + report.
#
#   EPOCHS=/data/ds004212/derivatives/preprocessed/preprocessed_P1-epo.fif \
#   IMAGES=/data/THINGS/images MODEL=torchscript:dinov2_vitb14.pt OUT=runs/things-P1 \
#   jobs/things-meg-subject.sh
#
# Environment: as jobs/submit-pipeline.sh, plus EPOCHS, IMAGES, IMAGE_SIZE (default 224).
set -euo pipefail
: "${EPOCHS:?set EPOCHS}" "${IMAGES:?set IMAGES}" "${OUT:?set OUT}"
export GRADMAP=${GRADMAP:-gradmap} EPOCHS IMAGES OUT IMAGE_SIZE=${IMAGE_SIZE:-224} LABELS=${LABELS:-self}
here=$(cd "$(dirname "$0")" && pwd)
acct=(); [ -n "${ACCOUNT:-}" ] && acct=(--account "$ACCOUNT")
mkdir -p "$OUT/logs"
imp=$(sbatch --parsable "${acct[@]}" ${PARTITION_CPU:+--partition "$PARTITION_CPU"} \
      --output "$OUT/logs/import-%j.log" "$here/import-things-meg.slurm")
echo "submitted: import-things-meg $imp"
AFTER=$imp STIMULI="$OUT/data/stimuli.h5" BRAIN="$OUT/data/brain_meg.h5" "$here/submit-pipeline.sh"
