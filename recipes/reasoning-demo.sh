#!/usr/bin/env bash
# Reasoning-toggle demo on the default parent (issue 5): built-in-solver data -> SFT -> on/off evaluation of the
# parent and the fine-tuned child on the held-out suite. ~1 h on 2 CPU cores (SFT ~37 min, eval ~14 min); datagen
# and sft resume after a kill, eval starts over.
#   bash recipes/reasoning-demo.sh [RUN_DIR]          (default runs/reasoning-demo)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
RUN=${1:-runs/reasoning-demo}
PARENT=$RUN/parent
[ -f "$PARENT/config.json" ] || "$BIN/open-nemotron" convert smollm2-135m --out "$PARENT"
# 60 easy prompts per task x 6 tasks, a reasoning-on and a reasoning-off answer each, filtered (data_report.md).
"$BIN/open-nemotron" datagen --out "$RUN/data" --n-per-task 60 --difficulties easy
# Two epochs packed to 512 tokens (4 rows per step), peak LR 2e-4 with 10% warm-up then cosine; assistant tokens only.
"$BIN/open-nemotron" sft "$PARENT" --data "$RUN/data/data.jsonl" --out "$RUN/sft" --epochs 2 --lr 2e-4 \
    --batch-size 4 --max-length 512 --packing --save-steps 10
# Paper protocol: reasoning on = 2 samples per prompt at T 0.6 / top-p 0.95 (average pass@1), off = greedy.
# 210 held-out prompts (35 per task), the parent beside the child.
"$BIN/open-nemotron" eval "$PARENT" "$RUN/sft/final" --suite heldout --limit 210 --samples 2 \
    --max-new-tokens-on 320 --max-new-tokens-off 96 --json "$RUN/eval.json"
