#!/bin/bash
# A full NSD subject as a chain of Slurm jobs: import (CPU) -> extract (GPU) -> encode (CPU) ->
# stats + report (small CPU job), each waiting for the previous one (afterok).
#
#   NSD_ROOT=/data/NSD SUBJECT=1 MODEL=torchscript:dinov2_vitb14.pt OUT=runs/nsd-subj01 \
#   PCA=1024 PERMUTATIONS=10000 jobs/nsd-subject.sh
#
# Environment: as jobs/submit-pipeline.sh, plus NSD_ROOT, SUBJECT, SESSIONS (default all).
set -euo pipefail
: "${NSD_ROOT:?set NSD_ROOT}" "${SUBJECT:?set SUBJECT}" "${OUT:?set OUT}"
export GRADMAP=${GRADMAP:-gradmap} NSD_ROOT SUBJECT OUT SESSIONS=${SESSIONS:-all} LABELS=${LABELS:-self}
here=$(cd "$(dirname "$0")" && pwd)
acct=(); [ -n "${ACCOUNT:-}" ] && acct=(--account "$ACCOUNT")
mkdir -p "$OUT/logs"
imp=$(sbatch --parsable "${acct[@]}" ${PARTITION_CPU:+--partition "$PARTITION_CPU"} \
      --output "$OUT/logs/import-%j.log" "$here/import-nsd.slurm")
echo "submitted: import-nsd $imp"
AFTER=$imp STIMULI="$OUT/data/stimuli.h5" BRAIN="$OUT/data/brain_fmri.h5" "$here/submit-pipeline.sh"
