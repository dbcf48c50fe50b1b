#!/bin/bash
# The full study as Slurm chains: NSD subjects 1-8 and THINGS-MEG participants P1-P4, each
# imported once, then every model of MODELS through extract (GPU) -> encode --joint (CPU) ->
# stats + report, in OUT/<subject>/<model>/. docs/scaling.md gives the time and memory per stage
# from the measured rates, and the partition sizes.
#
#   NSD_ROOT=/data/NSD THINGS_ROOT=/data/ds004212 THINGS_IMAGES=/data/THINGS/images \
#   MODELS="vitb16=torchscript:vit_b_16.pt resnet50=torchscript:resnet50.pt" \
#   OUT=/scratch/gradmap-study jobs/full-study.sh
#
# Environment: MODELS (space-separated NAME=MODEL pairs, MODEL as extract's --model), OUT;
# NSD_ROOT and NSD_SUBJECTS (default "1 2 3 4 5 6 7 8"; empty NSD_ROOT: no NSD);
# THINGS_ROOT (OpenNeuro ds004212) with THINGS_IMAGES and THINGS_PARTICIPANTS (default
# "1 2 3 4"; empty THINGS_ROOT: no THINGS-MEG); plus jobs/submit-pipeline.sh's (OBJECTIVE,
# LABELS (default self), POOLING, PCA (default 1024), PERMUTATIONS, JOINT, partitions, ACCOUNT).
set -euo pipefail
: "${MODELS:?set MODELS (NAME=MODEL pairs)}" "${OUT:?set OUT}"
export GRADMAP=${GRADMAP:-gradmap} PCA=${PCA:-1024} LABELS=${LABELS:-self}
here=$(cd "$(dirname "$0")" && pwd)
acct=(); [ -n "${ACCOUNT:-}" ] && acct=(--account "$ACCOUNT")

# models DATADIR BRAIN IMPORT_JOB: every model's chain on one imported subject
models() {
  local dir=$1 brain=$2 imp=$3 pair
  for pair in $MODELS; do
    AFTER=$imp STIMULI="$dir/data/stimuli.h5" BRAIN="$dir/data/$brain" MODEL="${pair#*=}" \
      OUT="$dir/${pair%%=*}" "$here/submit-pipeline.sh"
  done
}

if [ -n "${NSD_ROOT:-}" ]; then
  for s in ${NSD_SUBJECTS:-1 2 3 4 5 6 7 8}; do
    dir="$OUT/nsd-subj0$s"; mkdir -p "$dir/logs"
    imp=$(OUT=$dir SUBJECT=$s NSD_ROOT=$NSD_ROOT sbatch --parsable "${acct[@]}" \
          ${PARTITION_CPU:+--partition "$PARTITION_CPU"} --output "$dir/logs/import-%j.log" \
          "$here/import-nsd.slurm")
    echo "submitted: import-nsd subject $s: $imp"
    models "$dir" brain_fmri.h5 "$imp"
  done
fi
if [ -n "${THINGS_ROOT:-}" ]; then
  : "${THINGS_IMAGES:?set THINGS_IMAGES (the folder with images_meg/ and images_test_meg/)}"
  for s in ${THINGS_PARTICIPANTS:-1 2 3 4}; do
    dir="$OUT/things-P$s"; mkdir -p "$dir/logs"
    epochs="$THINGS_ROOT/derivatives/preprocessed/preprocessed_P$s-epo.fif"
    imp=$(OUT=$dir EPOCHS=$epochs IMAGES=$THINGS_IMAGES IMAGE_SIZE=${IMAGE_SIZE:-224} \
          sbatch --parsable "${acct[@]}" ${PARTITION_CPU:+--partition "$PARTITION_CPU"} \
          --output "$dir/logs/import-%j.log" "$here/import-things-meg.slurm")
    echo "submitted: import-things-meg P$s: $imp"
    models "$dir" brain_meg.h5 "$imp"
  done
fi
