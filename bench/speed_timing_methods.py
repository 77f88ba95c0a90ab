"""bench-speed's two ways of timing decode, side by side on the same models, in one process, interleaved.

- difference: generate 1 token (= prefill), generate `gen_len` tokens, decode = the difference (bench-speed until
  2026-12-07; Puzzle's costs still time the parent this way);
- streamer: one generate of `gen_len` tokens, clock read from inside through a streamer (bench-speed now): prefill =
  start to the first new token, decode = first new token to the last.

Both should give the same decode ms/step where decode time is well above the timing noise; the difference method
can go negative where it is not (tiny models, short `gen_len`), the streamer method cannot. Models: specs as
bench-speed takes them (`smollm2-135m` is the embedded parent in transformers' Llama, a converted directory is our
model).

    .venv/bin/python bench/speed_timing_methods.py smollm2-135m runs/reasoning-v3/parent \\
        --batch-sizes 1,16 --gen-len 64 --repeats 3 --out runs/speed-timing

Writes OUT/result.json and OUT/result.md. Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from open_nemotron.evaluate.hardware import describe_device
from open_nemotron.evaluate.throughput import random_prompt, split_spec, timed_generate, timed_prefill_and_decode
from open_nemotron.model.decode_layout import layout_for_batch, set_decode_layout
from open_nemotron.model.loading import load_model
from open_nemotron.model.modeling import DeciLMForCausalLM
from open_nemotron.utils import write_result

KINDS = ("diff_prefill", "diff_decode", "st_prefill", "st_decode")  # seconds per call, by method and phase


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--gen-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    device = torch.device("cpu")
    hardware = describe_device(device)
    steps = args.gen_len - 1
    batches = [int(b) for b in args.batch_sizes.split(",")]
    models = []
    for spec in args.models:
        impl, path = split_spec(spec)
        models.append(load_model(path, device="cpu", implementation=impl))
    rows = []
    for b in batches:
        for model in models:
            if isinstance(model, DeciLMForCausalLM):
                set_decode_layout(model, layout_for_batch(b))
        prompt = random_prompt(b, args.prompt_len, models[0].config.vocab_size, 0, device)
        times = {(m, k): [] for m in range(len(models)) for k in KINDS}
        for model in models:
            timed_generate(model, prompt, 4, device)  # warm-up
        for repeat in range(args.repeats):
            for m, model in enumerate(models):
                # Alternate which method runs first, so neither always follows the other.
                if repeat % 2:
                    prefill, decode = timed_prefill_and_decode(model, prompt, args.gen_len, device)
                first = timed_generate(model, prompt, 1, device)
                total = timed_generate(model, prompt, args.gen_len, device)
                if not repeat % 2:
                    prefill, decode = timed_prefill_and_decode(model, prompt, args.gen_len, device)
                times[(m, "diff_prefill")].append(first)
                times[(m, "diff_decode")].append(total - first)
                times[(m, "st_prefill")].append(prefill)
                times[(m, "st_decode")].append(decode)
                print(
                    f"batch {b} {args.models[m]}: difference {(total - first) * 1e3 / steps:.1f} "
                    f"ms/step, streamer {decode * 1e3 / steps:.1f} ms/step",
                    flush=True,
                )
        for m, spec in enumerate(args.models):
            med = {k: statistics.median(times[(m, k)]) for k in KINDS}
            rows.append(
                {
                    "model": spec,
                    "batch": b,
                    "prefill_tokens_per_s": {
                        "difference": b * args.prompt_len / med["diff_prefill"],
                        "streamer": b * args.prompt_len / med["st_prefill"],
                    },
                    "decode_ms_per_step": {
                        "difference": med["diff_decode"] * 1e3 / steps,
                        "streamer": med["st_decode"] * 1e3 / steps,
                    },
                    "samples_s": {k: times[(m, k)] for k in KINDS},
                }
            )
    lines = [
        f"# bench-speed timing methods — {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        "",
        f"{hardware['cpu']}, {hardware['threads']} threads, torch {hardware['torch']}; prompt {args.prompt_len} "
        f"tokens, {args.gen_len} new tokens, median of {args.repeats}.",
        "",
        "| model | batch | decode ms/step: difference | streamer | ratio | prefill tok/s: difference | streamer |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        d, p = r["decode_ms_per_step"], r["prefill_tokens_per_s"]
        lines.append(
            f"| {r['model']} | {r['batch']} | {d['difference']:.1f} | {d['streamer']:.1f} | "
            f"{d['streamer'] / d['difference']:.3f} | {p['difference']:.0f} | {p['streamer']:.0f} |"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "speed_timing_methods",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "args": vars(args),
        "hardware": hardware,
        "rows": rows,
    }
    write_result(out / "result.json", result, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
