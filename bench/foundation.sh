#!/usr/bin/env bash
# Reruns every figure of the foundation issue (docs/benchmarks.md, "Foundation"): decode/prefill speed and memory of
# the default parent under transformers' Llama vs our model on identical weights, and training-step speed.
# Run it alone: a second torch process on a 2-core machine slows both 3-300x.
#   bash bench/foundation.sh [OUT_DIR]      (default runs/bench-foundation; ~15 min on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
OUT=${1:-runs/bench-foundation}
mkdir -p "$OUT"
"$BIN/open-nemotron" convert smollm2-135m --out "$OUT/converted"
# Parent (transformers' LlamaForCausalLM) first: every ratio is ours / parent, measured in the same process.
"$BIN/open-nemotron" bench-speed smollm2-135m "$OUT/converted" --batch-sizes 1,16 --prompt-len 128 --gen-len 128 \
    --repeats 3 --json "$OUT/bench-speed.json"
"$BIN/open-nemotron" bench-train transformers:smollm2-135m ours:smollm2-135m --batch 4 --seq 256 --steps 3 \
    --repeats 3 --json "$OUT/bench-train.json"
