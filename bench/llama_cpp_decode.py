"""Batch-1 prefill and decode: llama.cpp (through llama-cpp-python) vs our model on the same fp32 weights, in one
process, interleaved and repeated, with a check that both produce the same greedy tokens.

llama.cpp is what a CPU user would run instead, so this is the yardstick for our batch-1 decode. It is optional and
never part of `make test`: llama-cpp-python builds llama.cpp from source (~11 min on 2 cores).

    .venv/bin/pip install llama-cpp-python==0.3.36            # or --target DIR and PYTHONPATH=DIR
    # An F32 GGUF made by llama.cpp's own converter from the parent's HF checkpoint (the sdist ships it):
    python vendor/llama.cpp/convert_hf_to_gguf.py PARENT_HF_DIR --outtype f32 --outfile parent-f32.gguf
    .venv/bin/python bench/llama_cpp_decode.py parent-f32.gguf CONVERTED_DIR --json runs/llama-cpp/result.json

PARENT_HF_DIR for the default parent: `python -c "from open_nemotron.model.loading import resolve_model_dir;
print(resolve_model_dir('smollm2-135m'))"`. CONVERTED_DIR: `open-nemotron convert smollm2-135m --out DIR`.
Run it alone on the machine (a second heavy process skews both sides).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
import torch

from open_nemotron.evaluate.hardware import describe_device
from open_nemotron.evaluate.throughput import random_prompt
from open_nemotron.model.generation import decode
from open_nemotron.model.loading import load_model
from open_nemotron.progress import StageProgress
from open_nemotron.utils import write_result


def llama_cpp_greedy(llm, prompt: list[int], new_tokens: int) -> tuple[float, float, list[int]]:
    """(prefill seconds, decode seconds for new_tokens - 1 steps, tokens): evaluate the prompt, then one token
    per step, each the argmax of the last logits (what greedy decoding is)."""
    vocab = llm.n_vocab()

    def last_argmax() -> int:  # llama.cpp keeps only the last position's logits (no logits_all)
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))))

    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    token = last_argmax()
    prefill = time.perf_counter() - start
    tokens = [token]
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        llm.eval([token])
        token = last_argmax()
        tokens.append(token)
    return prefill, time.perf_counter() - start, tokens


def ours_greedy(model, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float, list[int]]:
    """The same measurement as bench-speed's: one generate for 1 token (prefill), one for all; decode = the rest."""
    start = time.perf_counter()
    decode(model, prompt, max_new_tokens=1)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    out = decode(model, prompt, max_new_tokens=new_tokens)
    total = time.perf_counter() - start
    return prefill, total - prefill, out[0, prompt.shape[1] :].tolist()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gguf", help="F32 GGUF of the parent, made by llama.cpp's convert_hf_to_gguf.py")
    parser.add_argument("model", help="the same parent in our format (open-nemotron convert)")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--gen-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", required=True, help="result JSON; a Markdown report is written beside it")
    args = parser.parse_args(argv)
    try:
        from llama_cpp import Llama
    except ImportError:
        print("error: llama_cpp is not installed: pip install llama-cpp-python (builds from source)", file=sys.stderr)
        return 2

    torch.set_num_threads(args.threads)
    model = load_model(args.model, device="cpu", decode_layout="gemv")
    llm = Llama(
        model_path=args.gguf,
        n_ctx=args.prompt_len + args.gen_len + 8,
        n_batch=args.prompt_len,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        verbose=False,
    )
    prompt = random_prompt(1, args.prompt_len, model.config.vocab_size, 0, torch.device("cpu"))
    samples: dict[str, dict[str, list[float]]] = {
        name: {"prefill_s": [], "decode_s": []} for name in ("llama.cpp", "ours")
    }
    tokens: dict[str, list[int]] = {}
    with StageProgress("llama.cpp vs ours", 2 * (args.repeats + 1)) as bar:
        for name, run in (
            ("llama.cpp", lambda n: llama_cpp_greedy(llm, prompt[0].tolist(), n)),
            ("ours", lambda n: ours_greedy(model, prompt, n)),
        ):
            run(4)  # warm-up
            bar.advance(f"warm-up {name}")
        for repeat in range(args.repeats):
            for name, run in (
                ("llama.cpp", lambda n: llama_cpp_greedy(llm, prompt[0].tolist(), n)),
                ("ours", lambda n: ours_greedy(model, prompt, n)),
            ):
                prefill, decode_s, toks = run(args.gen_len)
                samples[name]["prefill_s"].append(prefill)
                samples[name]["decode_s"].append(decode_s)
                tokens[name] = toks
                bar.advance(f"repeat {repeat + 1}, {name}: {1e3 * decode_s / (args.gen_len - 1):.1f} ms/token")
    engines = {}
    for name, s in samples.items():
        decode_ms = 1e3 * statistics.median(s["decode_s"]) / (args.gen_len - 1)
        prefill_s = statistics.median(s["prefill_s"])
        engines[name] = {
            "decode_ms_per_token": decode_ms,
            "prefill_tokens_per_s": args.prompt_len / prefill_s,
            "decode_s_samples": s["decode_s"],
            "prefill_s_samples": s["prefill_s"],
        }
    same = sum(a == b for a, b in zip(tokens["llama.cpp"], tokens["ours"], strict=True))
    ratio = engines["ours"]["decode_ms_per_token"] / engines["llama.cpp"]["decode_ms_per_token"]
    result = {
        "benchmark": "llama.cpp vs ours, batch 1",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "config": vars(args),
        "hardware": describe_device(torch.device("cpu")),
        "engines": engines,
        "ours_over_llama_cpp_decode": ratio,
        "greedy_tokens_identical": same,
        "greedy_tokens": args.gen_len,
    }
    lines = [
        f"# llama.cpp vs ours (batch 1) — {result['date']}",
        "",
        f"Same fp32 weights; prompt {args.prompt_len} random tokens, {args.gen_len} greedy tokens, {args.repeats} "
        f"repeats interleaved in one process, medians; {args.threads} threads each.",
        "",
        "| engine | decode ms/token | prefill tok/s |",
        "|---|---:|---:|",
        *(
            f"| {name} | {e['decode_ms_per_token']:.1f} | {e['prefill_tokens_per_s']:.0f} |"
            for name, e in engines.items()
        ),
        "",
        f"Ours / llama.cpp decode time: **{ratio:.2f}x**. Greedy tokens identical: {same} of {args.gen_len}.",
        "",
    ]
    write_result(args.json, result, "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
