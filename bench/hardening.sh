#!/usr/bin/env bash
# Reruns the figures of the hardening issue (docs/benchmarks.md, "Hardening"): bench-speed of the default parent
# under transformers' Llama vs our model on identical weights (batch 1 and 16, peak memory), and, when
# llama-cpp-python is installed, batch-1 decode against llama.cpp on the same fp32 weights.
# Run it alone: a second torch process on a 2-core machine slows both 3-300x.
#   bash bench/hardening.sh [OUT_DIR]      (default runs/bench-hardening; ~6 min on 2 CPU cores)
# For the llama.cpp part: pip install llama-cpp-python (builds llama.cpp, ~11 min), or install it with --target DIR
# and run with PYTHONPATH=DIR; the F32 GGUF is made here with llama.cpp's own converter (LLAMA_CPP_SRC: a llama.cpp
# source tree, e.g. the llama-cpp-python sdist's vendor/llama.cpp, with convert_hf_to_gguf.py and gguf-py).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
OUT=${1:-runs/bench-hardening}
mkdir -p "$OUT"
"$BIN/open-nemotron" convert smollm2-135m --out "$OUT/converted"
"$BIN/open-nemotron" bench-speed smollm2-135m "$OUT/converted" --batch-sizes 1,16 --prompt-len 128 --gen-len 128 \
    --repeats 3 --json "$OUT/bench-speed.json"
if ! "$BIN/python" -c "import llama_cpp" 2>/dev/null; then
    echo "llama_cpp not importable: skipping the llama.cpp comparison (see the comment at the top)" >&2
    exit 0
fi
GGUF="$OUT/smollm2-135m-f32.gguf"
if [ ! -f "$GGUF" ]; then
    : "${LLAMA_CPP_SRC:?set LLAMA_CPP_SRC to a llama.cpp source tree (convert_hf_to_gguf.py) to make the F32 GGUF}"
    PARENT=$("$BIN/python" -c "from open_nemotron.model.loading import resolve_model_dir; print(resolve_model_dir('smollm2-135m'))")
    PYTHONPATH="$LLAMA_CPP_SRC/gguf-py:${PYTHONPATH:-}" "$BIN/python" "$LLAMA_CPP_SRC/convert_hf_to_gguf.py" "$PARENT" \
        --outtype f32 --outfile "$GGUF"
fi
"$BIN/python" bench/llama_cpp_decode.py "$GGUF" "$OUT/converted" --prompt-len 128 --gen-len 128 --repeats 5 \
    --json "$OUT/llama-cpp.json"
