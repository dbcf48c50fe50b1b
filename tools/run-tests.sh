#!/usr/bin/env bash
# Configures, builds (Release) and runs the whole test suite with CTest.
# Usage: tools/run-tests.sh [extra ctest args]     (build directory: $GRADMAP_BUILD or build/)
set -euo pipefail
cd "$(dirname "$0")/.."
build=${GRADMAP_BUILD:-build}
jobs=$(nproc)
cmake -B "$build" -S . -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$build" -j"$jobs"
cd "$build"
ctest -j"$jobs" --output-on-failure "$@"
