"""How fast the parent writes calibration / distillation text at each engine slot count, and whether the text
depends on it (each conversation draws from its own seeded generator, so it should not, up to float rounding in
batched matmuls).

    python bench/calibration_slots.py smollm2-135m --prompts 32 --free-text 32 --slots 16,32,64 \
        --json runs/calibration-slots/result.json

One process, the slot counts interleaved over `--repeats` rounds; prints documents/s and tokens/s per slot count,
and for each count how many documents equal those of the first; `--json OUT` writes them (and OUT's .md beside it).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("parent")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--free-text", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=160)
    parser.add_argument("--slots", default="16,32,64")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import torch

    from open_nemotron.evaluate.hardware import describe_device
    from open_nemotron.model.loading import load_model, load_tokenizer
    from open_nemotron.puzzle.calibration import parent_documents
    from open_nemotron.puzzle.config import CalibrationConfig
    from open_nemotron.utils import write_result

    # As Puzzle and distill load it: our class, so the text is written on the engine.
    model = load_model(args.parent, implementation="ours")
    tokenizer = load_tokenizer(args.parent)
    config = replace(
        CalibrationConfig(),
        generate_prompts=args.prompts,
        generate_free_text=args.free_text,
        generate_tokens=args.tokens,
        seed=args.seed,
    )
    slots = [int(s) for s in args.slots.split(",")]
    seconds: dict[int, list[float]] = {s: [] for s in slots}
    documents: dict[int, list[str]] = {}
    for _ in range(args.repeats):
        for s in slots:
            start = time.perf_counter()
            with torch.inference_mode():
                documents[s] = parent_documents(model, tokenizer, config, batch_size=s)
            seconds[s].append(time.perf_counter() - start)
            print(f"{s} slots: {seconds[s][-1]:.1f} s", flush=True)
    n_tokens = {s: sum(len(tokenizer(d)["input_ids"]) for d in documents[s]) for s in slots}
    first = slots[0]
    rows = []
    for s in slots:
        best = min(seconds[s])
        rows.append(
            {
                "slots": s,
                "seconds": seconds[s],
                "best_s": best,
                "documents_per_s": len(documents[s]) / best,
                "document_tokens_per_s": n_tokens[s] / best,
                "same_documents_as_first": sum(a == b for a, b in zip(documents[s], documents[first], strict=True)),
                "speedup_vs_first": min(seconds[first]) / best,
            }
        )
    lines = [
        "| slots | best s | documents/s | document tokens/s | × first | documents equal to the first's |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['slots']} | {r['best_s']:.1f} | {r['documents_per_s']:.2f} | {r['document_tokens_per_s']:.0f} | "
            f"{r['speedup_vs_first']:.2f} | {r['same_documents_as_first']} / {len(documents[first])} |"
        )
    print("\n".join(lines))
    if args.json:
        result = {
            "args": {k: str(v) for k, v in vars(args).items()},
            "device": describe_device(next(model.parameters()).device),
            "rows": rows,
        }
        write_result(args.json, result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
