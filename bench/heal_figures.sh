#!/usr/bin/env bash
# Issue 14's figures on a finished Puzzle demo run, back to back (docs/benchmarks.md, "Healing the children"):
#   1. KD of the 1.5x and 2x children: the teacher's own text (seed 1: other samples than Puzzle's calibration),
#      the demo budget (160 steps of 4 x 128 tokens), reporting-set KL / top-1 before and after;
#   2. FFN Fusion of the 1.5x child's attention-free run: block dependency (analyze), then bench/fusion_ablation.py:
#      child vs fused vs FFNs removed vs fused + KD, speed in one bench-speed run, KL on the same reporting set;
#   3. the KD loss ablation (cos + KL vs cos + KL + LM, same budget; bench/kd_ablation.sh);
#   4. eval-mc retention (ARC-Easy, PIQA, HellaSwag; `make mc-tasks`) of the parent and both children before and
#      after KD.
#   bash bench/heal_figures.sh PUZZLE_RUN OUT_DIR [CHILD_1.5] [CHILD_2] [MC_LIMIT]
# Run it alone on the machine (~80 min on 2 CPU cores).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
RUN=$1 OUT=$2
C15=${3:-decode_speedup_1.5_attnfree3}
C2=${4:-decode_speedup_2}
LIMIT=${5:-250}
PARENT=$("$BIN/python" -c "import json,sys; print(json.load(open(sys.argv[1]))['parent'])" "$RUN/config.json")
MC=${MC_TASKS:-runs/mc-tasks}
KD=(--train-tokens 81920 --lr 3e-4 --report-every 16 --save-steps 40)
DATA="$OUT/kd-1.5/calibration"  # built by the first distill run, read as it is by the others (same splits)

"$BIN/open-nemotron" distill --teacher "$PARENT" --student "$RUN/children/$C15" --data parent --seed 1 \
    --generate-prompts 240 --train-sequences 384 --reporting-sequences 16 "${KD[@]}" --out "$OUT/kd-1.5"
"$BIN/open-nemotron" distill --teacher "$PARENT" --student "$RUN/children/$C2" --data "$DATA" "${KD[@]}" \
    --out "$OUT/kd-2"
"$BIN/open-nemotron" fusion analyze "$RUN/children/$C15" --data "$DATA" --out "$OUT/dependency-1.5"
"$BIN/open-nemotron" fusion fuse "$RUN/children/$C15" --out "$OUT/fusion/fused"
"$BIN/open-nemotron" distill --teacher "$PARENT" --student "$OUT/fusion/fused" --data "$DATA" "${KD[@]}" \
    --out "$OUT/kd-fused"
"$BIN/python" bench/fusion_ablation.py "$PARENT" "$RUN/children/$C15" --calibration "$DATA" --out "$OUT/fusion" \
    --distilled "$OUT/kd-fused/final"
bash bench/kd_ablation.sh "$PARENT" "$RUN/children/$C15" "$DATA" "$OUT/kd-ablation" 49152 3e-4
[ -f "$MC/arc_easy.jsonl" ] || make mc-tasks
"$BIN/open-nemotron" eval-mc "$PARENT" "$RUN/children/$C15" "$OUT/kd-1.5/final" "$RUN/children/$C2" "$OUT/kd-2/final" \
    --tasks "$MC/arc_easy.jsonl,$MC/piqa.jsonl,$MC/hellaswag.jsonl" --limit "$LIMIT" --json "$OUT/eval-mc.json"
