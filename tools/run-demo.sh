#!/usr/bin/env bash
# Builds gradmap (if needed) and runs the main job on the built-in simulated data:
#   mpirun -n $RANKS gradmap run --config config/demo.ini --out $OUT
# Usage: tools/run-demo.sh [OUT=demo-out] ; environment: RANKS (default: number of cores).
set -euo pipefail
cd "$(dirname "$0")/.."
build=${GRADMAP_BUILD:-build}
out=${1:-demo-out}
ranks=${RANKS:-$(nproc)}
cmake -B "$build" -S . -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$build" -j"$(nproc)"
flags=(--oversubscribe)
[ "$(id -u)" -eq 0 ] && flags+=(--allow-run-as-root)
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
mpirun -n "$ranks" "${flags[@]}" "$build/src/gradmap" run --config config/demo.ini --out "$out"
echo "gradmap: report in $out/report/index.html; headline numbers in $out/stats/summary.json"
