"""Greedy generation through the continuous-batching engine vs padded batches of `decode`, one process, same model.

Two workloads: (1) equal lengths (16 requests, the same budget: the engine should cost what one padded batch costs),
(2) mixed budgets (requests whose budgets differ, as reasoning traces do: a padded batch runs to its longest row,
the engine refills finished rows' slots). Reports seconds, useful tokens/s and how many rows' greedy tokens agree.

    .venv/bin/python bench/engine_vs_padded.py MODEL --json runs/engine/result.json
"""

from __future__ import annotations

import argparse
import random
import sys
import time

import torch

from open_nemotron.evaluate.hardware import describe_device
from open_nemotron.model.generation import decode
from open_nemotron.model.loading import load_model
from open_nemotron.progress import StageProgress
from open_nemotron.serve.engine import Engine, Request, SamplingParams
from open_nemotron.utils import write_result


def engine_run(model, prompts: torch.Tensor, budgets: list[int], slots: int) -> tuple[float, list[list[int]]]:
    engine = Engine(model, max_batch_size=slots, max_length=prompts.shape[1] + max(budgets) + 1)
    start = time.perf_counter()
    out = engine.run(
        [
            Request(p.tolist(), SamplingParams(max_tokens=b, temperature=0))
            for p, b in zip(prompts, budgets, strict=True)
        ]
    )
    return time.perf_counter() - start, [c.token_ids for c in out]


def padded_run(model, prompts: torch.Tensor, budgets: list[int], batch: int) -> tuple[float, list[list[int]]]:
    start = time.perf_counter()
    rows: list[list[int]] = []
    for k in range(0, prompts.shape[0], batch):
        out = decode(model, prompts[k : k + batch], max_new_tokens=max(budgets[k : k + batch]))
        rows += [
            r[prompts.shape[1] : prompts.shape[1] + b]
            for r, b in zip(out.tolist(), budgets[k : k + batch], strict=True)
        ]
    return time.perf_counter() - start, rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", required=True)
    args = parser.parse_args(argv)
    model = load_model(args.model)
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    rng = random.Random(0)
    workloads = {
        "equal (16 x 128-token prompts, 64 tokens each)": (
            torch.randint(100, vocab, (16, 128), generator=gen),
            [64] * 16,
        ),
        "mixed (32 x 64-token prompts, budgets 8/16/32/128)": (
            torch.randint(100, vocab, (32, 64), generator=gen),
            [rng.choice([8, 16, 32, 128]) for _ in range(32)],
        ),
    }
    results = {}
    with StageProgress("engine vs padded", len(workloads) * args.repeats * 2) as bar:
        for name, (prompts, budgets) in workloads.items():
            times = {"engine": [], "padded": []}
            for _ in range(args.repeats):
                t, engine_rows = engine_run(model, prompts, budgets, args.slots)
                times["engine"].append(t)
                bar.advance(f"{name}: engine {t:.1f} s")
                t, padded_rows = padded_run(model, prompts, budgets, args.slots)
                times["padded"].append(t)
                bar.advance(f"{name}: padded {t:.1f} s")
            useful = sum(budgets)
            results[name] = {
                "useful_tokens": useful,
                "seconds": {k: min(v) for k, v in times.items()},
                "useful_tokens_per_s": {k: useful / min(v) for k, v in times.items()},
                "rows_identical": sum(a == b for a, b in zip(engine_rows, padded_rows, strict=True)),
                "rows": len(budgets),
                "samples_s": times,
            }
    result = {
        "benchmark": "engine vs padded decode",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "config": vars(args),
        "hardware": describe_device(next(model.parameters()).device),
        "workloads": results,
    }
    lines = [
        f"# engine vs padded decode — {result['date']}",
        "",
        f"{args.model}, greedy, {args.slots} slots / padded batches of {args.slots}, best of {args.repeats}.",
        "",
        "| workload | engine s | padded s | engine / padded tokens/s | rows identical |",
        "|---|---:|---:|---:|---:|",
        *(
            f"| {name} | {r['seconds']['engine']:.1f} | {r['seconds']['padded']:.1f} | "
            f"{r['seconds']['padded'] / r['seconds']['engine']:.2f} | {r['rows_identical']} / {r['rows']} |"
            for name, r in results.items()
        ),
        "",
    ]
    write_result(args.json, result, "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
