#!/usr/bin/env bash
# Puzzle NAS acceptance run (issue 3): the demo config (1.5x and 2x decode-throughput targets at batch 16) on the
# default parent, timed end to end. Run alone on the machine (timings).
#   bash bench/puzzle.sh [RUN_DIR]        (default runs/puzzle-demo; delete it for a cold run)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
RUN=${1:-runs/puzzle-demo}
start=$(date +%s)
"$BIN/open-nemotron" puzzle run --config recipes/puzzle-demo.yaml --run-dir "$RUN"
echo "wall clock: $(( $(date +%s) - start )) s  (report: $RUN/report.md)"
