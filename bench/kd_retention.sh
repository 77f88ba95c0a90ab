#!/usr/bin/env bash
# Issue 14's KD figures on a finished Puzzle run: distil each listed child against the parent on the run's own
# calibration windows (same reporting set as Puzzle's report), then multiple-choice retention (eval-mc: ARC-Easy,
# PIQA, HellaSwag from `make mc-tasks`) of the parent, every child before KD and after KD, in one table.
#   bash bench/kd_retention.sh PUZZLE_RUN OUT_DIR [TRAIN_TOKENS] [LR] [MC_LIMIT] [CHILD_NAME ...]
#   (defaults: 49152 tokens, LR 3e-4, 300 items per task, children decode_speedup_1.5 decode_speedup_2)
# Run it alone on the machine (training and eval share the cores).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
RUN=$1 OUT=$2
TOKENS=${3:-49152}
LR=${4:-3e-4}
LIMIT=${5:-300}
shift $(( $# < 5 ? $# : 5 ))
CHILDREN=("$@")
[ ${#CHILDREN[@]} -gt 0 ] || CHILDREN=(decode_speedup_1.5 decode_speedup_2)
PARENT=$("$BIN/python" -c "import json,sys; print(json.load(open(sys.argv[1]))['parent'])" "$RUN/config.json")
MC=${MC_TASKS:-runs/mc-tasks}
[ -f "$MC/arc_easy.jsonl" ] || make mc-tasks
models=("$PARENT")
for child in "${CHILDREN[@]}"; do
    "$BIN/open-nemotron" distill --teacher "$PARENT" --student "$RUN/children/$child" --data "$RUN/calibration" \
        --train-tokens "$TOKENS" --lr "$LR" --report-every 16 --save-steps 32 --out "$OUT/$child"
    models+=("$RUN/children/$child" "$OUT/$child/final")
done
"$BIN/open-nemotron" eval-mc "${models[@]}" --tasks "$MC/arc_easy.jsonl,$MC/piqa.jsonl,$MC/hellaswag.jsonl" \
    --limit "$LIMIT" --json "$OUT/eval-mc.json"
for child in "${CHILDREN[@]}"; do
    "$BIN/python" -c "
import json, sys
r = json.load(open(sys.argv[1])); b, a = r['before'], r['after']
print(f\"{sys.argv[2]}: {r['steps']} steps, {r['train_tokens']} tokens, {r['train_seconds']:.0f} s; reporting KL \"
      f\"{b['kl']:.4f} -> {a['kl']:.4f} ({100 * (1 - a['kl'] / b['kl']):.1f}% lower), top-1 {b['top1']:.4f} -> {a['top1']:.4f}\")
" "$OUT/$child/distill.json" "$child"
done
