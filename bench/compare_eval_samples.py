"""Compare two `eval` runs generation by generation (their `.samples.jsonl` files), e.g. the engine against
`eval --padded` with reasoning off (greedy): how many outputs are identical per model and mode, and each run's
accuracy on the rows both have.

    .venv/bin/python bench/compare_eval_samples.py runs/reasoning-v3/eval.samples.jsonl \\
        runs/reasoning-v3/eval-padded-off.samples.jsonl --mode off
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def load(path: Path, mode: str | None) -> dict[tuple, dict]:
    rows = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if mode is None or r["mode"] == mode:
            rows[(r["model"], r["mode"], r["task"], r["seed"], r["sample"])] = r
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    parser.add_argument("--mode", choices=["on", "off"], default=None)
    args = parser.parse_args()
    a, b = load(args.first, args.mode), load(args.second, args.mode)
    shared = sorted(set(a) & set(b))
    if not shared:
        raise SystemExit("error: the two files have no generation in common (model, mode, task, seed, sample)")
    groups: dict[tuple, list] = defaultdict(list)
    for key in shared:
        groups[key[:2]].append(key)
    print("| model | mode | generations | identical outputs | accuracy first | accuracy second |")
    print("|---|---|---:|---:|---:|---:|")
    for (model, mode), keys in sorted(groups.items()):
        same = sum(a[k]["output"] == b[k]["output"] for k in keys)
        acc_a = sum(a[k]["correct"] for k in keys) / len(keys)
        acc_b = sum(b[k]["correct"] for k in keys) / len(keys)
        print(f"| {model} | {mode} | {len(keys)} | {same} | {acc_a:.3f} | {acc_b:.3f} |")
    only = len(set(a) ^ set(b))
    if only:
        print(f"\n{only} generations are in one file only")


if __name__ == "__main__":
    main()
