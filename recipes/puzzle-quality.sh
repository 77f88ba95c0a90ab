#!/usr/bin/env bash
# Puzzle quality profile on the default parent (issue 14): Puzzle with recipes/puzzle-quality.yaml (more calibration
# text, longer BLD, coupled BLD), then global KD of the 1.5x and 2x children against the parent and multiple-choice
# retention of parent / children before and after KD (bench/kd_retention.sh). Every stage resumes after a kill.
#   bash recipes/puzzle-quality.sh [RUN_DIR] [KD_TOKENS]        (defaults runs/puzzle-quality, 98304)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
RUN=${1:-runs/puzzle-quality}
TOKENS=${2:-98304}
"$BIN/open-nemotron" puzzle run --config recipes/puzzle-quality.yaml --run-dir "$RUN"
bash bench/kd_retention.sh "$RUN" "$RUN/kd" "$TOKENS" 3e-4 200 decode_speedup_1.5 decode_speedup_2
