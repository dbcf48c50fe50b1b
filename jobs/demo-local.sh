#!/bin/bash
# The README's main job on a workstation or laptop (no Slurm): simulate -> extract -> encode ->
# stats -> report on the built-in simulated data, ~10 s on 2 cores. Rerunning skips the stages
# that are up to date; a killed run continues where it stopped.
#   jobs/demo-local.sh [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
exec tools/run-demo.sh "${1:-demo-out}"
