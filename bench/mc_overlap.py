"""Do training / calibration documents share text with the multiple-choice suites they are judged on?

Counts documents that share any n-gram (13 by default, the usual decontamination length; tokens as the SFT data's
filters tokenise) with a multiple-choice row's query + gold choice. Documents: a JSON list of strings (the
calibration cache's `documents.json`) or a jsonl with a `text` field.
    python bench/mc_overlap.py DOCUMENTS [--tasks runs/mc-tasks/arc_easy.jsonl,...] [--n 13]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from open_nemotron.data.filters import ngrams, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("documents")
    parser.add_argument(
        "--tasks", default="runs/mc-tasks/arc_easy.jsonl,runs/mc-tasks/piqa.jsonl,runs/mc-tasks/hellaswag.jsonl"
    )
    parser.add_argument("--n", type=int, default=13)
    args = parser.parse_args()
    path = Path(args.documents)
    if path.suffix == ".jsonl":
        docs = [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]
    else:
        docs = json.loads(path.read_text())
    grams: dict[tuple[str, ...], str] = {}
    rows = 0
    for task in args.tasks.split(","):
        for i, line in enumerate(Path(task).read_text().splitlines()):
            row = json.loads(line)
            rows += 1
            for g in ngrams(tokens(row["query"] + " " + row["choices"][row["gold"]]), args.n):
                grams.setdefault(g, f"{Path(task).stem}:{i}")
    hits = [(d, sorted({grams[g] for g in ngrams(tokens(doc), args.n) if g in grams})) for d, doc in enumerate(docs)]
    hits = [h for h in hits if h[1]]
    print(f"{len(docs)} documents vs {rows} rows ({len(grams)} distinct {args.n}-grams): {len(hits)} documents overlap")
    for d, found in hits[:20]:
        print(f"  document {d}: {', '.join(found[:3])}")


if __name__ == "__main__":
    main()
