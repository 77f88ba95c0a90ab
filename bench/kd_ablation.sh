#!/usr/bin/env bash
# KD loss ablation (issue 14; the paper's Table on LM loss, digest §1.7): the same child, budget and data, distilled
# with cosine + KL (the paper's choice) and with cosine + KL + LM, then both children's reporting-set KL / top-1.
#   bash bench/kd_ablation.sh PARENT CHILD CALIBRATION_DIR OUT_DIR [TRAIN_TOKENS] [LR]
# Run it alone on the machine: the two trainings run one after the other.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
PARENT=$1 CHILD=$2 CALIBRATION=$3 OUT=$4
TOKENS=${5:-60000}
LR=${6:-3e-4}
common=(--teacher "$PARENT" --student "$CHILD" --data "$CALIBRATION" --train-tokens "$TOKENS" --lr "$LR"
    --report-every 20 --save-steps 50)
"$BIN/open-nemotron" distill "${common[@]}" --out "$OUT/cos-kl"
"$BIN/open-nemotron" distill "${common[@]}" --lm-weight 1 --out "$OUT/cos-kl-lm"
"$BIN/python" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
lines = ["| loss | steps | tokens | KL before | KL after | top-1 before | top-1 after | train s |",
         "|---|---:|---:|---:|---:|---:|---:|---:|"]
for name in ("cos-kl", "cos-kl-lm"):
    r = json.loads((out / name / "distill.json").read_text())
    b, a = r["before"], r["after"]
    lines.append(f"| {' + '.join(r['weights'])} | {r['steps']} | {r['train_tokens']} | {b['kl']:.4f} | {a['kl']:.4f} | "
                 f"{b['top1']:.4f} | {a['top1']:.4f} | {r['train_seconds']:.0f} |")
text = "\n".join(lines) + "\n"
(out / "kd-ablation.md").write_text(text)
print(text)
PY
