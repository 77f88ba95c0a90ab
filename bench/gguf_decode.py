"""llama.cpp batch-1 decode of our GGUF exports: Puzzle children against their parent at the same dtype, in one
process, interleaved and repeated (issue 16: the goal is >= 1.5x for the 2x child).

Each model is exported with `open-nemotron export --to gguf` at `--dtype`, loaded in llama.cpp (llama-cpp-python),
and timed on the same random prompt: prefill, then one token per step, each the argmax of the last logits. With
`--dtype f32` the greedy tokens are also compared with our model's (they should be equal).

    .venv/bin/pip install llama-cpp-python==0.3.36     # or: make check-gguf
    .venv/bin/python bench/gguf_decode.py runs/demo/converted runs/demo/puzzle/children/decode_speedup_2 \\
        runs/demo/puzzle/children/decode_speedup_1.5_attnfree3 --dtype f16 --out runs/gguf-decode

Writes OUT/<name>.gguf for each model and OUT/result.json + OUT/result.md. Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llama_cpp_decode import llama_cpp_greedy  # noqa: E402

from open_nemotron.evaluate.hardware import describe_device  # noqa: E402
from open_nemotron.evaluate.throughput import random_prompt  # noqa: E402
from open_nemotron.export.gguf import GGUF_DTYPES, export_gguf  # noqa: E402
from open_nemotron.model.generation import decode  # noqa: E402
from open_nemotron.model.loading import load_model  # noqa: E402
from open_nemotron.progress import StageProgress  # noqa: E402
from open_nemotron.utils import write_result  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="the parent first (our format), then the children")
    parser.add_argument("--dtype", default="f16", choices=GGUF_DTYPES)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--gen-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", required=True, help="directory for the GGUFs and result.json / result.md")
    args = parser.parse_args(argv)
    try:
        from llama_cpp import Llama
    except ImportError:
        print("error: llama_cpp is not installed: make check-gguf (builds llama.cpp from source)", file=sys.stderr)
        return 2

    out = Path(args.out)
    names = [Path(m).name for m in args.models]
    if len(set(names)) != len(names):
        names = [f"{i}-{n}" for i, n in enumerate(names)]
    llms, vocab = {}, None
    for name, model_dir in zip(names, args.models, strict=True):
        path = out / f"{name}.gguf"
        if not path.is_file():
            export_gguf(model_dir, path, dtype=args.dtype)
        llms[name] = Llama(
            model_path=str(path),
            n_ctx=args.prompt_len + args.gen_len + 8,
            n_batch=args.prompt_len,
            n_threads=args.threads,
            n_threads_batch=args.threads,
            verbose=False,
        )
        vocab = vocab or llms[name].n_vocab()
    prompt = random_prompt(1, args.prompt_len, vocab, 0, torch.device("cpu"))[0].tolist()
    samples = {name: {"prefill_s": [], "decode_s": []} for name in names}
    tokens: dict[str, list[int]] = {}
    with StageProgress("llama.cpp decode", len(names) * (args.repeats + 1)) as bar:
        for name in names:
            llama_cpp_greedy(llms[name], prompt, 4)  # warm-up
            bar.advance(f"warm-up {name}")
        for repeat in range(args.repeats):  # interleaved: machine drift hits every model alike
            for name in names:
                prefill, decode_s, toks = llama_cpp_greedy(llms[name], prompt, args.gen_len)
                samples[name]["prefill_s"].append(prefill)
                samples[name]["decode_s"].append(decode_s)
                tokens[name] = toks
                bar.advance(f"repeat {repeat + 1}, {name}: {1e3 * decode_s / (args.gen_len - 1):.1f} ms/token")
    models = {}
    for name, model_dir in zip(names, args.models, strict=True):
        s = samples[name]
        decode_s = statistics.median(s["decode_s"])
        models[name] = {
            "dir": model_dir,
            "gguf_bytes": (out / f"{name}.gguf").stat().st_size,
            "decode_tokens_per_s": (args.gen_len - 1) / decode_s,
            "decode_ms_per_token": 1e3 * decode_s / (args.gen_len - 1),
            "prefill_tokens_per_s": args.prompt_len / statistics.median(s["prefill_s"]),
            "decode_s_samples": s["decode_s"],
        }
        if args.dtype == "f32":  # our model's greedy tokens on the same prompt
            ours = load_model(model_dir, device="cpu")
            expected = decode(ours, torch.tensor([prompt]), max_new_tokens=args.gen_len)[0, len(prompt) :].tolist()
            models[name]["greedy_tokens_equal_ours"] = sum(a == b for a, b in zip(tokens[name], expected, strict=True))
    base = models[names[0]]["decode_tokens_per_s"]
    for m in models.values():
        m["decode_ratio_to_parent"] = m["decode_tokens_per_s"] / base
    result = {
        "benchmark": "llama.cpp batch-1 decode of GGUF exports",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "config": vars(args),
        "hardware": describe_device(torch.device("cpu")),
        "models": models,
    }
    lines = [
        f"# llama.cpp batch-1 decode, {args.dtype} GGUFs — {result['date']}",
        "",
        f"Prompt {args.prompt_len} tokens, {args.gen_len} new, median of {args.repeats} interleaved repeats, "
        f"{args.threads} threads.",
        "",
        "| model | GGUF MB | decode tok/s | ms/token | × parent | prefill tok/s |"
        + (" greedy = ours |" if args.dtype == "f32" else ""),
        "|---|---:|---:|---:|---:|---:|" + ("---:|" if args.dtype == "f32" else ""),
    ]
    for name, m in models.items():
        row = (
            f"| {name} | {m['gguf_bytes'] / 1e6:.0f} | {m['decode_tokens_per_s']:.1f} | {m['decode_ms_per_token']:.2f} "
            f"| {m['decode_ratio_to_parent']:.2f}× | {m['prefill_tokens_per_s']:.0f} |"
        )
        if args.dtype == "f32":
            row += f" {m['greedy_tokens_equal_ours']}/{args.gen_len} |"
        lines.append(row)
    write_result(out / "result.json", result, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
