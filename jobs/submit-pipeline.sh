#!/bin/bash
# Submits gradmap's stages as a chain of Slurm jobs with dependencies, so each stage runs on the
# partition that suits it: extract on a GPU partition, encode (the CPU-heavy stage) on CPU nodes,
# stats + report on one small node. Every stage writes its output under a temporary name and
# renames it when complete, and extract and encode resume (completed blocks, rounds), so a job killed at its
# time limit can simply be resubmitted (or use --requeue).
#
#   STIMULI=sub01/stimuli.h5 BRAIN="sub01/brain_fmri.h5" MODEL=torchscript:dinov2.pt \
#   OUT=runs/sub01-dinov2 jobs/submit-pipeline.sh
#
# Environment: STIMULI (stimuli.h5), BRAIN (space-separated brain files: fMRI and/or MEG),
# MODEL (default builtin:tinyvit), OBJECTIVE (default cross-entropy), LABELS (cross-entropy
# targets: stimuli, or self for datasets without labels), POOLING (default mean),
# PCA (components, default 0 = none; fitted on the training images of the first brain file),
# PERMUTATIONS (default 10000), JOINT (default 1: encode --joint; empty: off), OUT, GRADMAP (binary),
# DEVICE (extract's --device, default cuda), PARTITION_GPU / PARTITION_CPU (partition names), ACCOUNT (optional), AFTER (a job id that
# extract waits for, e.g. an import job: jobs/nsd-subject.sh, jobs/things-meg-subject.sh).
set -euo pipefail
: "${STIMULI:?set STIMULI}" "${BRAIN:?set BRAIN}" "${OUT:?set OUT}"
export GRADMAP=${GRADMAP:-gradmap} MODEL=${MODEL:-builtin:tinyvit} OBJECTIVE=${OBJECTIVE:-cross-entropy}
export POOLING=${POOLING:-mean} PCA=${PCA:-0} PERMUTATIONS=${PERMUTATIONS:-10000} STIMULI OUT BRAIN
export JOINT=${JOINT-1}
export LABELS=${LABELS:-stimuli}
here=$(cd "$(dirname "$0")" && pwd)
acct=(); [ -n "${ACCOUNT:-}" ] && acct=(--account "$ACCOUNT")
mkdir -p "$OUT/logs"
ext=$(sbatch --parsable "${acct[@]}" ${PARTITION_GPU:+--partition "$PARTITION_GPU"} \
      ${AFTER:+--dependency "afterok:$AFTER"} \
      --output "$OUT/logs/extract-%j.log" "$here/extract-gpu.slurm")
deps=()
scores=()
for b in $BRAIN; do
  mod=$(basename "$b" .h5); mod=${mod#brain_}
  id=$(sbatch --parsable "${acct[@]}" ${PARTITION_CPU:+--partition "$PARTITION_CPU"} \
       --dependency "afterok:$ext" --export "ALL,BRAIN_FILE=$b,MODALITY=$mod" \
       --output "$OUT/logs/encode-$mod-%j.log" "$here/encode-cpu.slurm")
  deps+=("$id"); scores+=("$OUT/scores_$mod.h5")
done
dep=$(IFS=:; echo "${deps[*]}")
sbatch "${acct[@]}" ${PARTITION_CPU:+--partition "$PARTITION_CPU"} --dependency "afterok:$dep" \
       --export "ALL,SCORES=${scores[*]}" --output "$OUT/logs/stats-%j.log" "$here/stats-report.slurm"
echo "submitted: extract $ext, encode ${deps[*]}, then stats + report"
