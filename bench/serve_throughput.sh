#!/usr/bin/env bash
# Issue 13's server figures, back to back on one machine (docs/benchmarks.md, "Server load"):
#   1. bench-speed batch-16 decode tokens/s of MODEL (our class) on the load's own shape (prompt = the mean
#      templated prompt length of the load's requests, MAX_TOKENS new tokens), and at 64 + 128 tokens for reference;
#   2. our server under 16 and 32 concurrent streaming clients (greedy, every reply MAX_TOKENS long: ignore_eos, as
#      bench-speed decodes with EOS off), for the ratio to 1. and the load figures;
#   3. side by side on the Llama parent (same weights), replies ending where the model ends them (at most
#      SIDE_TOKENS): our server, then `transformers serve` without and with its continuous batching.
# Run it alone: the load clients and the server share the cores.
#   bash bench/serve_throughput.sh [MODEL] [LLAMA_PARENT] [OUT_DIR]
#   (defaults: runs/demo/converted, smollm2-135m, runs/serve-load; ~12 min on 2 CPU cores)
set -euo pipefail
export HF_HUB_OFFLINE=1  # transformers serve: the model is local
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
MODEL=${1:-runs/demo/converted}
PARENT=${2:-smollm2-135m}
OUT=${3:-runs/serve-load}
SECONDS_EACH=${SECONDS_EACH:-60}
MAX_TOKENS=${MAX_TOKENS:-256}
SIDE_TOKENS=${SIDE_TOKENS:-128}
mkdir -p "$OUT"
[ -f "$MODEL/config.json" ] || "$BIN/open-nemotron" convert "$PARENT" --out "$MODEL"
PROMPT_LEN=$("$BIN/python" bench/serve_load.py "$MODEL" --print-prompt-tokens)
"$BIN/open-nemotron" bench-speed "$MODEL" --batch-sizes 16 --prompt-len "$PROMPT_LEN" --gen-len "$MAX_TOKENS" \
    --repeats 3 --no-memory --json "$OUT/bench-speed-b16.json"
"$BIN/open-nemotron" bench-speed "$MODEL" --batch-sizes 16 --prompt-len 64 --gen-len 128 --repeats 3 --no-memory \
    --json "$OUT/bench-speed-b16-64-128.json"
for clients in 16 32; do
    "$BIN/python" bench/serve_load.py "$MODEL" --clients "$clients" --seconds "$SECONDS_EACH" \
        --max-tokens "$MAX_TOKENS" --ignore-eos --max-batch-size 16 --json "$OUT/ours-c$clients.json"
done
"$BIN/python" bench/serve_load.py "$PARENT" --clients 16 --seconds "$SECONDS_EACH" --max-tokens "$SIDE_TOKENS" \
    --max-batch-size 16 --json "$OUT/side-ours-c16.json"
"$BIN/python" bench/serve_load.py "$PARENT" --server transformers --clients 16 --seconds "$SECONDS_EACH" \
    --max-tokens "$SIDE_TOKENS" --json "$OUT/side-transformers-c16.json" || true
"$BIN/python" bench/serve_load.py "$PARENT" --server transformers --continuous-batching --clients 16 \
    --seconds "$SECONDS_EACH" --max-tokens "$SIDE_TOKENS" --json "$OUT/side-transformers-cb-c16.json" || true
"$BIN/python" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def decode_rate(name):
    result = json.loads((out / name).read_text())
    shape = f"prompt {result['config']['prompt_len']} + {result['config']['gen_len']} tokens"
    return result["models"][0]["batches"]["16"]["decode_tokens_per_s"], shape
decode, shape = decode_rate("bench-speed-b16.json")
reference, reference_shape = decode_rate("bench-speed-b16-64-128.json")
print(f"bench-speed batch-16 decode, the load's shape ({shape}): {decode:.1f} tokens/s")
print(f"bench-speed batch-16 decode, {reference_shape}: {reference:.1f} tokens/s")
for name in ("ours-c16", "ours-c32", "side-ours-c16", "side-transformers-c16", "side-transformers-cb-c16"):
    path = out / f"{name}.json"
    if path.is_file():
        r = json.loads(path.read_text())
        print(f"{name}: {r['requests_per_s']:.2f} req/s, {r['output_tokens_per_s']:.1f} tokens/s "
              f"({r['output_tokens_per_s'] / decode:.2f}x decode), p95 latency {r['latency_s']['p95']}, "
              f"errors {sum(r['errors'].values())}, peak RSS {r['server_peak_rss_mib']}")
PY
